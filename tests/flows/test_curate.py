"""The curation flow end to end with real components: Prefect (test server), the tiny open_clip tower,
scikit-learn's digits, the local store and moto's S3, and the DuckDB lineage index."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pytest
from flow_helpers import FAST, state_names, task_states

from flows.curate import ModelConfig, SourceConfig, curate
from storage.index import LineageIndex
from tasks.store import open_store, store_spec


def object_mtimes(store_dir: pathlib.Path) -> dict[str, float]:
    objects = store_dir / "objects"
    return {str(p.relative_to(objects)): p.stat().st_mtime_ns for p in objects.rglob("*") if p.is_file()}


def test_curate_digits_local_cache_and_audit(prefect_server, tmp_path):
    store_dir = tmp_path / "store"
    args = {**FAST, "store_url": str(store_dir)}
    first = curate(**args, return_state=True)
    result = first.result()
    assert {r["method"] for r in result["results"]} == {"skmm_best", "uniform"}
    for r in result["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n_test"] > 100
    before = object_mtimes(store_dir)

    # Rerun: every stage is a cache hit, no artifact rewritten.
    second = curate(**args, return_state=True)
    names = state_names(second)
    assert names and set(names) == {"Cached"}, task_states(second)
    assert object_mtimes(store_dir) == before

    # Only the budget changes: ingest/embed/sketch hit, select/finetune/evaluate run.
    third = curate(**{**args, "budgets": [30]}, return_state=True)
    states = task_states(third)
    for stage in ("ingest", "embed", "gradients-sketch-lp-run"):
        assert states[stage] == ["Cached"], (stage, states)
    for stage in ("select", "finetune-linear-probe", "evaluate"):
        assert "Completed" in states[stage], (stage, states)
    ran = {stage for stage, names in states.items() if "Completed" in names}
    assert ran == {"select", "finetune-linear-probe", "evaluate", "report"}, states

    # Audit: the model's training samples are exactly its selection's ids.
    st = open_store(store_spec(store_dir))
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(st)
    from storage.artifacts import ArtifactRef
    from storage.selections import read_selection

    for r in third.result()["results"]:
        ids = sorted(read_selection(st, ArtifactRef.from_dict(r["selection"])).column("sample_id").to_pylist())
        got = sorted(index.samples_for_model(r["model"]["sha256"]).column("sample_id").to_pylist())
        assert got == ids and len(ids) == 30


def test_same_bytes_at_a_new_path_hit_the_ingest_cache(prefect_server, tmp_path):
    from sklearn.datasets import load_digits

    from storage.ingest import render_digit_png

    digits = load_digits()
    src = tmp_path / "pool"
    for i in range(120):
        folder = src / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(render_digit_png(digits.images[i], 32, "nearest"))
    args = {**FAST, "budgets": [10], "methods": ["uniform"], "store_url": str(tmp_path / "store")}
    curate(source=SourceConfig(kind="folder", path=str(src)), **args)
    moved = tmp_path / "moved" / "elsewhere"
    shutil.copytree(src, moved)
    again = curate(source=SourceConfig(kind="folder", path=str(moved)), **args, return_state=True)
    assert task_states(again)["ingest"] == ["Cached"]


def test_curate_on_s3(prefect_server, s3_bucket, monkeypatch):
    name, options = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    result = curate(**{**FAST, "methods": ["uniform"]}, store_url=f"s3://{name}/curation",
                    endpoint_url=options["endpoint_url"])
    assert result["store"].startswith("s3://") and result["results"][0]["accuracy"] > 0


def test_bad_input_fails_at_the_right_stage(prefect_server, tmp_path):
    store_dir = tmp_path / "store"
    with pytest.raises(Exception, match=r"does not exist|not found|missing"):
        curate(source=SourceConfig(kind="folder", path=str(tmp_path / "nope")), **FAST, store_url=str(store_dir))
    with pytest.raises(Exception, match="larger than the pool"):
        curate(**{**FAST, "budgets": [100_000]}, store_url=str(store_dir))
    st = open_store(store_spec(store_dir))
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(st)
    failed = index.failed_runs().to_pylist()
    stages = sorted(row["stage"] for row in failed)
    assert stages[0] == "ingest" and any(s.startswith("select.") for s in stages), failed


def test_unknown_model_and_method_are_clear_errors(prefect_server, tmp_path):
    with pytest.raises(Exception, match="unknown selection method"):
        curate(**{**FAST, "methods": ["nope"]}, store_url=str(tmp_path / "s"))
    with pytest.raises(Exception, match=r"unknown open_clip model .no-such-model."):
        curate(**{**FAST, "model": ModelConfig(name="no-such-model")}, store_url=str(tmp_path / "s"))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_reselect_and_reevaluate_from_an_earlier_run(prefect_server, tmp_path):
    from flows.rerun import reevaluate, reselect

    store = str(tmp_path / "store")
    first = curate(**{**FAST, "methods": ["uniform"]}, store_url=store)
    again = reselect(run=first, budgets=[25], methods=["skmm"], store_url=store, return_state=True)
    states = task_states(again)
    assert set(states) == {"select", "finetune-linear-probe", "evaluate", "report"}  # no ingest/embed/sketch
    (row,) = again.result()["results"]
    assert row["method"] == "skmm" and row["n"] == 25 and 0 <= row["accuracy"] <= 1
    redo = reevaluate(run=first, store_url=store)
    assert [r["accuracy"] for r in redo["results"]] == [r["accuracy"] for r in first["results"]]
    limited = reselect(run=first, budgets=[25], methods=["skmm_best"], val_limit=7, store_url=store)
    (row,) = limited["results"]  # skmm_best chose its variant on the val split's 7 smallest ids
    assert {v["n_val"] for v in row["val"].values()} == {7}

    gone = tmp_path / "store" / "objects" / "sketch"
    shutil.rmtree(gone)
    with pytest.raises(Exception, match="missing"):
        reselect(run=first, budgets=[25], methods=["uniform"], store_url=store)
    with pytest.raises(Exception, match="no 'sketch'"):
        reselect(run={"dataset": first["dataset"], "embeddings": first["embeddings"]}, budgets=[5], store_url=store)


def test_curate_ft_mode_gradients_and_last_layers(prefect_server, tmp_path):
    from flows.curate import FinetuneConfig

    result = curate(**{**FAST, "methods": ["skmm", "uniform"], "budgets": [30]}, gradients="ft",
                    source=SourceConfig(shard_rows=700),
                    finetune=FinetuneConfig(kind="last_layers", layers=1, epochs=2),
                    store_url=str(tmp_path / "store"), return_state=True)
    from skmm.finetune import model_format
    from storage.artifacts import ArtifactRef
    from storage.datasets import VectorTableRef

    out = result.result()
    st = open_store(store_spec(tmp_path / "store"))
    producer = VectorTableRef.from_dict(out["sketch"]).producer
    assert producer["mode"] == "ft" and producer["k"] == 1 and producer["sketch"]["output_dim"] == 16
    for r in out["results"]:
        assert model_format(st.get_bytes(ArtifactRef.from_dict(r["model"]))) == "skmm-last-layers/1"
        assert 0.0 <= r["accuracy"] <= 1.0
    states = task_states(result)
    assert "finetune-last-layers" in states and "embed" not in states  # FT + last layers need no features
    assert states["gradients-sketch-shard"] == ["Completed"] * 3  # one task per dataset shard
    assert out["embeddings"] is None


def test_embedding_is_sharded_and_independent_of_the_shard_count(prefect_server, tmp_path):
    args = {**FAST, "methods": ["uniform"], "store_url": str(tmp_path / "store")}
    one = curate(source=SourceConfig(kind="digits"), **args)
    three = curate(source=SourceConfig(kind="digits", shard_rows=700), **args, return_state=True)
    assert len(task_states(three)["embed"]) == 3  # one task per shard (run concurrently)
    # Same samples, bitwise the same features whatever the shard count (fixed-shape blocks, skmm.models.clip).
    from storage.datasets import VectorTableRef, read_vectors

    assert three.result()["dataset"]["version"] == one["dataset"]["version"]
    st = open_store(store_spec(tmp_path / "store"))
    ids_a, a = read_vectors(st, VectorTableRef.from_dict(one["embeddings"]))
    ids_b, b = read_vectors(st, VectorTableRef.from_dict(three.result()["embeddings"]))
    assert ids_a == ids_b
    assert np.array_equal(a, b), float(np.abs(a - b).max())


def test_regression_labels_from_precomputed_embeddings(prefect_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    table = pa.table({"embedding": pa.array(list(X.astype("float32")), type=pa.list_(pa.float32())),
                      "label": pa.array(y.astype(float))})
    pq.write_table(table, tmp_path / "pool.parquet")
    out = curate(source=SourceConfig(kind="embeddings", path=str(tmp_path / "pool.parquet")),
                 budgets=[60], methods=["skmm", "uniform"], seeds=[0], sketch_dim=8, task="regression",
                 store_url=str(tmp_path / "store"))
    for r in out["results"]:
        assert "mae" in r and "accuracy" not in r and 20 < r["mae"] < 100  # diabetes targets span 25–346
    assert "**mae**" in out["report"]["markdown"]
    with pytest.raises(Exception, match="regression labels need"):
        curate(source=SourceConfig(kind="embeddings", path=str(tmp_path / "pool.parquet")), budgets=[60],
               task="regression", class_balanced=True, store_url=str(tmp_path / "store"))


def test_s3_cache_is_shared_by_machines_through_the_store(prefect_server, s3_bucket, monkeypatch, tmp_path):
    """Two "machines" (own home and cache folders) on one s3:// store: the second run is all cache hits, served
    from JSON result records under the store's prefect-results/, and neither run writes results under a home."""
    import json

    import fsspec

    name, options = s3_bucket
    args = {**FAST, "methods": ["uniform"], "store_url": f"s3://{name}/curation",
            "endpoint_url": options["endpoint_url"]}
    runs = []
    for machine in ("a", "b"):
        home = tmp_path / machine
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
        runs.append(curate(**args, return_state=True))
        assert not (home / ".cache" / "skmm").exists() and not list(tmp_path.rglob("prefect-results"))
    first, second = (state_names(r) for r in runs)
    assert first and "Cached" not in first, task_states(runs[0])
    assert set(second) == {"Cached"} and len(second) == len(first), task_states(runs[1])

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    records = fs.find(f"{name}/curation/prefect-results")
    assert len(records) == len(first)  # one record per task run (each has its own key)
    for path in records:
        record = json.loads(fs.cat_file(path))
        assert record["metadata"]["serializer"]["type"] == "json"
