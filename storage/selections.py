"""Selections as immutable Parquet artifacts: which samples were chosen, in what order, with what weight.

A selection artifact (kind ``selection``, suffix ``.parquet``) has exactly three columns —
``sample_id`` (string), ``rank`` (int32, the 0-based order in which the method selected the sample) and
``weight`` (float64) — sorted by ``sample_id``. The method name and its parameters (canonical JSON) travel in the
Parquet key-value metadata (``skmm.method``, ``skmm.params``). The bytes are deterministic for a given
selection, method and params, so the same selection always gets the same content address.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.errors import MalformedRecordError

__all__ = ["SELECTION_KIND", "SELECTION_SCHEMA", "read_selection", "selection_metadata", "write_selection"]

SELECTION_KIND = "selection"
SELECTION_SCHEMA = pa.schema([("sample_id", pa.string()), ("rank", pa.int32()), ("weight", pa.float64())])
_META_METHOD = b"skmm.method"
_META_PARAMS = b"skmm.params"
_META_FORMAT = b"skmm.format"
_FORMAT = b"selection/1"


def write_selection(store: ArtifactStore, sample_ids: Sequence[str], ranks: Sequence[int] | None = None,
                    weights: Sequence[float] | None = None, method: str = "", params: Mapping[str, Any] | None = None,
                    ) -> ArtifactRef:
    """Store a selection and return its ref.

    ``ranks`` default to the order of ``sample_ids`` (0, 1, …) and ``weights`` to 1.0. Raises ValueError on
    duplicate or empty ids, mismatched lengths, ranks that are not a permutation of 0..n-1, non-finite weights or
    params that are not JSON.
    """
    ids = [str(s) if isinstance(s, np.str_) else s for s in sample_ids]
    n = len(ids)
    if any(not isinstance(s, str) or not s for s in ids):
        raise ValueError("sample ids must be non-empty strings")
    rank_arr = np.arange(n, dtype=np.int64) if ranks is None else np.asarray(ranks)
    weight_arr = np.ones(n, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    if rank_arr.shape != (n,) or weight_arr.shape != (n,):
        raise ValueError(f"sample_ids, ranks and weights must have the same length; got {n}, "
                         f"{rank_arr.shape[0] if rank_arr.ndim else 'scalar'}, "
                         f"{weight_arr.shape[0] if weight_arr.ndim else 'scalar'}")
    if n and not np.issubdtype(rank_arr.dtype, np.integer):
        raise ValueError(f"ranks must be integers; got dtype {rank_arr.dtype}")
    if n and not np.array_equal(np.sort(rank_arr), np.arange(n)):
        raise ValueError("ranks must be a permutation of 0..n-1 (the 0-based selection order)")
    if not np.all(np.isfinite(weight_arr)):
        raise ValueError("weights must be finite")
    if not isinstance(method, str):
        raise ValueError("method must be a string")
    try:
        params_json = canonical_json(dict(params or {}), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"selection params must be JSON-serialisable with finite numbers: {exc}") from None

    id_arr = pa.array(ids, pa.string())
    order = pc.sort_indices(id_arr)
    sorted_ids = id_arr.take(order)
    if n > 1 and pc.any(pc.equal(sorted_ids[1:], sorted_ids[:-1])).as_py():
        dup = next(a for a, b in zip(sorted_ids.to_pylist()[1:], sorted_ids.to_pylist()[:-1], strict=True) if a == b)
        raise ValueError(f"duplicate sample id in selection: {dup!r:.80}")
    order_np = order.to_numpy()
    table = pa.table({
        "sample_id": sorted_ids,
        "rank": pa.array(rank_arr[order_np].astype(np.int32), pa.int32()),
        "weight": pa.array(weight_arr[order_np], pa.float64()),
    }, schema=SELECTION_SCHEMA.with_metadata({_META_FORMAT: _FORMAT, _META_METHOD: method.encode(),
                                              _META_PARAMS: params_json.encode()}))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=1 << 20)
    return store.put_bytes(buf.getvalue(), SELECTION_KIND, ".parquet")


def read_selection(store: ArtifactStore, ref: ArtifactRef) -> pa.Table:
    """The selection's table (sample_id, rank, weight), verified against its sha256; metadata kept on the schema.

    Raises ArtifactNotFoundError / ArtifactCorruptedError from the store, MalformedRecordError if the object is
    not a selection.
    """
    data = store.get_bytes(ref)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise MalformedRecordError(f"selection {ref.uri} is not a Parquet file: {type(exc).__name__}") from None
    if table.schema.remove_metadata() != SELECTION_SCHEMA:
        raise MalformedRecordError(f"selection {ref.uri} has columns {table.schema.names}; expected "
                                   f"{SELECTION_SCHEMA.names} with types string, int32, float64")
    return table


def selection_metadata(table: pa.Table) -> dict[str, Any]:
    """{'method': str, 'params': dict} from a selection table's Parquet metadata."""
    meta = table.schema.metadata or {}
    try:
        params = json.loads(meta.get(_META_PARAMS, b"{}"))
    except ValueError:
        params = {}
    return {"method": meta.get(_META_METHOD, b"").decode(errors="replace"), "params": params}
