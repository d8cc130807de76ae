"""Stage "finetune": on the selected samples only — a linear probe on their features (LP), or the last k blocks
of the open_clip image tower with a head (FT). Weights are saved as deterministic safetensors with their hash.

The probe's strength C, and the FT epoch, are chosen on the validation split (never the test split).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from skmm.finetune import LastLayersFinetuner, LinearProbe
from skmm.gradients import normalize_features
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, read_vectors
from storage.sample_reader import iter_metadata, read_images
from storage.selections import read_selection
from tasks.cache import ContentCache
from tasks.retry import RETRY
from tasks.sketch import clip_spec, pool_ids
from tasks.store import open_store

__all__ = ["STRENGTHS", "finetune_last_layers", "linear_probe", "run_finetune_last_layers", "run_linear_probe"]

CODE_VERSION = "finetune-lp-1"
FT_CODE_VERSION = "finetune-ft-3"  # ft-3: 16-bit, I and F images decoded faithfully (skmm.models.clip)
STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


def run_linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict,
                     strengths: list[float] | None = None, task: str = "classification") -> dict:
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    train_ids, train_labels = pool_ids(st, ds, "train")
    label_of = dict(zip(train_ids, train_labels, strict=True))
    missing = [s for s in chosen if s not in label_of]
    if missing:
        raise ValueError(f"{len(missing)} selected samples are not in the dataset's train split (first {missing[0]})")
    y = [label_of[s] for s in chosen]
    if any(label is None for label in y):
        raise ValueError("selected samples have no label: the linear probe needs labels for the coreset")
    val_ids, val_labels = pool_ids(st, ds, "val")
    grid = list(strengths or STRENGTHS)
    if len(grid) > 1 and not val_ids:
        raise ValueError("choosing the probe strength needs a val split; pass a single strength instead")
    wanted = chosen + (val_ids if len(grid) > 1 else [])
    _, vectors = read_vectors(st, emb, sample_ids=wanted)  # one read for the coreset and the val rows
    X = vectors[:len(chosen)]
    X_val = normalize_features(vectors[len(chosen):]) if len(grid) > 1 else None
    probe = LinearProbe(task=task, strengths=grid).fit(normalize_features(X), y, X_val,
                                                        val_labels if X_val is not None else None)
    ref = st.put_bytes(probe.to_bytes(), "model", ".safetensors")
    return {"model": ref.to_dict(), "strength": probe.strength_,
            "validation_scores": {repr(k): v for k, v in probe.validation_scores_.items()}}


@task(name="finetune-linear-probe", cache_policy=ContentCache(code_version=CODE_VERSION), persist_result=True,
      result_serializer="json", **RETRY)
def linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict,
                 strengths: list[float] | None = None, task: str = "classification") -> dict:
    """Prefect task wrapper of :func:`run_linear_probe`."""
    return run_linear_probe(embeddings, dataset, selection, store, strengths, task)


def _selected_images(st: Any, ds: DatasetRef, chosen: list[str]) -> tuple[list[bytes], list[str], list, list, list]:
    """The chosen samples' images and labels, the val split's, and the dataset's classes.

    Metadata first (ids, labels, splits: no image bytes, verified by the dataset version), then the images of the
    chosen and val samples only (each verified by its id): never the whole pool in memory."""
    wanted = pa.array(chosen, pa.string())
    picked, val, classes = [], [], set()
    for part in iter_metadata(st, ds):
        classes.update(pc.unique(part.column("label").drop_null()).to_pylist())
        picked.append(part.filter(pc.and_(pc.is_in(part.column("sample_id"), value_set=wanted),
                                          pc.equal(part.column("split"), "train"))))
        val.append(part.filter(pc.equal(part.column("split"), "val")))
    label_of = dict(zip(*(pa.concat_tables(picked).column(c).to_pylist() for c in ("sample_id", "label")),
                        strict=True))
    missing = [s for s in chosen if s not in label_of]
    if missing:
        raise ValueError(f"{len(missing)} selected samples are not in the dataset's train split (first {missing[0]})")
    ys = [label_of[s] for s in chosen]
    if any(y is None for y in ys):
        raise ValueError("selected samples have no label: finetuning needs labels for the coreset")
    val_table = pa.concat_tables(val)
    val_ids = val_table.column("sample_id")
    found = read_images(st, ds, pa.concat_arrays([wanted, val_ids.combine_chunks()]))
    data_of = dict(zip(found.column("sample_id").to_pylist(), found.column("data").to_pylist(), strict=True))
    images = [data_of[s] for s in chosen]
    val_images = [data_of[s] for s in val_ids.to_pylist()]
    return images, ys, val_images, val_table.column("label").to_pylist(), sorted(classes)


def run_finetune_last_layers(dataset: dict, selection: dict, store: dict, model: dict[str, Any], k: int = 1,
                             epochs: int = 5, lr: float = 1e-4, head_lr: float = 1e-2, batch_size: int = 32,
                             seed: int = 0, device: str | None = None) -> dict:
    """Train the last ``k`` tower blocks + head on the selection; keep the best epoch on the val split."""
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    images, ys, val_images, val_ys, classes = _selected_images(st, ds, chosen)
    ft = LastLayersFinetuner(clip_spec(model), k=k, epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size,
                             seed=seed, device=device)
    ft.fit(images, ys, val_images or None, val_ys or None, classes=classes)  # the head the gradients saw
    ref = st.put_bytes(ft.state_bytes(), "model", ".safetensors")
    return {"model": ref.to_dict(), "best_epoch": ft.best_epoch_, "best_val_accuracy": ft.best_val_accuracy_}


@task(name="finetune-last-layers", cache_policy=ContentCache(code_version=FT_CODE_VERSION, ignore=("device",)),
      persist_result=True, result_serializer="json", **RETRY)
def finetune_last_layers(dataset: dict, selection: dict, store: dict, model: dict[str, Any], k: int = 1,
                         epochs: int = 5, lr: float = 1e-4, head_lr: float = 1e-2, batch_size: int = 32,
                         seed: int = 0, device: str | None = None) -> dict:
    """Prefect task wrapper of :func:`run_finetune_last_layers`."""
    return run_finetune_last_layers(dataset, selection, store, model, k, epochs, lr, head_lr, batch_size, seed,
                                    device)
