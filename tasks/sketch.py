"""Stage "gradients + sketch": per-sample gradients of the pool (train split), sketched with a seeded projector.

LP mode: the gradient of a linear head w.r.t. its weights is the L2-normalised feature (SKMM.md §2), so the
gradients are the normalised embeddings, sketched to ``sketch_dim`` with a Gaussian projector when ``sketch_dim`` <
d, one table per run of the dataset (a grown dataset's kept runs: cache hits) linked as one. Each row is projected
in a zero-padded block of exactly LP_BLOCK rows, so a row's bits do not depend on which block or run it falls in:
the linked sketch of a grown dataset is bitwise the sketch of the same pool written at once. FT mode: per-sample
cross-entropy gradients, with seeded random pseudo-labels, w.r.t. the last ``k`` blocks of the open_clip image
tower plus a seeded head, projected batch by batch with one sparse JL sketch (r is in the millions; the N×r matrix
never exists). The sketch table records its producer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from skmm.gradients import normalize_features
from skmm.gradients.clip_ft import ft_gradient_sketch
from skmm.models.clip import ClipSpec
from skmm.select.auto_sketch import reblock
from skmm.sketch import GaussianProjector
from storage.datasets import (
    ID_DTYPE,
    DatasetRef,
    ShardRef,
    VectorTableRef,
    combine_vectors,
    is_linked,
    load_manifest,
    read_shard,
    sample_id_array,
    scan_vector_rows,
    write_vector_chunks,
    write_vectors,
)
from storage.errors import MalformedRecordError
from storage.linked_vectors import link_vectors, linked_parts
from storage.sample_reader import fill_ids, iter_metadata, iter_shard, read_images, read_metadata, read_split_ids
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.shard_window import shard_task_window, submit_windowed
from tasks.store import open_store

__all__ = ["combine_sketches", "ft_sketch_shard", "gradients_sketch", "link_sketches", "lp_sketch_parts",
           "lp_sketch_run", "run_combine_sketches", "run_ft_sketch_shard", "run_lp_sketch_run", "run_sketch",
           "sketch", "train_ids", "train_rows"]

CODE_VERSION = "sketch-3"  # 3: each LP block projected zero-padded to LP_BLOCK rows (a row's bits: its own alone)
LP_RUN_CODE_VERSION = "lp-sketch-run-1"  # LP, one run of the dataset
FT_CODE_VERSION = "ft-sketch-2"  # FT gradients shard by shard; 2: shards sketched concurrently under 1 could come
# from another random-init tower (a head init drew from the generator inside another shard's seeded build), and
# rows are now bitwise independent of their shard (eval mode in every batch, each batch zero-padded to the size)
MODES = ("lp", "ft")
# LP rows projected per matrix product. Every product has exactly this many rows (the last block zero-padded):
# BLAS gives a row of a product of fixed shape the same bits wherever it sits (measured on MKL and OpenBLAS; a
# product of one row takes another path and differs), so a row's sketch does not depend on its block or run.
LP_BLOCK = 8192


def split_columns(store: Any, dataset: DatasetRef, split: str, columns: list[str]) -> dict[str, list]:
    """``columns`` of the rows of one split, as lists, in the dataset's (sorted) order.

    The ids, labels and splits are read without the image bytes (verified by the dataset version); with ``data``
    among ``columns``, only the split's images are read then (each verified by its id)."""
    meta = read_metadata(store, dataset, sorted({"sample_id", *columns} - {"data"}), split=split)
    out = {c: meta.column(c).to_pylist() for c in columns if c != "data"}
    if "data" in columns:
        images = read_images(store, dataset, meta.column("sample_id"))
        out["data"] = images.column("data").to_pylist()  # both in sample-id order, one row per id
    return out


def pool_ids(store: Any, dataset: DatasetRef, split: str = "train") -> tuple[list[str], list[str | None]]:
    """Sample ids and labels of one split, in the dataset's (sorted) order."""
    cols = split_columns(store, dataset, split, ["sample_id", "label"])
    return cols["sample_id"], cols["label"]


def clip_spec(model: dict[str, Any]) -> ClipSpec:
    """The ClipSpec of the pipeline's model config (name, pretrained, init_seed)."""
    return ClipSpec(model=model["name"], pretrained=model.get("pretrained"), init_seed=model.get("init_seed", 0))


def dataset_num_classes(store: Any, dataset: DatasetRef) -> int:
    """The number of distinct labels of the dataset (the FT head's width), read from the label column."""
    classes: set[str] = set()
    for part in iter_metadata(store, dataset, ["label"]):
        classes.update(pc.unique(part.column("label").drop_null()).to_pylist())
    return max(len(classes), 2)


def run_ft_sketch_shard(shard: dict, store: dict, model: dict[str, Any], num_classes: int, sketch_dim: int,
                        seed: int = 0, k: int = 1, batch_size: int | None = None,
                        device: str | None = None) -> dict | None:
    """FT mode, one dataset shard: the sketched gradients of its train rows (None when it has none).

    A row depends on its image, id, the model, class count, seed and k, and on the batch it was computed in
    only through float rounding (~1e-7): the shards are fixed by the dataset, so a rerun, or the same shards
    on other workers, give the same rows. ``batch_size=None``: sized per device (32 on the CPU; see
    :func:`skmm.gradients.clip_ft.ft_batch_size`); like the device, it is not part of the cache key."""
    st = open_store(store)
    table = read_shard(st, ShardRef.from_dict(shard), columns=["sample_id", "split", "data"])
    train = table.filter(pc.equal(table.column("split"), "train"))
    if train.num_rows == 0:
        return None
    ids = train.column("sample_id").to_pylist()
    grads, producer = ft_gradient_sketch(train.column("data").to_pylist(), ids, clip_spec(model), k=k,
                                         num_classes=num_classes, sketch_dim=sketch_dim, seed=seed,
                                         batch_size=batch_size, device=device)
    return write_vectors(st, ids, grads, producer, kind="sketch").to_dict()


def run_ft_sketch(dataset: dict, store: dict, model: dict[str, Any], sketch_dim: int, seed: int = 0, k: int = 1,
                  batch_size: int | None = None, device: str | None = None, num_classes: int | None = None) -> dict:
    """FT mode: sketched per-sample gradients of the last ``k`` tower blocks + head (label-free), shard by shard
    (one shard's images in memory at a time), combined run by run and the runs linked (one run: one table)."""
    if sketch_dim is None:
        raise ValueError("FT gradients have millions of coordinates: give a sketch_dim")
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    classes = num_classes or dataset_num_classes(st, ds)  # metadata of the dataset, not a per-sample label
    runs = [[run_ft_sketch_shard(sh.to_dict(), store, model, classes, sketch_dim, seed, k, batch_size, device)
             for sh in run] for run in load_manifest(st, ds).shard_runs()]
    tables = [run_combine_sketches(parts, store) for parts in _train_parts(runs)]
    return link_vectors(st, [VectorTableRef.from_dict(t) for t in tables]).to_dict()


def _train_parts(runs: list[list[dict | None]]) -> list[list[dict]]:
    """The shard sketches of each run that has train rows (a shard without any gives None); ValueError if none."""
    out = [[p for p in parts if p is not None] for parts in runs]
    out = [parts for parts in out if parts]
    if not out:
        raise ValueError("the dataset has no train split to select from")
    return out


def run_combine_sketches(parts: list[dict], store: dict) -> dict:
    """Shard sketch tables (of a dataset, or of one of its runs) as one table."""
    return combine_vectors(open_store(store), [VectorTableRef.from_dict(p) for p in parts]).to_dict()


def run_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
               mode: str = "lp", model: dict[str, Any] | None = None, k: int = 1, batch_size: int = 32,
               device: str | None = None, num_classes: int | None = None) -> dict:
    """The stage as a plain function: LP (normalised features, Gaussian sketch) or FT (shard by shard)."""
    if mode not in MODES:
        raise ValueError(f"gradient mode must be one of {MODES}; got {mode!r}")
    if mode == "ft":
        if model is None:
            raise ValueError("FT gradients need the model config")
        return run_ft_sketch(dataset, store, model, sketch_dim, seed, k, batch_size, device, num_classes)
    return run_lp_sketch(embeddings, dataset, store, sketch_dim, seed)


def train_rows(store: Any, dataset: DatasetRef, labels: bool = False) -> tuple[np.ndarray, pa.ChunkedArray | None]:
    """The train split's sample ids as one sorted ``ID_DTYPE`` array (64 B a sample, no Python objects) and, with
    ``labels``, their labels (Arrow strings; else None): :func:`storage.sample_reader.read_split_ids`."""
    return read_split_ids(store, dataset, "train", labels=labels)


def train_ids(store: Any, dataset: DatasetRef) -> np.ndarray:
    """The train split's sample ids (:func:`train_rows` without the labels)."""
    return train_rows(store, dataset)[0]


def project_padded(proj: GaussianProjector, rows: np.ndarray) -> np.ndarray:
    """``proj.project(rows)`` for at most LP_BLOCK rows, computed in a product of exactly LP_BLOCK rows (zeros
    after ``rows``), so each row's bits are those it gets in any other LP_BLOCK-row block."""
    if len(rows) == LP_BLOCK:
        return proj.project(rows)
    padded = np.zeros((LP_BLOCK, rows.shape[1]), rows.dtype)
    padded[:len(rows)] = rows
    return proj.project(padded)[:len(rows)]


def _lp_blocks(store: Any, emb: VectorTableRef, ids: np.ndarray, proj: GaussianProjector | None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, gradient rows) of ``ids``, LP_BLOCK rows at a time: the embeddings read row group by row group,
    L2-normalised and (with ``proj``) projected block by block (:func:`project_padded`)."""
    rows = scan_vector_rows(store, emb, ids)
    for lo, block in reblock(rows, emb.dim, block_rows=LP_BLOCK):
        grads = normalize_features(block)
        yield ids[lo:lo + len(block)], grads if proj is None else project_padded(proj, grads)


def _lp_table(store: Any, emb: VectorTableRef, ids: np.ndarray, sketch_dim: int | None, seed: int) -> dict:
    """The LP sketch table of ``ids`` (sorted, unique, all in ``emb``): their normalised features, projected to
    ``sketch_dim`` when it is < d. Holds the ids (64 B a sample) and a few LP_BLOCK-row blocks."""
    proj = None
    if sketch_dim is not None and sketch_dim < emb.dim:
        proj = GaussianProjector(emb.dim, sketch_dim, seed).fit()
    producer = {"mode": "lp", "features": emb.producer_digest, "sketch": None if proj is None else proj.spec.to_dict()}
    return write_vector_chunks(store, _lp_blocks(store, emb, ids, proj), producer, kind="sketch").to_dict()


def run_train_ids(store: Any, shards: list[ShardRef]) -> np.ndarray:
    """The train rows' sample ids of one run of a dataset (its shards, in order), as one sorted ``ID_DTYPE``
    array: the id and split columns of each shard, never the image bytes. The shards are checked for size,
    footer and id order here; the dataset's version is verified where the split is selected from (tasks.select
    reads the split's ids verified, and the sketch's rows by them). One array sized by the run's rows and shrunk
    in place, as :func:`~storage.sample_reader.read_split_ids` fills the split's."""
    ids = np.empty(sum(sh.num_rows for sh in shards), ID_DTYPE)
    n = 0
    for shard in shards:
        for table in iter_shard(store, shard, ["split"]):
            n = fill_ids(ids, n, table.filter(pc.equal(table.column("split"), "train")).column("sample_id"))
    ids.resize(n, refcheck=False)
    if not np.all(ids[1:] > ids[:-1]):
        raise MalformedRecordError(f"the run of shards from {shards[0].artifact.uri} is not in strictly ascending "
                                   "sample-id order")
    return ids


def _run_first_id(store: Any, shard: ShardRef) -> bytes | None:
    """The first sample id of a run's first shard (one row group's id column), None when it has no rows."""
    for table in iter_shard(store, shard, []):
        if table.num_rows:
            return sample_id_array(table.column("sample_id").slice(0, 1))[0]
    return None


def lp_sketch_parts(store: Any, emb: VectorTableRef, dataset: DatasetRef
                    ) -> list[tuple[VectorTableRef, tuple[ShardRef, ...]]] | None:
    """(feature table, shards) for each run of ``dataset``: the table holding that run's features — for several
    runs, the part of the linked table that the embed stage combined from that run (matched by its first id and
    row count; one manifest read and one id column per run). None when the features are not per run (one table
    over a dataset of several runs, e.g. precomputed embeddings): then the split is sketched in one pass."""
    runs = load_manifest(store, dataset).shard_runs()
    if len(runs) == 1:
        return [(emb, runs[0])]
    if not is_linked(emb):
        return None
    by_first = {lo: part for part, lo, _ in linked_parts(store, emb)}
    out = []
    for run in runs:
        part = by_first.get(_run_first_id(store, run[0]))
        if part is None or part.num_rows != sum(sh.num_rows for sh in run):
            return None
        out.append((part, run))
    return out


def run_lp_sketch_run(features: dict, shards: list[dict], store: dict, sketch_dim: int | None = 64,
                      seed: int = 0) -> dict | None:
    """LP mode, one run of a dataset: the sketch table of its train rows (None when it has none) from the run's
    feature table — what a kept run's task (a cache hit) gives the next growth."""
    st = open_store(store)
    ids = run_train_ids(st, [ShardRef.from_dict(s) for s in shards])
    if not len(ids):
        return None
    return _lp_table(st, VectorTableRef.from_dict(features), ids, sketch_dim, seed)


def _train_tables(tables: list[dict | None]) -> list[dict]:
    """The runs' sketch tables that exist (None: a run without train rows); ValueError if there are none."""
    tables = [t for t in tables if t is not None]
    if not tables:
        raise ValueError("the dataset has no train split to select from")
    return tables


def _linked_sketch(store: dict, tables: list[dict | None]) -> dict:
    """The runs' sketch tables (None: a run without train rows) as one table; ValueError if there are none."""
    return link_vectors(open_store(store), [VectorTableRef.from_dict(t) for t in _train_tables(tables)]).to_dict()


def run_lp_sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0) -> dict:
    """LP mode, streamed: the train split's normalised features, sketched to ``sketch_dim`` when it is < d, run
    by run and the runs linked (:func:`lp_sketch_parts`; one run: one table).

    Holds a run's train ids (64 B a sample) and a few LP_BLOCK-row blocks, never the N × d features or their
    gradients; each row is bitwise what projecting the whole matrix in LP_BLOCK-row blocks gives."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    parts = lp_sketch_parts(st, emb, ds)
    if parts is None:  # one feature table over several runs: the split in one pass, its ids read verified
        ids = train_ids(st, ds)
        if not len(ids):
            raise ValueError("the dataset has no train split to select from")
        return _lp_table(st, emb, ids, sketch_dim, seed)
    return _linked_sketch(store, [run_lp_sketch_run(f.to_dict(), [sh.to_dict() for sh in run], store, sketch_dim,
                                                    seed) for f, run in parts])


@task(name="gradients-sketch",
      cache_policy=ContentCache(code_version=CODE_VERSION, ignore=("batch_size", "device")),
      persist_result=True, result_serializer="json", **RETRY)
def sketch(embeddings: dict, dataset: dict, store: dict, sketch_dim: int | None = 64, seed: int = 0,
           mode: str = "lp", model: dict[str, Any] | None = None, k: int = 1, batch_size: int = 32,
           device: str | None = None) -> dict:
    """Prefect task wrapper of :func:`run_sketch` (the LP stage; FT runs per shard, see :func:`gradients_sketch`)."""
    return run_sketch(embeddings, dataset, store, sketch_dim, seed, mode, model, k, batch_size, device)


@task(name="gradients-sketch-lp-run", cache_policy=ContentCache(code_version=LP_RUN_CODE_VERSION),
      persist_result=True, result_serializer="json", **RETRY)
def lp_sketch_run(features: dict, shards: list[dict], store: dict, sketch_dim: int | None = 64,
                  seed: int = 0) -> dict | None:
    """Prefect task: one run's LP sketch (:func:`run_lp_sketch_run`), keyed on the run's feature table and shards,
    so a grown dataset's kept runs are cache hits and a growth sketches only its new run."""
    return run_lp_sketch_run(features, shards, store, sketch_dim, seed)


@task(name="gradients-sketch-shard",
      cache_policy=ContentCache(code_version=FT_CODE_VERSION, ignore=("batch_size", "device")),
      persist_result=True, result_serializer="json", **RETRY)
def ft_sketch_shard(shard: dict, store: dict, model: dict[str, Any], num_classes: int, sketch_dim: int,
                    seed: int = 0, k: int = 1, batch_size: int | None = None,
                    device: str | None = None) -> dict | None:
    """Prefect task: one shard's sketched FT gradients (a unit a Dask worker can take)."""
    return run_ft_sketch_shard(shard, store, model, num_classes, sketch_dim, seed, k, batch_size, device)


@task(name="gradients-sketch-combine", cache_policy=ContentCache(code_version=FT_CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def combine_sketches(parts: list[dict], store: dict) -> dict:
    """Prefect task: shard sketch tables (a dataset's, or one run's) as one table."""
    if not parts:
        raise ValueError("the dataset has no train split to select from")
    return run_combine_sketches(parts, store)


@task(name="gradients-sketch-link", cache_policy=ContentCache(code_version=FT_CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def link_sketches(runs: list[dict], store: dict) -> dict:
    """Prefect task: the runs' combined sketch tables linked as one table (the one select reads)."""
    return link_vectors(open_store(store), [VectorTableRef.from_dict(r) for r in runs]).to_dict()


def gradients_sketch(embeddings: dict | None, dataset: dict, store: dict, opts: dict, *, sketch_dim: int | None,
                     seed: int, mode: str, model: dict[str, Any], k: int = 1, num_classes: int | None = None,
                     batch_size: int | None = None) -> dict:
    """The gradients + sketch stage inside a flow: LP as one task per run of the dataset (one task over the whole
    split when the features are not per run); FT as one task per dataset shard, a window of them in flight at a
    time (:mod:`tasks.shard_window`; on the flow's task runner: threads, or Dask workers), then combined run by
    run. Either way a grown dataset's kept runs are cache hits, and the runs' tables are linked
    (:mod:`storage.linked_vectors`)."""
    if mode not in MODES:
        raise ValueError(f"gradient mode must be one of {MODES}; got {mode!r}")
    if mode == "lp":
        st = open_store(store)
        parts = lp_sketch_parts(st, VectorTableRef.from_dict(embeddings), DatasetRef.from_dict(dataset))
        if parts is None:
            return sketch.with_options(**opts)(embeddings, dataset, store, sketch_dim=sketch_dim, seed=seed,
                                               mode=mode, model=model, k=k)
        run_task = lp_sketch_run.with_options(**opts)
        futures = submit_windowed(lambda part: run_task.submit(part[0].to_dict(), [sh.to_dict() for sh in part[1]],
                                                               store, sketch_dim, seed), parts, shard_task_window())
        tables = _train_tables([f.result() for f in futures])
        return tables[0] if len(tables) == 1 else link_sketches.with_options(**opts)(tables, store)
    if sketch_dim is None:
        raise ValueError("FT gradients have millions of coordinates: give a sketch_dim")
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    classes = num_classes or dataset_num_classes(st, ds)
    window = shard_task_window()  # shard tasks in flight at a time (Prefect's thread pool has no bound)
    shard_task, combine_task = ft_sketch_shard.with_options(**opts), combine_sketches.with_options(**opts)
    shard_runs = load_manifest(st, ds).shard_runs()
    flat = submit_windowed(lambda sh: shard_task.submit(sh.to_dict(), store, model, classes, sketch_dim, seed, k,
                                                        batch_size=batch_size),
                           [sh for run in shard_runs for sh in run], window)
    ends = itertools.accumulate(len(run) for run in shard_runs)
    runs = _train_parts([[f.result() for f in flat[a:b]] for a, b in itertools.pairwise([0, *ends])])
    combined = submit_windowed(lambda parts: combine_task.submit(parts, store), runs, window)
    tables = [f.result() for f in combined]
    return tables[0] if len(tables) == 1 else link_sketches.with_options(**opts)(tables, store)
