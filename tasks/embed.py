"""Stage "embed": open_clip image features of every sample, one task per dataset shard, then one table.

Each shard is its own cached task (keyed by the shard's content hash and the model spec), so shards run in
parallel under Prefect's task runner and an unchanged shard is never embedded twice. Shards are cut from the rows
sorted by sample id, so a grown pool's new samples change the shards from the first of them on (about all of them:
ids are uniform). A changed shard therefore embeds only the samples that no earlier run embedded with the same
model: it looks its ids up in the store's feature catalog (:mod:`storage.feature_catalog`: per producer digest
and :data:`CODE_VERSION`, listed once per run), takes the vectors found there, runs the tower on the rest, writes
the shard's table (sorted by id, as before) and catalogues the rows it computed. Features are bitwise
batch-invariant (``skmm.models.clip``), so the table is byte for byte what a from-scratch run writes, and a 1 %
growth embeds about 1 % of the pool. The shards' tables are combined into one features table keyed by sample id,
whose producer is the model spec.

**Packing** (the flow's path, :func:`embed_with_counts`, and :func:`run_embed`): the tower runs in fixed blocks
(``block_rows``: 64 on the CPU, 512 on a large GPU), so a shard with 20 new samples would pay for a whole block.
A shard that finds some of its samples in the catalog and misses fewer than one block's worth (the changed shards
of a grown pool) therefore does not embed them itself: it writes a
small *pending* artifact (its ids, and the bytes of only the samples it misses) and returns that. The pending
samples of consecutive shards are then embedded together by ``embed-pack`` tasks, :data:`PACK_BLOCKS` blocks at a
time, each writing and cataloguing one delta table; ``embed-assemble`` tasks then write those shards' tables from
the catalog and the delta, without reading the shards again. Features are a function of each sample's bytes alone
(fixed blocks), so the tables are byte for byte the same; the tower work of a 1 % growth falls from about one
block per shard to the new samples' own blocks (bench/README.md §13).

The feature spec (:func:`feature_spec`) is the model config's tower plus its ``precision`` ("fp32" unless the
config names another) and ``block_rows`` (64 unless the config names another). :func:`embed_model`, called where
the stage starts (the flow's process), adds the block size of that machine's device
(:func:`skmm.models.clip.default_block_rows`: 64 on the CPU, 512 on a large CUDA device), so the model config the
tasks receive, which is their cache key, determines the spec: a task never picks a block size of its own. Both are
in the spec's dict, hence in every table's producer, the catalog's scope and the task cache key whenever they
differ from the defaults, and in the stage's counts (lineage metrics) always: features computed at another
precision or block shape are never mixed. The default CPU spec is unchanged (64-row fp32 blocks), so are its
tables and keys.
Decoding runs in worker processes while the tower encodes (``decode_workers``), and on the CPU in one block worker
per torch thread that decodes and encodes whole blocks (``$SKMM_ENCODE_WORKERS``; see
:func:`skmm.models.clip.embed_images`). Neither is part of any key: the bits do not depend on them.

Caveat shared with the task cache: features are bitwise reproducible on one machine and build; a store shared by
CPU and GPU machines at the same block size and precision mixes their (float32 round-off apart) features, at
shard granularity through the cache and at sample granularity through the catalog (at their default block
sizes, 64 and 512, they differ in the spec and are not mixed).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from skmm.models.clip import BLOCK_ROWS, MAX_PIXELS, ClipSpec, default_block_rows, embed_images
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import (
    DatasetRef,
    ShardRef,
    VectorTableRef,
    combine_vectors,
    load_manifest,
    producer_digest,
    read_shard,
    write_vectors,
)
from storage.errors import ArtifactCorruptedError
from storage.feature_catalog import CatalogEntry, FeatureCatalog
from storage.ingest.reuse import read_new_rows
from storage.linked_vectors import link_vectors
from storage.sample_reader import iter_shard
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.shard_window import shard_task_window, submit_windowed
from tasks.store import open_store

__all__ = ["PACK_BLOCKS", "by_run", "combine_embeddings", "embed", "embed_assemble", "embed_model", "embed_pack",
           "embed_shard", "embed_with_counts", "feature_spec", "link_embeddings", "pack_members", "packs_of",
           "run_combine_runs", "run_embed", "run_embed_assemble", "run_embed_counted", "run_embed_pack",
           "run_embed_shard", "run_link", "shards_and_runs", "shards_of"]

# embed-3: fixed-shape blocks (bitwise batch-invariant features). embed-4: 16-bit, I and F images decoded
# faithfully (they were clipped to white), so their features changed; 8-bit images' did not. The feature catalog is
# scoped by this version too (per-sample reuse itself changed no output byte).
CODE_VERSION = "embed-4"
KIND = "embeddings"
PENDING_KIND = "embed-pending"  # a shard's ids and the bytes of the samples it left to a pack
PACK_BLOCKS = 16  # an embed-pack task gathers about this many blocks of pending samples
_PENDING_SCHEMA = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("data", pa.binary())])

_CATALOGS: OrderedDict[tuple[str, str, str], FeatureCatalog] = OrderedDict()
_CATALOGS_LOCK = threading.Lock()
_KEEP_CATALOGS = 2  # runs whose catalogs a process keeps, e.g. tasks of runs that ended elsewhere
log = logging.getLogger(__name__)


def shards_of(dataset: dict, store: dict) -> list[dict]:
    """The dataset's shard refs (small JSON), in manifest order (each run in sample-id order)."""
    return shards_and_runs(dataset, store)[0]


def shards_and_runs(dataset: dict, store: dict) -> tuple[list[dict], list[int]]:
    """:func:`shards_of`, and how many of them each run of the dataset holds, in order (one run: ``[shards]``),
    from one read of the manifest."""
    runs = load_manifest(open_store(store), DatasetRef.from_dict(dataset)).shard_runs()
    return [sh.to_dict() for run in runs for sh in run], [len(run) for run in runs]


def feature_spec(model: dict[str, Any]) -> ClipSpec:
    """The spec of the features the embed stage computes from the pipeline's model config (name, pretrained,
    init_seed; optional precision, default "fp32", and block_rows, default 64)."""
    return ClipSpec(model=model["name"], pretrained=model.get("pretrained"), init_seed=model.get("init_seed", 0),
                    precision=model.get("precision", "fp32"), block_rows=model.get("block_rows", BLOCK_ROWS))


def embed_model(model: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """``model`` as the embed tasks are given it: with ``device``'s block size (None: this machine's, as
    :func:`~skmm.models.clip.resolve_device`) when the config names none and it is not the default 64, so a CUDA
    run's task cache keys and spec differ from a CPU run's; unchanged otherwise."""
    if model.get("block_rows") is not None:
        return model
    rows = default_block_rows(device)
    return model if rows == BLOCK_ROWS else {**model, "block_rows": rows}


def feature_catalog(st: ArtifactStore, spec: ClipSpec, catalog_run: str | None = None) -> FeatureCatalog:
    """The feature catalog of ``spec``'s features in ``st``: one shared instance per ``catalog_run`` (so the
    shards of one run list the catalog once), a fresh one when ``catalog_run`` is None."""
    digest = producer_digest(spec.to_dict())
    if catalog_run is None:
        return FeatureCatalog(st, KIND, digest, CODE_VERSION)
    key = (st.url, digest, catalog_run)
    with _CATALOGS_LOCK:
        catalog = _CATALOGS.get(key)
        if catalog is None:
            catalog = _CATALOGS[key] = FeatureCatalog(st, KIND, digest, CODE_VERSION)
            while len(_CATALOGS) > _KEEP_CATALOGS:
                _CATALOGS.popitem(last=False)
        _CATALOGS.move_to_end(key)
        return catalog


def _release_catalogs(catalog_run: str) -> None:
    """Drop a finished run's catalogs (and the tables they cache) from this process."""
    with _CATALOGS_LOCK:
        for key in [k for k in _CATALOGS if k[2] == catalog_run]:
            del _CATALOGS[key]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _blocks(rows: int, spec: ClipSpec) -> int:
    """Forward passes of the tower for ``rows`` images (fixed blocks, the last one padded)."""
    return -(-rows // spec.block_rows)


def run_embed_shard(shard: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
                    device: str | None = None, progress: bool = False, catalog_run: str | None = None,
                    max_pixels: int = MAX_PIXELS, decode_workers: int | None = None, pack_below: int = 0) -> dict:
    """The features of one dataset shard, embedding only the samples the feature catalog does not hold
    (``decode_workers``: see :func:`skmm.models.clip.embed_images`; None = cores − 1).

    Returns ``{"vectors": <VectorTableRef dict>, "embedded": n, "reused": m, "blocks": tower passes}``; or, when
    the shard misses fewer than ``pack_below`` samples (but some, and not all), embeds nothing and returns
    ``{"pending": <ArtifactRef dict>, "rows": shard rows, "missing": k}`` for :func:`run_embed_pack`."""
    st = open_store(store)
    ref_in = ShardRef.from_dict(shard)
    ids = _shard_ids(st, ref_in)
    spec = feature_spec(model)
    catalog = feature_catalog(st, spec, catalog_run)
    known = catalog.lookup(ids)
    todo = [i for i, sid in enumerate(ids) if sid not in known.vectors]
    images = dict(zip(todo, _images_of(st, ref_in, [ids[i] for i in todo], len(ids)), strict=True))
    if 0 < len(todo) < min(pack_below, len(ids)):  # a changed shard of a grown pool; a new shard embeds itself
        pending = pa.table({"sample_id": ids, "data": [images.get(i) for i in range(len(ids))]},
                           schema=_PENDING_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(pending, sink, compression="none")  # image bytes are compressed already
        ref = st.put_bytes(sink.getvalue().to_pybytes(), PENDING_KIND, ".parquet")
        _logger().info("embed shard %s…: %d samples left to a pack, %d found in the catalog",
                       ShardRef.from_dict(shard).artifact.sha256[:12], len(todo), len(ids) - len(todo))
        return {"pending": ref.to_dict(), "rows": len(ids), "missing": len(todo)}
    fresh = (embed_images([images[i] for i in todo], spec, batch_size=batch_size, device=device, progress=progress,
                          max_pixels=max_pixels, decode_workers=decode_workers)
             if todo else None)
    ref = _write_shard_table(st, spec, catalog, ids, known.vectors, todo, fresh)
    if todo:  # catalogue the rows computed here: the shard table itself when nothing was reused
        new_ids = [ids[i] for i in todo]
        delta = ref if len(todo) == len(ids) else write_vectors(st, new_ids, fresh, spec.to_dict(), kind=KIND)
        catalog.register(delta, new_ids)
    _logger().info("embed shard %s…: %d samples embedded, %d reused from %d catalogued table(s)",
                   ShardRef.from_dict(shard).artifact.sha256[:12], len(todo), len(ids) - len(todo), known.tables)
    return {"vectors": ref.to_dict(), "embedded": len(todo), "reused": len(ids) - len(todo),
            "blocks": _blocks(len(todo), spec)}


def _shard_ids(st: ArtifactStore, shard: ShardRef) -> list[str]:
    """A shard's sample ids, from its id column alone (the footer checked against the ref: size, rows, schema)."""
    return [sid for part in iter_shard(st, shard, []) for sid in part.column("sample_id").to_pylist()]


def _images_of(st: ArtifactStore, shard: ShardRef, wanted: list[str], rows: int) -> list[bytes]:
    """The image bytes of the ``wanted`` samples of a shard (``rows`` rows), in that order.

    All of them: the shard, read and verified whole. Some (a changed shard of a grown pool): first from the rows
    the growth's ingest left aside for this shard (:func:`storage.ingest.reuse.read_new_rows`: ~1 % of the
    shard's bytes), then from the shard's data column for the rest; every image is checked against its id."""
    if not wanted:
        return []
    if len(wanted) == rows:
        table = read_shard(st, shard, columns=["sample_id", "data"])
        found = dict(zip(table.column("sample_id").to_pylist(), table.column("data").to_pylist(), strict=True))
        del table
    else:
        found = read_new_rows(st, shard.artifact.sha256, set(wanted))
        rest = sorted(set(wanted) - set(found))
        if rest:
            for part in iter_shard(st, shard, ["data"], pa.array(rest, pa.string())):
                for sid, blob in zip(part.column("sample_id").to_pylist(), part.column("data").to_pylist(),
                                     strict=True):
                    if blob is not None and hashlib.sha256(blob).hexdigest() != sid:
                        raise ArtifactCorruptedError(f"dataset shard {shard.artifact.uri} is corrupted: the bytes of "
                                                     f"sample {sid[:12]}… do not hash to its id")
                    found[sid] = blob
        _logger().info("embed shard %s…: %d new samples' bytes from the ingest's new rows, %d from the shard",
                       shard.artifact.sha256[:12], len(wanted) - len(rest), len(rest))
    images = [found.get(sid) for sid in wanted]
    if any(img is None for img in images):
        raise ValueError("some samples carry no image bytes: the embed stage needs them (or ingest embeddings)")
    return images  # type: ignore[return-value]


def _write_shard_table(st: ArtifactStore, spec: ClipSpec, catalog: FeatureCatalog, ids: list[str],
                       known: dict[str, np.ndarray], todo: list[int], fresh: np.ndarray | None) -> VectorTableRef:
    """The shard's table: rows ``todo`` from ``fresh``, the others from ``known``."""
    dim = fresh.shape[1] if fresh is not None else len(next(iter(known.values())))
    if any(len(v) != dim for v in known.values()):
        raise ValueError(f"feature catalog {st.uri(catalog.prefix)} holds vectors of another width than {spec.model}'s "
                         f"{dim}: delete that catalog folder and rerun")
    features = np.empty((len(ids), dim), dtype=np.float32)
    for i, sid in enumerate(ids):
        if sid in known:
            features[i] = known[sid]
    if fresh is not None:
        features[todo] = fresh
    return write_vectors(st, ids, features, spec.to_dict(), kind=KIND)


def _read_pending(st: ArtifactStore, pending: dict) -> pa.Table:
    table = pq.read_table(pa.BufferReader(st.get_bytes(ArtifactRef.from_dict(pending))))
    if not table.schema.equals(_PENDING_SCHEMA):
        raise ValueError(f"{pending.get('uri')} is not a pending-samples table of the embed stage")
    return table


def pack_members(results: list[dict], block_rows: int) -> list[list[int]]:
    """The packs of a run: for each, the positions in ``results`` (shard results, in shard order) of the pending
    shards it embeds."""
    pending = [i for i, r in enumerate(results) if "pending" in r]
    return [[pending[j] for j in group] for group in packs_of([results[i]["missing"] for i in pending], block_rows)]


def _count_part(counts: dict[str, Any], part: dict) -> None:
    """Add a shard's final result that this run computed: its reused rows, and its embedded rows and blocks when the
    shard ran the tower itself (an assembled shard's pack is counted as the pack)."""
    counts["samples_reused"] += part["reused"]
    if part.get("blocks", 0):
        counts["samples_embedded"] += part["embedded"]
        counts["tower_blocks"] += part["blocks"]


def _count_pack(counts: dict[str, Any], packed: dict) -> None:
    counts["packs"] += 1
    counts["samples_embedded"] += packed["embedded"]
    counts["tower_blocks"] += packed["blocks"]


def packs_of(missing: list[int], block_rows: int, blocks: int = PACK_BLOCKS) -> list[list[int]]:
    """Consecutive groups of pending shards (their ``missing`` counts, in shard order), each closed once it holds
    ``blocks`` blocks' worth of samples: the pack tasks' work, so that only each pack's last block is padded."""
    packs: list[list[int]] = []
    total = 0
    for i, k in enumerate(missing):
        if not packs or total >= blocks * block_rows:
            packs.append([])
            total = 0
        packs[-1].append(i)
        total += k
    return packs


def run_embed_pack(pendings: list[dict], model: dict[str, Any], store: dict, batch_size: int = 64,
                   device: str | None = None, progress: bool = False, catalog_run: str | None = None,
                   max_pixels: int = MAX_PIXELS, decode_workers: int | None = None) -> dict:
    """Embed the pending samples of several shards that the catalog still lacks (an earlier pack may have
    embedded some: pending results are cached per shard, packs are regrouped per run) in one stream of full
    blocks; write and catalogue them as one delta table. Returns ``{"delta": its catalog entry (``vectors``,
    ``min_id``, ``max_id``) or None, "embedded": n, "blocks": tower passes}``."""
    st = open_store(store)
    spec = feature_spec(model)
    catalog = feature_catalog(st, spec, catalog_run)
    ids: list[str] = []

    def images() -> Any:  # one pending table in memory at a time
        for pending in pendings:
            table = _read_pending(st, pending)
            rows = [(sid, data) for sid, data in zip(table.column("sample_id").to_pylist(),
                                                     table.column("data").to_pylist(), strict=True)
                    if data is not None]
            known = catalog.lookup([sid for sid, _ in rows]).vectors
            for sid, data in rows:
                if sid not in known:
                    ids.append(sid)
                    yield data

    stream = images()
    first = next(stream, None)
    if first is None:
        return {"delta": None, "embedded": 0, "blocks": 0}
    fresh = embed_images(itertools.chain([first], stream), spec, batch_size=batch_size, device=device,
                         progress=progress, max_pixels=max_pixels, decode_workers=decode_workers)
    entry = catalog.register(write_vectors(st, ids, fresh, spec.to_dict(), kind=KIND), ids)
    _logger().info("embed pack of %d shards: %d samples embedded in %d blocks", len(pendings), len(ids),
                   _blocks(len(ids), spec))
    delta = {"vectors": entry.vectors.to_dict(), "min_id": entry.min_id, "max_id": entry.max_id}
    return {"delta": delta, "embedded": len(ids), "blocks": _blocks(len(ids), spec)}


def run_embed_assemble(shard: dict, pending: dict, delta: dict | None, model: dict[str, Any], store: dict,
                       catalog_run: str | None = None, **embed_options: Any) -> dict:
    """The table of a shard that left its missing samples to a pack, from the catalog, which ``delta`` (the pack's
    catalog entry) joins if this process listed it before the pack wrote it; the shard itself is not read again,
    and a pack's delta is read once per process (the run's catalog caches the tables it reads), not once per
    shard. If the catalog lacks one of its samples (an entry deleted meanwhile), the shard is embedded the plain
    way instead. Returns what :func:`run_embed_shard` returns, the samples it left to the pack counted as
    ``embedded`` (``blocks`` 0: the pack ran the tower)."""
    st = open_store(store)
    spec = feature_spec(model)
    table = _read_pending(st, pending)
    ids = table.column("sample_id").to_pylist()
    catalog = feature_catalog(st, spec, catalog_run)
    if delta is not None:
        catalog.include(CatalogEntry(VectorTableRef.from_dict(delta["vectors"]), delta["min_id"], delta["max_id"]))
    known = catalog.lookup(ids).vectors
    if len(known) != len(ids):
        _logger().warning("embed shard %s…: %d samples are not in the catalog; embedding the shard the plain way",
                          ShardRef.from_dict(shard).artifact.sha256[:12], len(ids) - len(known))
        return run_embed_shard(shard, model, store, catalog_run=None, **embed_options)
    ref = _write_shard_table(st, spec, catalog, ids, known, [], None)
    new = len(ids) - table.column("data").null_count
    return {"vectors": ref.to_dict(), "embedded": new, "reused": len(ids) - new, "blocks": 0}


def _vectors_of(result: dict) -> dict:
    """The table ref in a shard result (results cached before the counts were added are the bare ref)."""
    return result["vectors"] if "vectors" in result else result


def run_combine(parts: list[dict], store: dict) -> dict:
    """The shards' feature tables as one table."""
    return combine_vectors(open_store(store), [VectorTableRef.from_dict(_vectors_of(p)) for p in parts]).to_dict()


def by_run(parts: list[Any], runs: list[int]) -> list[list[Any]]:
    """``parts`` (one per shard, in manifest order) grouped by the dataset's runs (:func:`shards_and_runs`)."""
    if sum(runs) != len(parts):
        raise ValueError(f"{len(parts)} shard results for runs of {runs} shards")
    out, lo = [], 0
    for n in runs:
        out.append(parts[lo:lo + n])
        lo += n
    return out


def run_link(runs: list[dict], store: dict) -> dict:
    """The runs' combined tables linked as one table (:mod:`storage.linked_vectors`); one run's table as it is."""
    return link_vectors(open_store(store), [VectorTableRef.from_dict(r) for r in runs]).to_dict()


def run_combine_runs(parts: list[dict], runs: list[int], store: dict) -> dict:
    """The stage's output table: each run's shard tables combined, the runs linked. Why: a grown dataset's kept
    runs keep their combined tables (in a flow, cache hits of :func:`combine_embeddings`), so a growth writes its
    new run's features, not the pool's again."""
    return run_link([run_combine(group, store) for group in by_run(parts, runs)], store)


def run_embed(dataset: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
              device: str | None = None, progress: bool = False, pack: bool = True) -> dict:
    """All shards in sequence, the packs, then combined: the plain-function form of the stage (no task cache, so
    every shard is looked up in the catalog; unchanged ones embed nothing). The block size is ``device``'s
    (:func:`embed_model`). ``pack=False``: every shard embeds its own missing samples (the path before packing)."""
    return run_embed_counted(dataset, model, store, batch_size, device, progress, pack)[0]


def run_embed_counted(dataset: dict, model: dict[str, Any], store: dict, batch_size: int = 64,
                      device: str | None = None, progress: bool = False, pack: bool = True
                      ) -> tuple[dict, dict[str, int]]:
    """:func:`run_embed` and what it did: ``samples_embedded``, ``samples_reused``, ``packs``, ``tower_blocks``."""
    run = uuid.uuid4().hex
    model = embed_model(model, device)
    block_rows = feature_spec(model).block_rows
    options = {"batch_size": batch_size, "device": device, "progress": progress}
    counts = {"samples_embedded": 0, "samples_reused": 0, "packs": 0, "tower_blocks": 0}
    try:
        shards, runs = shards_and_runs(dataset, store)
        parts = [run_embed_shard(sh, model, store, catalog_run=run, pack_below=block_rows if pack else 0,
                                 **options) for sh in shards]
        for members in pack_members(parts, block_rows):
            packed = run_embed_pack([parts[i]["pending"] for i in members], model, store, catalog_run=run,
                                    **options)
            _count_pack(counts, packed)
            for i in members:
                parts[i] = run_embed_assemble(shards[i], parts[i]["pending"], packed["delta"], model, store,
                                              catalog_run=run, **options)
    finally:
        _release_catalogs(run)
    for part in parts:
        _count_part(counts, part)
    return run_combine_runs(parts, runs, store), counts


@task(name="embed", cache_policy=ContentCache(code_version=CODE_VERSION,
                                              ignore=("batch_size", "device", "progress", "catalog_run",
                                                      "max_pixels", "decode_workers")),
      persist_result=True, result_serializer="json", **RETRY)
def embed_shard(shard: dict, model: dict[str, Any], store: dict, batch_size: int = 64, device: str | None = None,
                progress: bool = False, catalog_run: str | None = None, max_pixels: int = MAX_PIXELS,
                decode_workers: int | None = None, pack_below: int = 0) -> dict:
    """Prefect task: the features of one dataset shard, or its pending samples (``pack_below``, in the key: the
    result's shape depends on it). ``catalog_run``, not in the cache key, groups the shards of one run so that
    they list the feature catalog once; ``max_pixels``, not in it either, is the ingest's limit: the images in
    the dataset passed it, and their features do not depend on it; nor do they depend on ``decode_workers``."""
    return run_embed_shard(shard, model, store, batch_size, device, progress, catalog_run, max_pixels,
                           decode_workers, pack_below)


_OPTIONS = ("batch_size", "device", "progress", "catalog_run", "max_pixels", "decode_workers")


@task(name="embed-pack", cache_policy=ContentCache(code_version=CODE_VERSION, ignore=_OPTIONS),
      persist_result=True, result_serializer="json", **RETRY)
def embed_pack(pendings: list[dict], model: dict[str, Any], store: dict, batch_size: int = 64,
               device: str | None = None, progress: bool = False, catalog_run: str | None = None,
               max_pixels: int = MAX_PIXELS, decode_workers: int | None = None) -> dict:
    """Prefect task: the pending samples of consecutive shards, embedded in full blocks and catalogued."""
    return run_embed_pack(pendings, model, store, batch_size, device, progress, catalog_run, max_pixels,
                          decode_workers)


@task(name="embed-assemble", cache_policy=ContentCache(code_version=CODE_VERSION, ignore=(*_OPTIONS, "delta")),
      persist_result=True, result_serializer="json", **RETRY)
def embed_assemble(shard: dict, pending: dict, delta: dict | None, model: dict[str, Any], store: dict,
                   batch_size: int = 64, device: str | None = None, progress: bool = False,
                   catalog_run: str | None = None, max_pixels: int = MAX_PIXELS,
                   decode_workers: int | None = None) -> dict:
    """Prefect task: the table of a shard whose pending samples a pack embedded (``delta``, where to find them,
    is not in the cache key: the table is a function of the shard's content and the model)."""
    return run_embed_assemble(shard, pending, delta, model, store, catalog_run, batch_size=batch_size,
                              device=device, progress=progress, max_pixels=max_pixels,
                              decode_workers=decode_workers)


@task(name="embed-combine", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def combine_embeddings(parts: list[dict], store: dict) -> dict:
    """Prefect task: shard feature tables (a dataset's, or one run's) as one table."""
    return run_combine(parts, store)


@task(name="embed-link", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def link_embeddings(runs: list[dict], store: dict) -> dict:
    """Prefect task: the runs' combined feature tables linked as one table (a small manifest)."""
    return run_link(runs, store)


def embed_with_counts(dataset: dict, model: dict[str, Any], store: dict, opts: dict, batch_size: int = 64,
                      progress: bool = False, max_pixels: int = MAX_PIXELS,
                      decode_workers: int | None = None) -> tuple[dict, dict[str, Any]]:
    """:func:`embed`, also returning what this run did: ``shards``, ``shards_cached`` (task cache hits),
    ``samples_cached`` (their rows), ``samples_embedded`` (through the tower), ``samples_reused`` (from the
    feature catalog), ``packs`` (embed-pack tasks run) and ``tower_blocks`` (forward passes of ``block_rows``
    images), and how the features are computed: ``precision`` and ``block_rows`` (the feature spec's).
    Call inside a flow."""
    run = uuid.uuid4().hex
    model = embed_model(model)  # this machine's block size, in the tasks' cache keys
    spec = feature_spec(model)
    shards, runs = shards_and_runs(dataset, store)
    options = {"batch_size": batch_size, "progress": progress, "catalog_run": run, "max_pixels": max_pixels,
               "decode_workers": decode_workers}
    window = shard_task_window()  # shard tasks in flight at a time (Prefect's thread pool has no bound)
    shard_task = embed_shard.with_options(**opts)
    futures = submit_windowed(lambda sh: shard_task.submit(sh, model, store, pack_below=spec.block_rows, **options),
                              shards, window)
    counts: dict[str, Any] = {"shards": len(shards), "shards_cached": 0, "samples_cached": 0, "samples_embedded": 0,
                              "samples_reused": 0, "packs": 0, "tower_blocks": 0, "precision": spec.precision,
                              "block_rows": spec.block_rows}
    try:
        results = [f.result() for f in futures]
        finals = list(futures)
        packs = pack_members(results, spec.block_rows)
        pack_task, assemble_task = embed_pack.with_options(**opts), embed_assemble.with_options(**opts)
        pack_futures = submit_windowed(lambda members: pack_task.submit([results[i]["pending"] for i in members],
                                                                        model, store, **options), packs, window)
        changed = [i for members in packs for i in members]
        deltas = (pack_future.result()["delta"] for pack_future in pack_futures)  # one result read per pack
        # Each changed shard with its pack's delta, read lazily: a pack's shards are assembled once it is done.
        shard_deltas = ((i, delta) for members, delta in zip(packs, deltas, strict=True) for i in members)
        assembled = submit_windowed(lambda item: assemble_task.submit(
            shards[item[0]], results[item[0]]["pending"], item[1], model, store, **options), shard_deltas, window)
        for i, future in zip(changed, assembled, strict=True):
            results[i], finals[i] = future.result(), future
    finally:  # shards that ran in this process shared one catalog; the run is over
        _release_catalogs(run)
    for pack_future in pack_futures:
        if pack_future.state.name != "Cached":  # a cached result describes the run that computed it
            _count_pack(counts, pack_future.result())
    for shard, future, result in zip(shards, finals, results, strict=True):
        if future.state.name == "Cached":
            counts["shards_cached"] += 1
            counts["samples_cached"] += shard["num_rows"]
        else:
            _count_part(counts, result)
    _logger().info("embed: %(samples_embedded)d samples embedded in %(tower_blocks)d blocks (%(packs)d packs), "
                   "%(samples_reused)d reused from the feature catalog, %(samples_cached)d in %(shards_cached)d of "
                   "%(shards)d shards cached", counts)
    tables = [_vectors_of(r) for r in results]
    combine_task = combine_embeddings.with_options(**opts)
    futures = submit_windowed(lambda group: combine_task.submit(group, store), by_run(tables, runs),
                              window)  # a kept run's: a cache hit
    run_tables = [f.result() for f in futures]
    combined = run_tables[0] if len(run_tables) == 1 else link_embeddings.with_options(**opts)(run_tables, store)
    return combined, counts


def embed(dataset: dict, model: dict[str, Any], store: dict, opts: dict, batch_size: int = 64,
          progress: bool = False) -> dict:
    """Submit one ``embed`` task per shard (a window of them in flight: :mod:`tasks.shard_window`), then combine:
    call inside a flow.
    ``progress`` shows a bar per shard (not part of the cache key)."""
    return embed_with_counts(dataset, model, store, opts, batch_size=batch_size, progress=progress)[0]
