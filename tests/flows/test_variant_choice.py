"""skmm_best's variant chosen on the val split, through the real curate flow (tiny tower, digits, local store)."""

from __future__ import annotations

import pytest
from flow_helpers import FAST, task_states

from flows.curate import VARIANTS, curate
from storage.index import LineageIndex
from tasks.store import open_store, store_spec


def test_skmm_best_keeps_the_variant_with_the_better_val_score(prefect_server, tmp_path):
    store_dir = tmp_path / "store"
    args = {**FAST, "methods": ["skmm_best", *VARIANTS], "budgets": [20, 40], "store_url": str(store_dir),
            "third_candidate": False, "pivoted_candidate": False}  # the two variants (the default adds two more:
    # the tests below)
    state = curate(**args, return_state=True)
    results = state.result()["results"]
    by = {(r["method"], r["n"]): r for r in results}
    for n in (20, 40):
        best = by[("skmm_best", n)]
        assert best["chosen"] in VARIANTS
        val = best["val"]
        assert set(val) == set(VARIANTS) and all(v["n_val"] > 50 for v in val.values())
        other = next(v for v in VARIANTS if v != best["chosen"])
        assert (val[best["chosen"]]["accuracy"], val[best["chosen"]]["macro_f1"]) >= (
            val[other]["accuracy"], val[other]["macro_f1"])
        # The kept coreset and model are exactly the chosen variant's own (same content, same artifact).
        assert best["selection"]["sha256"] == by[(best["chosen"], n)]["selection"]["sha256"]
        assert best["model"]["sha256"] == by[(best["chosen"], n)]["model"]["sha256"]
        assert best["accuracy"] == by[(best["chosen"], n)]["accuracy"]
    states = task_states(state)
    # skmm_best's candidates are the same tasks with the same inputs as the plain variants: cache hits.
    assert states["select"].count("Cached") == 4, states
    # Each coreset's model is trained once: the kept one is recorded, not finetuned again.
    assert sorted(states["finetune-linear-probe"]) == ["Cached"] * 4 + ["Completed"] * 4, states
    assert "report" in states

    st = open_store(store_spec(store_dir))
    index = LineageIndex(tmp_path / "lineage.duckdb")
    index.rebuild(st)
    for r in results:
        got = index.samples_for_model(r["model"]["sha256"]).column("sample_id").to_pylist()
        assert len(got) == r["n"] and len(set(got)) == r["n"]
    assert "skmm_best kept (chosen on the val split): n=20: " in state.result()["report"]["markdown"]

    from flows.rerun import reevaluate

    again = reevaluate(run=state.result()["run_id"], store_url=str(store_dir))
    assert [(r["chosen"], r["val"]) for r in again["results"] if r["method"] == "skmm_best"] == [
        (r["chosen"], r["val"]) for r in results if r["method"] == "skmm_best"]
    assert "skmm_best kept (chosen on the val split)" in again["report"]["markdown"]


def test_proxy_rule_and_bad_choice(prefect_server, tmp_path):
    out = curate(**{**FAST, "methods": ["skmm_best"], "variant_choice": "proxy", "store_url": str(tmp_path / "s")})
    assert "chosen" not in out["results"][0] and "val" not in out["results"][0]
    assert "skmm_best kept" not in out["report"]["markdown"]
    with pytest.raises(Exception, match="variant_choice"):
        curate(**{**FAST, "variant_choice": "test", "store_url": str(tmp_path / "s")})


def test_no_val_split_falls_back_to_the_proxy_rule(prefect_server, tmp_path):
    """Last-layers finetuning works without a val split; skmm_best then decides with the label-free proxy
    instead of failing after ingest, embed and sketch."""
    from flows.curate import FinetuneConfig, SourceConfig

    out = curate(**{**FAST, "methods": ["skmm_best"], "source": SourceConfig(val_fraction=0),
                    "finetune": FinetuneConfig(kind="last_layers", epochs=1), "gradients": "ft",
                    "store_url": str(tmp_path / "s")})
    assert out["results"][0]["n"] == 20 and "chosen" not in out["results"][0]


def test_a_third_candidate_seeded_by_greedy_pivots_joins_the_val_choice(prefect_server, tmp_path):
    """--third-candidate (a default): skmm_best also selects with convex SkMM seeded by greedy pivots, finetunes on
    it and scores it on the val split; the kept coreset is the best of three, and the two variants' own coresets are
    the same cached tasks as with --no-third-candidate. (The fourth, also a default, is off here: the next test.)"""
    from flows.curate import CANDIDATES, GREEDY_PIVOTS
    from storage.artifacts import ArtifactRef
    from storage.selections import read_selection, selection_metadata

    store_dir = tmp_path / "store"
    args = {**FAST, "methods": ["skmm_best"], "budgets": [20], "sketch_dim": "auto", "store_url": str(store_dir),
            "pivoted_candidate": False}
    two = curate(**args, third_candidate=False)["results"][0]
    state = curate(**args, return_state=True)
    (row,) = state.result()["results"]
    assert set(row["val"]) == {*VARIANTS, GREEDY_PIVOTS} and row["chosen"] in row["val"]
    assert row["val"]["skmm"] == two["val"]["skmm"] and row["val"]["skmm_v2"] == two["val"]["skmm_v2"]
    score = {v: (m["accuracy"], m["macro_f1"]) for v, m in row["val"].items()}
    assert score[row["chosen"]] == max(score.values())
    states = task_states(state)
    assert sorted(states["select"]) == ["Cached", "Cached", "Completed"], states  # only the new candidate runs
    st = open_store(store_spec(store_dir))
    kept = selection_metadata(read_selection(st, ArtifactRef.from_dict(row["selection"])))
    assert kept["method"] == CANDIDATES[row["chosen"]][0]
    assert kept["params"]["pivoting"] == ("greedy_signal" if row["chosen"] == GREEDY_PIVOTS else "auto")


def test_the_third_candidate_is_an_option_of_curate_and_reselect():
    import inspect

    from typer.testing import CliRunner

    from flows.cli import app, curate_cmd, reselect_cmd
    from flows.rerun import reselect

    for fn in (curate.fn, reselect.fn, curate_cmd, reselect_cmd):
        assert inspect.signature(fn).parameters["third_candidate"].default is True
    for command in ("curate", "reselect"):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert out.exit_code == 0 and "--no-third-candidate" in out.output


def test_a_fourth_candidate_pivoted_seeding_alone_joins_the_val_choice_by_default(prefect_server, tmp_path):
    """The default (--pivoted-candidate): skmm_best also selects with SkMM's pivoted seeding alone on the
    automatic-m sketch, finetunes on it and scores it on the val split; the other three are the same cached tasks as
    with --no-pivoted-candidate, and only the new candidate's select task runs."""
    from flows.curate import CANDIDATES, PIVOTED
    from storage.artifacts import ArtifactRef
    from storage.selections import read_selection, selection_metadata

    store_dir = tmp_path / "store"
    args = {**FAST, "methods": ["skmm_best"], "budgets": [20], "sketch_dim": "auto", "store_url": str(store_dir)}
    three = curate(**args, pivoted_candidate=False)["results"][0]
    assert len(three["val"]) == 3
    state = curate(**args, return_state=True)
    (row,) = state.result()["results"]
    assert set(row["val"]) == {*three["val"], PIVOTED} and len(row["val"]) == 4
    assert all(row["val"][v] == three["val"][v] for v in three["val"])
    score = {v: (m["accuracy"], m["macro_f1"]) for v, m in row["val"].items()}
    assert score[row["chosen"]] == max(score.values())
    assert sorted(task_states(state)["select"]) == ["Cached", "Cached", "Cached", "Completed"]
    st = open_store(store_spec(store_dir))
    kept = selection_metadata(read_selection(st, ArtifactRef.from_dict(row["selection"])))
    assert kept["method"] == CANDIDATES[row["chosen"]][0]


def test_the_fourth_candidate_is_a_default_option_of_curate_reselect_and_the_synthetic_bench():
    import inspect

    from typer.testing import CliRunner

    from flows.cli import app, bench_synthetic, curate_cmd, reselect_cmd
    from flows.rerun import reselect
    from skmm.synthetic.benchmark import SyntheticConfig

    for fn in (curate.fn, reselect.fn, curate_cmd, reselect_cmd, bench_synthetic):
        assert inspect.signature(fn).parameters["pivoted_candidate"].default is True
    assert SyntheticConfig().pivoted_candidate is True  # one rule in bench and pipeline
    for command in (["curate"], ["reselect"], ["bench", "synthetic"]):
        out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert out.exit_code == 0 and "--no-pivoted-candidate" in out.output
