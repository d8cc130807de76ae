"""Stage "finetune": on the selected samples only — a linear probe on their features (LP), or the last k blocks
of the open_clip image tower with a head (FT). Weights are saved as deterministic safetensors with their hash.

The probe's strength C, and the FT epoch, are chosen on the validation split (never the test split) — on its
``val_limit`` smallest sample ids (:data:`VAL_LIMIT` by default), so that memory is bounded by the coreset and that
sample, never by the pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from skmm.finetune import LastLayersFinetuner, LinearProbe
from skmm.gradients import normalize_features
from storage.artifacts import ArtifactRef
from storage.datasets import ID_DTYPE, DatasetRef, VectorTableRef, read_vector_matrix
from storage.sample_reader import check_limit, iter_metadata, read_images, split_head
from storage.selections import read_selection
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import clip_spec
from tasks.store import open_store

__all__ = ["STRENGTHS", "VAL_LIMIT", "finetune_last_layers", "linear_probe", "run_finetune_last_layers",
           "run_linear_probe"]

CODE_VERSION = "finetune-lp-2"  # lp-2: choices on the val sample of VAL_LIMIT smallest ids; n_val recorded
# ft-3: 16-bit, I and F images decoded faithfully (skmm.models.clip); ft-4: the best epoch on the val sample, n_val
FT_CODE_VERSION = "finetune-ft-4"
STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)
#: The val rows that choices are made on (the probe's C, the FT epoch, and the flow's evaluate(split="val")): the
#: val split's VAL_LIMIT smallest sample ids — a content-determined sample (ids are sha256 of the bytes), so
#: the choice costs the same at 10^7 images as at 10^5; None: the whole split.
VAL_LIMIT = 10_000


def _coreset_and_val(st: Any, ds: DatasetRef, chosen: list[str], val_limit: int | None
                     ) -> tuple[list, pa.Table, list]:
    """The chosen samples' labels (in ``chosen``'s order), the val sample (sample_id, label: the val split's
    ``val_limit`` smallest ids) and the dataset's classes, from one verified metadata pass.

    Holds the coreset's rows, at most ``val_limit`` val rows and one shard's metadata: never the pool's ids."""
    val_limit = check_limit(val_limit, "val_limit")
    wanted = pa.array(chosen, pa.string())
    picked, val, classes, left = [], [], set(), val_limit
    for part in iter_metadata(st, ds):
        classes.update(pc.unique(part.column("label").drop_null()).to_pylist())
        picked.append(part.filter(pc.and_(pc.is_in(part.column("sample_id"), value_set=wanted),
                                          pc.equal(part.column("split"), "train"))).select(["sample_id", "label"]))
        if left != 0:  # shards stream in ascending id order: the first val rows are the smallest ids
            rows, left = split_head(part, "val", left)
            val.append(rows)
    found = pa.concat_tables(picked) if picked else pa.table({"sample_id": pa.array([], pa.string()),
                                                              "label": pa.array([], pa.string())})
    label_of = dict(zip(*(found.column(c).to_pylist() for c in ("sample_id", "label")), strict=True))
    missing = [s for s in chosen if s not in label_of]
    if missing:
        raise ValueError(f"{len(missing)} selected samples are not in the dataset's train split (first {missing[0]})")
    val_table = pa.concat_tables(val) if val else found.schema.empty_table()
    return [label_of[s] for s in chosen], val_table, sorted(classes)


def run_linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict,
                     strengths: list[float] | None = None, task: str = "classification",
                     val_limit: int | None = VAL_LIMIT) -> dict:
    """A probe on the selected samples' normalised features; with several ``strengths``, the one scoring best
    on the val sample (the val split's ``val_limit`` smallest ids; None: the whole split), recorded as n_val.

    Memory: the coreset's and the val sample's features and labels, whatever the pool's size."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    y, val, _ = _coreset_and_val(st, ds, chosen, val_limit)
    if any(label is None for label in y):
        raise ValueError("selected samples have no label: the linear probe needs labels for the coreset")
    grid = list(strengths or STRENGTHS)
    if len(grid) > 1 and not val.num_rows:
        raise ValueError("choosing the probe strength needs a val split; pass a single strength instead")
    val_ids = val.column("sample_id").to_pylist() if len(grid) > 1 else []
    wanted = np.array(chosen + val_ids, dtype=ID_DTYPE).reshape(-1)
    vectors = read_vector_matrix(st, emb, wanted)  # one read for the coreset and the val rows
    X = vectors[:len(chosen)]
    X_val = normalize_features(vectors[len(chosen):]) if val_ids else None
    probe = LinearProbe(task=task, strengths=grid).fit(normalize_features(X), y, X_val,
                                                        val.column("label").to_pylist() if val_ids else None)
    ref = st.put_bytes(probe.to_bytes(), "model", ".safetensors")
    return {"model": ref.to_dict(), "strength": probe.strength_,
            "validation_scores": {repr(k): v for k, v in probe.validation_scores_.items()}, "n_val": len(val_ids)}


@task(name="finetune-linear-probe", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict,
                 strengths: list[float] | None = None, task: str = "classification",
                 val_limit: int | None = VAL_LIMIT) -> dict:
    """Prefect task wrapper of :func:`run_linear_probe`."""
    return run_linear_probe(embeddings, dataset, selection, store, strengths, task, val_limit)


def _selected_images(st: Any, ds: DatasetRef, chosen: list[str], val_limit: int | None = None
                     ) -> tuple[list[bytes], list[str], list, list, list]:
    """The chosen samples' images and labels, the val sample's (the val split's ``val_limit`` smallest ids; None:
    all of it), and the dataset's classes.

    Metadata first (ids, labels, splits: no image bytes, verified by the dataset version), then the images of the
    chosen and val samples only (each verified by its id): never the whole pool, nor the whole val split."""
    ys, val_table, classes = _coreset_and_val(st, ds, chosen, val_limit)
    if any(y is None for y in ys):
        raise ValueError("selected samples have no label: finetuning needs labels for the coreset")
    val_ids = val_table.column("sample_id")
    wanted = pa.array(chosen, pa.string())
    found = read_images(st, ds, pa.concat_arrays([wanted, *val_ids.chunks]))
    data_of = dict(zip(found.column("sample_id").to_pylist(), found.column("data").to_pylist(), strict=True))
    images = [data_of[s] for s in chosen]
    val_images = [data_of[s] for s in val_ids.to_pylist()]
    return images, ys, val_images, val_table.column("label").to_pylist(), classes


def run_finetune_last_layers(dataset: dict, selection: dict, store: dict, model: dict[str, Any], k: int = 1,
                             epochs: int = 5, lr: float = 1e-4, head_lr: float = 1e-2, batch_size: int = 32,
                             seed: int = 0, device: str | None = None, val_limit: int | None = VAL_LIMIT) -> dict:
    """Train the last ``k`` tower blocks + head on the selection; keep the best epoch on the val sample (the val
    split's ``val_limit`` smallest ids; None: the whole split), recorded as n_val.

    Memory: the coreset's and the val sample's images and prefix tokens, whatever the pool's size."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    images, ys, val_images, val_ys, classes = _selected_images(st, ds, chosen, val_limit)
    ft = LastLayersFinetuner(clip_spec(model), k=k, epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size,
                             seed=seed, device=device)
    ft.fit(images, ys, val_images or None, val_ys or None, classes=classes)  # the head the gradients saw
    ref = st.put_bytes(ft.state_bytes(), "model", ".safetensors")
    return {"model": ref.to_dict(), "best_epoch": ft.best_epoch_, "best_val_accuracy": ft.best_val_accuracy_,
            "n_val": len(val_images)}


@task(name="finetune-last-layers", cache_policy=ContentCache(code_version=FT_CODE_VERSION, ignore=("device",)),
      persist_result=True, result_serializer="json", **RETRY)
def finetune_last_layers(dataset: dict, selection: dict, store: dict, model: dict[str, Any], k: int = 1,
                         epochs: int = 5, lr: float = 1e-4, head_lr: float = 1e-2, batch_size: int = 32,
                         seed: int = 0, device: str | None = None, val_limit: int | None = VAL_LIMIT) -> dict:
    """Prefect task wrapper of :func:`run_finetune_last_layers`."""
    return run_finetune_last_layers(dataset, selection, store, model, k, epochs, lr, head_lr, batch_size, seed,
                                    device, val_limit)
