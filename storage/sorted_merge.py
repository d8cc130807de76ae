"""Merge streams that are each sorted by sample id into one stream in sample-id order, in bounded memory.

A grown dataset is several *runs* of shards (:class:`storage.datasets.DatasetManifest`): each run is in sample-id
order, the runs' id ranges interleave. Readers that promise sample-id order merge the runs' streams here, holding
one table of each stream at a time — never a run, let alone the pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.datasets import sample_id_array

__all__ = ["merge_sorted_tables"]


def merge_sorted_tables(streams: Sequence[Iterable[pa.Table]], key: str = "sample_id") -> Iterator[pa.Table]:
    """Tables whose rows are the rows of all ``streams``, in ``key`` order (sample ids: 64 hex digits).

    Each stream yields tables of one schema whose ``key`` column ascends across the stream. Rows with equal keys
    in several streams (a dataset's runs never have any) come out in stream order. Each output table ends at the
    smallest last key among the streams' current tables, so every step uses up at least one table: memory is one
    table per stream plus the output. A stream that is out of order raises ValueError."""
    iters = [iter(s) for s in streams]
    heads: list[pa.Table | None] = [None] * len(iters)
    keys: list[np.ndarray | None] = [None] * len(iters)
    last: list[bytes] = [b""] * len(iters)

    def advance(i: int) -> None:
        for table in iters[i]:
            if not table.num_rows:
                continue
            ids = sample_id_array(table.column(key))
            if ids[0] < last[i] or (len(ids) > 1 and not bool(np.all(ids[1:] >= ids[:-1]))):
                raise ValueError(f"stream {i} of a sorted merge is not in {key} order")
            heads[i], keys[i], last[i] = table, ids, ids[-1]
            return
        heads[i] = keys[i] = None

    for i in range(len(iters)):
        advance(i)
    while True:
        live = [i for i in range(len(iters)) if heads[i] is not None]
        if not live:
            return
        if len(live) == 1:  # the others are done: the rest of this stream is already in order
            i = live[0]
            yield heads[i]
            advance(i)
            continue
        bound = min(keys[i][-1] for i in live)
        parts = []
        for i in live:
            cut = int(np.searchsorted(keys[i], bound, side="right"))
            if not cut:
                continue
            parts.append(heads[i].slice(0, cut))
            if cut == len(keys[i]):
                advance(i)
            else:
                heads[i], keys[i] = heads[i].slice(cut), keys[i][cut:]
        merged = pa.concat_tables(parts)
        yield merged.take(pc.sort_indices(merged, [(key, "ascending")]))  # stable: equal keys keep stream order
