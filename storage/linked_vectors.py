"""Linked vector tables: a few stored tables of one producer, read as one table, so a grown pool's features are
not written again.

Why: the embed stage's output is one table over the pool, sorted by sample id. A grown dataset's new samples land
all over the id range, so combining the shards' tables into one rewrote the pool's features every growth (~20 GB
read and ~20 GB written a night at 10^7 samples × 512 float32). A grown dataset is stored as a few *runs* of shards
(:class:`~storage.datasets.DatasetManifest`); its features are now one combined table per run — a kept run's is the
table the previous run combined (a task cache hit), the new run's holds ~1 % of the pool — linked by a small
manifest. Every reader of vector tables (:func:`~storage.datasets.read_vector_matrix`,
:func:`~storage.datasets.scan_vector_rows`, :func:`~storage.datasets.read_vectors`,
:func:`~storage.datasets.combine_vectors`) takes a linked table as it takes one table: the runs are merged in id
order as they are read (a k-way merge holding one scan batch per run), and every part is verified as it is read.

A linked table is a :class:`~storage.datasets.VectorTableRef` whose artifact is the manifest (a ``.json`` object of
the table's kind) instead of a Parquet table: canonical JSON naming each part (its ref and id range), sorted by first
id. Parts must hold disjoint samples (a dataset's runs do); a reader that meets a sample twice, or another row count
than the ref's, raises MalformedRecordError. One part is not linked: it is returned as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from skmm.canonical_json import canonical_json
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import ID_DTYPE, LINKED_SUFFIX, VectorTableRef, _merged_rows, _table_id_range, is_linked
from storage.errors import MalformedRecordError

__all__ = ["LINKED_FORMAT", "LINKED_SUFFIX", "is_linked", "link_vectors", "linked_manifest", "linked_parts"]

LINKED_FORMAT = "skmm.linked-vectors"
_VERSION = 1


def link_vectors(store: ArtifactStore, refs: Sequence[VectorTableRef]) -> VectorTableRef:
    """One table made of ``refs`` (vector tables of one producer, kind and dim, holding disjoint samples), stored
    as a small manifest: nothing is read but each part's footer (its id range). One ref is returned as it is.
    ValueError for mixed producers, kinds or dims, for a part that is itself linked, or for a part whose id range
    cannot be read from its footer."""
    refs = list(refs)
    if not refs:
        raise ValueError("link_vectors needs at least one vector table")
    head = refs[0]
    for other in refs:
        if (other.producer_digest, other.kind, other.dim) != (head.producer_digest, head.kind, head.dim):
            raise ValueError(f"refusing to link vector tables of different producers, kinds or dims: "
                             f"{head.artifact.uri} and {other.artifact.uri}")
        if is_linked(other):
            raise ValueError(f"refusing to link a linked table ({other.artifact.uri}): link its parts")
    if len(refs) == 1:
        return head
    parts = []
    for ref in refs:
        span = _table_id_range(store, ref)
        if span is None:
            raise ValueError(f"vector table {ref.artifact.uri}: its id range is not readable from its footer")
        parts.append({"vectors": ref.to_dict(), "min_id": span[0].decode(), "max_id": span[1].decode()})
    parts.sort(key=lambda p: (p["min_id"], p["vectors"]["artifact"]["sha256"]))
    body = {"format": LINKED_FORMAT, "version": _VERSION, "kind": head.kind, "producer_digest": head.producer_digest,
            "dim": head.dim, "num_rows": sum(r.num_rows for r in refs), "parts": parts}
    artifact = store.put_bytes(canonical_json(body, allow_nan=False).encode("ascii"), head.kind, LINKED_SUFFIX)
    return VectorTableRef(artifact, head.kind, head.producer, head.producer_digest, body["num_rows"], head.dim)


def linked_manifest(store: ArtifactStore, artifact: ArtifactRef) -> dict[str, Any]:
    """A link manifest's body, read verified (sha256, size) and checked for its keys, format, version and at least
    two parts (each part's ref is :func:`linked_parts`' to check); MalformedRecordError naming it if not."""
    where = artifact.uri
    try:
        body: Any = json.loads(store.get_bytes(artifact))
    except (ValueError, UnicodeDecodeError):
        raise MalformedRecordError(f"linked vector table {where} is not valid JSON") from None
    keys = {"format", "version", "kind", "producer_digest", "dim", "num_rows", "parts"}
    if (not isinstance(body, dict) or set(body) != keys or body["format"] != LINKED_FORMAT
            or body["version"] != _VERSION or not isinstance(body["parts"], list) or len(body["parts"]) < 2):
        raise MalformedRecordError(f"linked vector table {where} needs exactly {sorted(keys)}, format "
                                   f"{LINKED_FORMAT} v{_VERSION} and at least two parts")
    return body


def linked_parts(store: ArtifactStore, ref: VectorTableRef) -> list[tuple[VectorTableRef, bytes, bytes]]:
    """(part, first id, last id) of a linked table, from its manifest (verified against the ref's sha256 and
    checked against the ref: kind, producer, dim, rows); MalformedRecordError naming the manifest if not."""
    where = ref.artifact.uri
    body = linked_manifest(store, ref.artifact)
    if (body["kind"], body["producer_digest"], body["dim"], body["num_rows"]) != (
            ref.kind, ref.producer_digest, ref.dim, ref.num_rows):
        raise MalformedRecordError(f"linked vector table {where} does not match its ref (kind, producer, dim, rows)")
    out = []
    for part in body["parts"]:
        if not isinstance(part, dict) or set(part) != {"vectors", "min_id", "max_id"}:
            raise MalformedRecordError(f"linked vector table {where} has a malformed part")
        vectors = VectorTableRef.from_dict(part["vectors"])
        lo, hi = part["min_id"], part["max_id"]
        if (is_linked(vectors) or (vectors.kind, vectors.producer_digest, vectors.dim) != (ref.kind,
                                                                                         ref.producer_digest, ref.dim)
                or not isinstance(lo, str) or not isinstance(hi, str) or not lo <= hi):
            raise MalformedRecordError(f"linked vector table {where}: part {vectors.artifact.uri} does not belong")
        out.append((vectors, lo.encode("ascii"), hi.encode("ascii")))
    if sum(p.num_rows for p, _, _ in out) != ref.num_rows:
        raise MalformedRecordError(f"linked vector table {where}: its parts' rows do not add up to {ref.num_rows}")
    return out


def linked_range(store: ArtifactStore, ref: VectorTableRef) -> tuple[bytes, bytes]:
    """The first and last sample id of a linked table (from its manifest)."""
    parts = linked_parts(store, ref)
    return min(lo for _, lo, _ in parts), max(hi for _, _, hi in parts)


def scan_linked(store: ArtifactStore, ref: VectorTableRef) -> Iterator[tuple[None, np.ndarray, np.ndarray]]:
    """(None, ids as ``ID_DTYPE``, float32 rows) of a linked table in sample-id order: its parts merged a scan batch
    each at a time, each part verified as it ends. MalformedRecordError, after the last row, if a sample came
    twice or the rows do not add up to the ref's."""
    parts = linked_parts(store, ref)
    seen, last = 0, np.empty(0, ID_DTYPE)
    for ids, rows in _merged_rows(store, [p for p, _, _ in parts], [lo for _, lo, _ in parts], ref.producer_digest):
        if not len(ids):
            continue
        if len(last) and ids[0] <= last[0]:
            raise MalformedRecordError(f"linked vector table {ref.artifact.uri}: sample {ids[0].decode()} is out "
                                       "of order or in two parts")
        seen += len(ids)
        last = ids[-1:]
        yield None, ids, rows
    if seen != ref.num_rows:
        raise MalformedRecordError(f"linked vector table {ref.artifact.uri}: {seen} distinct samples, not "
                                   f"{ref.num_rows} (a sample in two parts?)")
