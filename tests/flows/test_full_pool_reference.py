"""The opt-in full-pool reference: a model finetuned on every train sample, reported as the row and line the
budgets are measured against (method "full"); off by default, where the run's config is what it was."""

from __future__ import annotations

from flow_helpers import FAST

from flows.curate import curate
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef
from storage.selections import read_selection
from tasks.select import train_split
from tasks.store import open_store, store_spec


def test_the_full_pool_reference_trains_on_the_whole_train_split(prefect_server, tmp_path):
    store_dir = tmp_path / "store"
    result = curate(**{**FAST, "methods": ["uniform"]}, store_url=str(store_dir), full_pool_reference=True)
    st = open_store(store_spec(store_dir))
    train_ids, _ = train_split(st, DatasetRef.from_dict(result["dataset"]))

    (full,) = [r for r in result["results"] if r["method"] == "full"]
    assert full["n"] == len(train_ids) > 1000 and 0.0 <= full["accuracy"] <= 1.0
    chosen = read_selection(st, ArtifactRef.from_dict(full["selection"])).column("sample_id").to_pylist()
    assert len(set(chosen)) == len(train_ids)  # every train sample, once
    assert f"| full pool (n={len(train_ids)}) | {full['accuracy']:.4f} ± 0.0000 |" in result["report"]["markdown"]
    assert "| method | n=20 |" in result["report"]["markdown"]  # the reference is no budget column

    plain = curate(**{**FAST, "methods": ["uniform"]}, store_url=str(store_dir))
    assert [r["method"] for r in plain["results"]] == ["uniform"] and "full pool" not in plain["report"]["markdown"]
