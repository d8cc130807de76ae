"""The model end (finetune, evaluate) in memory bounded independently of the pool: evaluation streams the split
in bounded batches, choices are made on a bounded val sample (the val split's ``val_limit`` smallest ids), and
on a small pool everything is what the whole-split code gave (a frozen copy of it below)."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image
from sklearn.datasets import load_digits

import tasks.evaluate as evaluate_module
import tasks.finetune as finetune_module
from skmm.finetune import LastLayersFinetuner, LinearProbe, evaluate_predictions, model_format
from skmm.gradients import normalize_features
from skmm.models import TINY_MODEL, ClipSpec
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef, read_vectors, sample_id, write_samples, write_vectors
from storage.ingest import render_digit_png
from storage.sample_reader import iter_metadata, read_images
from storage.selections import read_selection, write_selection
from tasks.evaluate import run_evaluate
from tasks.finetune import STRENGTHS, VAL_LIMIT, run_finetune_last_layers, run_linear_probe
from tasks.sketch import clip_spec, pool_ids, split_columns
from tasks.store import open_store

MODEL = {"name": TINY_MODEL, "pretrained": None, "init_seed": 0}
FT = dict(k=1, epochs=3, lr=1e-3, head_lr=1e-2, batch_size=16, seed=0, device="cpu")


# ---------------------------------------------------------------------------------------------- the old code
# Frozen copies of the whole-split implementations (tasks/finetune.py and tasks/evaluate.py before issue 8's
# model-end fix): the reference the streamed code must equal on small pools.
def old_evaluate(model: dict, embeddings: dict, dataset: dict, store: dict, split: str = "test") -> dict:
    st = open_store(store)
    data = st.get_bytes(ArtifactRef.from_dict(model))
    ds = DatasetRef.from_dict(dataset)
    last_layers = model_format(data) == "skmm-last-layers/1"
    rows = split_columns(st, ds, split, ["sample_id", "label", *(["data"] if last_layers else [])])
    ids, labels = rows["sample_id"], rows["label"]
    if last_layers:
        pred = LastLayersFinetuner.from_bytes(data).predict(rows["data"])
        return {**evaluate_predictions("classification", labels, pred), f"n_{split}": len(ids)}
    probe = LinearProbe.from_bytes(data)
    _, X = read_vectors(st, VectorTableRef.from_dict(embeddings), sample_ids=ids)
    return {**evaluate_predictions(probe.task, labels, probe.predict(normalize_features(X))), f"n_{split}": len(ids)}


def old_linear_probe(embeddings: dict, dataset: dict, selection: dict, store: dict, task: str = "classification"
                     ) -> tuple[bytes, dict]:
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    emb = VectorTableRef.from_dict(embeddings)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    train_ids, train_labels = pool_ids(st, ds, "train")
    label_of = dict(zip(train_ids, train_labels, strict=True))
    y = [label_of[s] for s in chosen]
    val_ids, val_labels = pool_ids(st, ds, "val")
    _, vectors = read_vectors(st, emb, sample_ids=chosen + val_ids)
    probe = LinearProbe(task=task, strengths=list(STRENGTHS)).fit(
        normalize_features(vectors[:len(chosen)]), y, normalize_features(vectors[len(chosen):]), val_labels)
    return probe.to_bytes(), {"strength": probe.strength_,
                              "validation_scores": {repr(k): v for k, v in probe.validation_scores_.items()}}


def old_selected_images(st, ds: DatasetRef, chosen: list[str]) -> tuple[list, list, list, list, list]:
    wanted = pa.array(chosen, pa.string())
    picked, val, classes = [], [], set()
    for part in iter_metadata(st, ds):
        classes.update(pc.unique(part.column("label").drop_null()).to_pylist())
        picked.append(part.filter(pc.and_(pc.is_in(part.column("sample_id"), value_set=wanted),
                                          pc.equal(part.column("split"), "train"))))
        val.append(part.filter(pc.equal(part.column("split"), "val")))
    label_of = dict(zip(*(pa.concat_tables(picked).column(c).to_pylist() for c in ("sample_id", "label")),
                        strict=True))
    ys = [label_of[s] for s in chosen]
    val_table = pa.concat_tables(val)
    val_ids = val_table.column("sample_id")
    found = read_images(st, ds, pa.concat_arrays([wanted, val_ids.combine_chunks()]))
    data_of = dict(zip(found.column("sample_id").to_pylist(), found.column("data").to_pylist(), strict=True))
    images = [data_of[s] for s in chosen]
    val_images = [data_of[s] for s in val_ids.to_pylist()]
    return images, ys, val_images, val_table.column("label").to_pylist(), sorted(classes)


def old_finetune_last_layers(dataset: dict, selection: dict, store: dict) -> tuple[bytes, dict]:
    st = open_store(store)
    ds = DatasetRef.from_dict(dataset)
    chosen = read_selection(st, ArtifactRef.from_dict(selection)).column("sample_id").to_pylist()
    images, ys, val_images, val_ys, classes = old_selected_images(st, ds, chosen)
    ft = LastLayersFinetuner(clip_spec(MODEL), **FT)
    ft.fit(images, ys, val_images or None, val_ys or None, classes=classes)
    return ft.state_bytes(), {"best_epoch": ft.best_epoch_, "best_val_accuracy": ft.best_val_accuracy_}


# ---------------------------------------------------------------------------------------------- the pool
def _noise_png(i: int, size: int = 96) -> bytes:
    """An incompressible RGB PNG (~28 KB at 96 px): image bytes that dominate what a read holds."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    """240 rendered digits (train 120 / val 60 / test 60) in shards of 32 rows, their pixel features as the
    embeddings, a 40-sample selection, and one fitted model of each kind in the store."""
    root = tmp_path_factory.mktemp("model-end")
    store = {"url": str(root / "store")}
    st = open_store(store)
    d = load_digits()
    n = 240
    images = [render_digit_png(d.images[i], 32, "nearest") for i in range(n)]
    labels = [str(int(v)) for v in d.target[:n]]
    splits = ["train" if i % 4 < 2 else ("val" if i % 4 == 2 else "test") for i in range(n)]
    dataset = write_samples(st, [{"data": b, "label": lab, "split": sp, "source_uri": f"file:///digits/{i}.png"}
                                 for i, (b, lab, sp) in enumerate(zip(images, labels, splits, strict=True))],
                            shard_rows=32)
    ids = [sample_id(b) for b in images]
    noise = np.random.default_rng(0).normal(0, 2, (n, 64))
    emb = write_vectors(st, ids, d.data[:n] + noise, {"model": "digits-pixels"})
    train = [s for s, sp in zip(ids, splits, strict=True) if sp == "train"]
    selection = write_selection(st, train[:40], method="test")
    lp = run_linear_probe(emb.to_dict(), dataset.to_dict(), selection.to_dict(), store)
    ft = run_finetune_last_layers(dataset.to_dict(), selection.to_dict(), store, MODEL, **FT)
    return {"store": store, "dataset": dataset.to_dict(), "emb": emb.to_dict(), "selection": selection.to_dict(),
            "lp": lp, "ft": ft, "ids": ids, "labels": labels, "splits": splits, "images": images}


def _bytes(pool: dict, ref: dict) -> bytes:
    return open_store(pool["store"]).get_bytes(ArtifactRef.from_dict(ref))


# ---------------------------------------------------------------------------------------------- same as before
@pytest.mark.parametrize("kind", ["lp", "ft"])
@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluate_gives_the_whole_split_metrics(pool, kind, split):
    """On a pool whose val split fits the limit, the streamed evaluation is the old dict, to the bit."""
    args = (pool[kind]["model"], pool["emb"], pool["dataset"], pool["store"])
    old = old_evaluate(*args, split=split)
    assert run_evaluate(*args, split=split) == old
    assert run_evaluate(*args, split=split, val_limit=None) == old
    assert old[f"n_{split}"] == 60


def test_evaluate_streams_in_small_batches_with_the_same_metrics(pool, monkeypatch):
    """Batches smaller than the split (and than a feature row group) change nothing."""
    monkeypatch.setattr(evaluate_module, "EVAL_IMAGES", 20)  # rounded down to 16: the model's batch size
    monkeypatch.setattr(evaluate_module, "PROBE_ROWS", 7)
    for kind in ("lp", "ft"):
        args = (pool[kind]["model"], pool["emb"], pool["dataset"], pool["store"])
        assert run_evaluate(*args) == old_evaluate(*args)


def test_finetune_gives_the_old_models(pool):
    """The val split (60 rows) is under the limit: the same weights, strength, epoch as the whole-split code."""
    lp_bytes, lp_info = old_linear_probe(pool["emb"], pool["dataset"], pool["selection"], pool["store"])
    assert _bytes(pool, pool["lp"]["model"]) == lp_bytes
    assert {k: pool["lp"][k] for k in lp_info} == lp_info and pool["lp"]["n_val"] == 60
    ft_bytes, ft_info = old_finetune_last_layers(pool["dataset"], pool["selection"], pool["store"])
    assert _bytes(pool, pool["ft"]["model"]) == ft_bytes
    assert {k: pool["ft"][k] for k in ft_info} == ft_info and pool["ft"]["n_val"] == 60


# ---------------------------------------------------------------------------------------------- the val sample
def _smallest_val(pool: dict, k: int) -> tuple[list[str], list[str]]:
    rows = sorted((s, lab) for s, lab, sp in zip(pool["ids"], pool["labels"], pool["splits"], strict=True)
                  if sp == "val")[:k]
    return [s for s, _ in rows], [lab for _, lab in rows]


def test_choices_use_the_val_limit_smallest_ids(pool):
    st = open_store(pool["store"])
    val_ids, val_labels = _smallest_val(pool, 9)
    # the probe: C chosen on exactly those 9 rows
    lp = run_linear_probe(pool["emb"], pool["dataset"], pool["selection"], pool["store"], val_limit=9)
    chosen = read_selection(st, ArtifactRef.from_dict(pool["selection"])).column("sample_id").to_pylist()
    _, vectors = read_vectors(st, VectorTableRef.from_dict(pool["emb"]), sample_ids=chosen + val_ids)
    label_of = dict(zip(pool["ids"], pool["labels"], strict=True))
    probe = LinearProbe(strengths=list(STRENGTHS)).fit(normalize_features(vectors[:40]), [label_of[s] for s in chosen],
                                                       normalize_features(vectors[40:]), val_labels)
    assert _bytes(pool, lp["model"]) == probe.to_bytes() and lp["n_val"] == 9
    assert lp["validation_scores"] == {repr(k): v for k, v in probe.validation_scores_.items()}
    # evaluate(split="val"): the same 9 rows; the test split ignores the limit
    for kind in ("lp", "ft"):
        data = _bytes(pool, pool[kind]["model"])
        if kind == "lp":
            _, X = read_vectors(st, VectorTableRef.from_dict(pool["emb"]), sample_ids=val_ids)
            pred = LinearProbe.from_bytes(data).predict(normalize_features(X))
        else:
            images = dict(zip(pool["ids"], pool["images"], strict=True))
            pred = LastLayersFinetuner.from_bytes(data).predict([images[s] for s in val_ids])
        args = (pool[kind]["model"], pool["emb"], pool["dataset"], pool["store"])
        assert run_evaluate(*args, split="val", val_limit=9) == {
            **evaluate_predictions("classification", val_labels, pred), "n_val": 9}
        assert run_evaluate(*args, split="test", val_limit=9) == old_evaluate(*args, split="test")


def test_finetune_reads_only_the_coreset_and_the_val_sample(pool, monkeypatch):
    """FT asks the image reader for the coreset plus val_limit images — not the whole val split (the old code
    asked for all 60) — and picks its epoch on them."""
    asked: list[int] = []
    real = finetune_module.read_images

    def counting(store, dataset, sample_ids):
        asked.append(len(sample_ids))
        return real(store, dataset, sample_ids)

    monkeypatch.setattr(finetune_module, "read_images", counting)
    out = run_finetune_last_layers(pool["dataset"], pool["selection"], pool["store"], MODEL, **FT, val_limit=9)
    assert asked == [40 + 9] and out["n_val"] == 9
    val_ids, val_labels = _smallest_val(pool, 9)
    images = dict(zip(pool["ids"], pool["images"], strict=True))
    chosen = read_selection(open_store(pool["store"]), ArtifactRef.from_dict(pool["selection"])).column(
        "sample_id").to_pylist()
    label_of = dict(zip(pool["ids"], pool["labels"], strict=True))
    ft = LastLayersFinetuner(clip_spec(MODEL), **FT).fit(
        [images[s] for s in chosen], [label_of[s] for s in chosen], [images[s] for s in val_ids], val_labels,
        classes=sorted(set(pool["labels"])))
    assert _bytes(pool, out["model"]) == ft.state_bytes()
    assert out["best_epoch"] == ft.best_epoch_


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_val_limit_must_be_a_positive_integer(pool, bad):
    args = (pool["lp"]["model"], pool["emb"], pool["dataset"], pool["store"])
    with pytest.raises(ValueError, match="val_limit must be a positive integer"):
        run_evaluate(*args, split="val", val_limit=bad)
    with pytest.raises(ValueError, match="val_limit must be a positive integer"):
        run_linear_probe(pool["emb"], pool["dataset"], pool["selection"], pool["store"], val_limit=bad)
    with pytest.raises(ValueError, match="val_limit must be a positive integer"):
        run_finetune_last_layers(pool["dataset"], pool["selection"], pool["store"], MODEL, **FT, val_limit=bad)


def test_the_tasks_take_val_limit_and_the_code_versions_moved():
    """val_limit is a parameter of the Prefect tasks (so it is part of their cache keys)."""
    import inspect

    from tasks.evaluate import CODE_VERSION, evaluate
    from tasks.finetune import CODE_VERSION as LP_VERSION
    from tasks.finetune import FT_CODE_VERSION, finetune_last_layers, linear_probe

    for t in (evaluate, linear_probe, finetune_last_layers):
        assert inspect.signature(t.fn).parameters["val_limit"].default == VAL_LIMIT == 10_000
    assert (CODE_VERSION, LP_VERSION, FT_CODE_VERSION) == ("evaluate-3", "finetune-lp-2", "finetune-ft-4")


# ---------------------------------------------------------------------------------------------- bounded memory
@pytest.fixture(scope="module")
def big_images(tmp_path_factory) -> dict:
    """400 incompressible 96-px PNG test images (~28 KB each, 11 MB in all), 8 training ones, and a last-layers
    model trained on the 8."""
    store = {"url": str(tmp_path_factory.mktemp("big") / "store")}
    st = open_store(store)
    images = [_noise_png(i) for i in range(408)]
    labels = [str(i % 2) for i in range(408)]
    dataset = write_samples(st, [{"data": b, "label": lab, "split": "train" if i < 8 else "test",
                                  "source_uri": f"file:///noise/{i}.png"}
                                 for i, (b, lab) in enumerate(zip(images, labels, strict=True))], shard_rows=64)
    ft = LastLayersFinetuner(ClipSpec(TINY_MODEL), **{**FT, "epochs": 1}).fit(images[:8], labels[:8])
    model = st.put_bytes(ft.state_bytes(), "model", ".safetensors")
    return {"store": store, "dataset": dataset.to_dict(), "model": model.to_dict(),
            "test_bytes": sum(len(b) for b in images[8:])}


def _peak_python_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_last_layers_evaluation_holds_one_batch_of_images(big_images, monkeypatch):
    """The model is asked for at most one batch of images at a time, and the Python objects alive at once (image
    bytes among them) stay a small fraction of the split's bytes: the whole-split code held every image at once
    (one call of 400 images, and at least the split's bytes: measured at issue 8: 11.8 MB for 11.1 MB)."""
    monkeypatch.setattr(evaluate_module, "EVAL_IMAGES", 16, raising=False)
    calls: list[int] = []
    real = LastLayersFinetuner.decision_function

    def counting(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(LastLayersFinetuner, "decision_function", counting)
    b = big_images
    new, new_peak = _peak_python_bytes(lambda: run_evaluate(b["model"], None, b["dataset"], b["store"]))
    assert new["n_test"] == 400 and max(calls) <= 16 and sum(calls) == 400, calls
    assert new_peak < 0.25 * b["test_bytes"], (new_peak, b["test_bytes"])


def test_probe_evaluation_predicts_in_bounded_blocks(pool, monkeypatch):
    monkeypatch.setattr(evaluate_module, "PROBE_ROWS", 25, raising=False)
    calls: list[int] = []
    real = LinearProbe.predict

    def counting(self, X):
        calls.append(len(X))
        return real(self, X)

    monkeypatch.setattr(LinearProbe, "predict", counting)
    args = (pool["lp"]["model"], pool["emb"], pool["dataset"], pool["store"])
    new = run_evaluate(*args)
    assert calls == [25, 25, 10]
    calls.clear()
    assert old_evaluate(*args) == new and calls == [60]


def test_regression_probe_metrics_are_the_old_ones(tmp_path):
    """A ridge probe on numeric labels: the same MAE streamed as on the whole split."""
    store = {"url": str(tmp_path / "store")}
    st = open_store(store)
    rng = np.random.default_rng(1)
    n = 90
    data = [hashlib.sha256(str(i).encode()).digest() * 4 for i in range(n)]
    X = rng.normal(size=(n, 8))
    y = X @ rng.normal(size=8)
    splits = ["train" if i % 3 == 0 else ("val" if i % 3 == 1 else "test") for i in range(n)]
    dataset = write_samples(st, [{"data": b, "label": f"{v:.6f}", "split": sp, "source_uri": f"file:///r/{i}"}
                                 for i, (b, v, sp) in enumerate(zip(data, y, splits, strict=True))], shard_rows=16)
    emb = write_vectors(st, [sample_id(b) for b in data], X, {"model": "regression"})
    probe = LinearProbe(task="regression").fit(normalize_features(X[::3]), y[::3])
    model = st.put_bytes(probe.to_bytes(), "model", ".safetensors").to_dict()
    for split in ("test", "val"):
        args = (model, emb.to_dict(), dataset.to_dict(), store)
        assert run_evaluate(*args, split=split) == old_evaluate(*args, split=split)
    small = run_evaluate(model, emb.to_dict(), dataset.to_dict(), store, split="val", val_limit=4)
    assert small["n_val"] == 4 and set(small) == {"mae", "n_val"}


def test_an_unlabelled_row_is_a_clear_error(tmp_path):
    store = {"url": str(tmp_path / "store")}
    st = open_store(store)
    d = load_digits()
    images = [render_digit_png(d.images[i], 16, "nearest") for i in range(12)]
    rows = [{"data": b, "label": (None if i == 11 else str(i % 2)), "split": "train" if i < 6 else "test",
             "source_uri": f"file:///d/{i}.png"}
            for i, b in enumerate(images)]
    dataset = write_samples(st, rows, shard_rows=8)
    emb = write_vectors(st, [sample_id(b) for b in images], np.random.default_rng(0).normal(size=(12, 4)), {"m": 1})
    probe = LinearProbe().fit(np.random.default_rng(1).normal(size=(6, 4)), [str(i % 2) for i in range(6)])
    model = st.put_bytes(probe.to_bytes(), "model", ".safetensors").to_dict()
    with pytest.raises(ValueError, match="1 rows of the test split have no label"):
        run_evaluate(model, emb.to_dict(), dataset.to_dict(), store)


def test_the_flow_and_the_cli_take_val_limit():
    """``skmm curate --val-limit N`` (0: the whole split) reaches the flow, whose default is the tasks'."""
    import inspect

    from typer.testing import CliRunner

    from flows.cli import app, curate_cmd, reselect_cmd
    from flows.curate import curate, select_finetune_evaluate
    from flows.rerun import reselect

    assert inspect.signature(curate.fn).parameters["val_limit"].default == VAL_LIMIT
    assert inspect.signature(select_finetune_evaluate).parameters["val_limit"].default == VAL_LIMIT
    assert inspect.signature(curate_cmd).parameters["val_limit"].default == VAL_LIMIT
    assert inspect.signature(reselect.fn).parameters["val_limit"].default == VAL_LIMIT
    assert inspect.signature(reselect_cmd).parameters["val_limit"].default == VAL_LIMIT
    out = CliRunner().invoke(app, ["curate", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--val-limit" in out.output
    bad = CliRunner().invoke(app, ["curate", "digits", "--val-limit", "-1"])
    assert bad.exit_code == 2 and "--val-limit" in bad.output
