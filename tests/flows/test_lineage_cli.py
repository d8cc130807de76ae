"""``skmm lineage …`` over a small recorded store: table, JSON and Parquet outputs, S3 through --endpoint-url,
and one-line errors (exit code 2) that never show credentials."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest
from helpers import free_port
from typer.testing import CliRunner

from flows.lineage_cli import lineage_app
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import DatasetRef, read_samples
from storage.lineage import LineageRecorder, code_provenance
from storage.selections import read_selection, write_selection

runner = CliRunner()


def _record(store: ArtifactStore) -> dict:
    ids_a = [hashlib.sha256(f"s{i}".encode()).hexdigest() for i in range(12)]
    ids_b = [*ids_a[4:], "extra-1", "extra-2"]
    out = {"ids_a": ids_a, "ids_b": ids_b}
    for tag, ids in (("a", ids_a), ("b", ids_b)):
        rec = LineageRecorder(store, config={"tag": tag})
        dataset = store.put_bytes(b"dataset", "dataset", ".parquet")
        with rec.stage("select", [dataset]):
            sel = write_selection(store, ids, method="skmm")
            rec.complete("select", selection=sel)
        with rec.stage("train", [sel]):
            model = store.put_bytes(f"model {tag}".encode(), "model", ".pt")
            rec.complete("train", [model], model=model, metrics={"accuracy": 0.8})
        out[tag] = {"run_id": rec.run_id, "model": model, "selection": sel}
    bad = LineageRecorder(store, config={})
    with pytest.raises(RuntimeError), bad.stage("embed"):
        raise RuntimeError("CUDA out of memory")
    out["failed"] = bad.run_id
    return out


@pytest.fixture
def local(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    data = _record(store)
    result = runner.invoke(lineage_app, ["rebuild", "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "runs" in result.stdout
    assert (tmp_path / "store" / "lineage.duckdb").is_file()  # default index beside a local store
    return {"args": ["--store", str(tmp_path / "store")], **data}


def test_samples_of_model_table_json_and_parquet(local, tmp_path):
    model = local["a"]["model"]
    table = runner.invoke(lineage_app, ["samples-of-model", model.sha256, *local["args"]])
    assert table.exit_code == 0, table.output
    assert all(i in table.stdout for i in local["ids_a"]) and "12 rows" in table.stdout
    as_json = runner.invoke(lineage_app, ["samples-of-model", model.sha256[:10], "--json", *local["args"]])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert [r["sample_id"] for r in rows] == local["ids_a"] and [r["rank"] for r in rows] == list(range(12))
    out = tmp_path / "samples.parquet"
    written = runner.invoke(lineage_app, ["samples-of-model", model.uri, "--parquet", str(out), *local["args"]])
    assert written.exit_code == 0, written.output
    assert pq.read_table(out).column("sample_id").to_pylist() == local["ids_a"]


def test_other_commands(local):
    shared = local["ids_a"][5]
    models = json.loads(runner.invoke(lineage_app, ["models-of-sample", shared, "--json", *local["args"]]).stdout)
    assert {m["run_id"] for m in models} == {local["a"]["run_id"], local["b"]["run_id"]}
    assert models[0]["trained_at"].endswith("+00:00")

    prov = runner.invoke(lineage_app, ["provenance", local["a"]["run_id"], "--json", *local["args"]])
    assert prov.exit_code == 0, prov.output
    roles = [(r["stage"], r["role"]) for r in json.loads(prov.stdout)]
    assert roles.index(("select", "selection")) < roles.index(("train", "model")) < roles.index(("train", "metric"))
    assert "provenance of run" in runner.invoke(lineage_app, ["provenance", local["a"]["run_id"],
                                                              *local["args"]]).stdout

    diff = runner.invoke(lineage_app, ["diff", local["a"]["run_id"], local["b"]["run_id"], "--summary", "--json",
                                       *local["args"]])
    assert json.loads(diff.stdout) == [{"change": "added", "samples": 2}, {"change": "removed", "samples": 4},
                                       {"change": "kept", "samples": 8}]

    failed = runner.invoke(lineage_app, ["failed", *local["args"]])
    assert failed.exit_code == 0 and local["failed"] in failed.stdout and "CUDA out of memory" in failed.stdout
    runs = json.loads(runner.invoke(lineage_app, ["runs", "--json", *local["args"]]).stdout)
    assert sorted(r["status"] for r in runs) == ["completed", "completed", "failed"]


def test_clear_errors(local, tmp_path):
    unknown = runner.invoke(lineage_app, ["samples-of-model", "0" * 64, *local["args"]])
    assert unknown.exit_code == 2 and unknown.stderr.startswith("error: no model") and "Traceback" not in unknown.output
    run = runner.invoke(lineage_app, ["provenance", "nope", *local["args"]])
    assert run.exit_code == 2 and "no run 'nope'" in run.stderr
    missing = runner.invoke(lineage_app, ["failed", "--db", str(tmp_path / "none.duckdb"), *local["args"]])
    assert missing.exit_code == 2 and "no lineage index" in missing.stderr and "skmm lineage rebuild" in missing.stderr
    no_store = runner.invoke(lineage_app, ["rebuild", "--store", str(tmp_path / "absent")])
    assert no_store.exit_code == 2 and "does not exist" in no_store.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_s3_store_with_endpoint_and_env_credentials(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    name, options = s3_bucket
    data = _record(ArtifactStore(f"s3://{name}/lineage-test", storage_options=options))
    monkeypatch.chdir(tmp_path)  # the default index for a remote store is ./skmm-lineage.duckdb
    args = ["--store", f"s3://{name}/lineage-test", "--endpoint-url", s3_endpoint]
    built = runner.invoke(lineage_app, ["rebuild", "--json", *args])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["runs"] == 3 and (tmp_path / "skmm-lineage.duckdb").is_file()
    rows = json.loads(runner.invoke(lineage_app, ["samples-of-model", data["b"]["model"].sha256, "--json",
                                                  *args]).stdout)
    assert sorted(r["sample_id"] for r in rows) == sorted(data["ids_b"])


def test_unreachable_store_never_prints_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3r-s3cret-value")
    result = runner.invoke(lineage_app, ["rebuild", "--store", "s3://bucket/prefix", "--endpoint-url",
                                         f"http://127.0.0.1:{free_port()}", "--db", str(tmp_path / "x.duckdb")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: cannot reach the store")
    assert "sup3r-s3cret-value" not in result.output


@pytest.mark.parametrize("flag", [[], ["--fast"], ["--verify-sha256"]])
def test_rebuild_reports_a_corrupt_selection_and_never_answers_from_it(local, tmp_path, flag):
    sel = local["a"]["selection"]
    path = tmp_path / "store" / sel.uri.split("/store/", 1)[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped byte: same size, only its hash tells
    path.write_bytes(bytes(data))

    rebuilt = runner.invoke(lineage_app, ["rebuild", *flag, *local["args"]])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert f"warning: selection {sel.uri} cannot be used (sha256 mismatch)" in rebuilt.stderr
    answer = runner.invoke(lineage_app, ["samples-of-model", local["a"]["model"].sha256, "--json", *local["args"]])
    assert answer.exit_code == 2 and not answer.stdout.strip()
    (line,) = answer.stderr.strip().splitlines()
    assert sel.uri in line and "corrupted" in line and "no model" not in line
    assert not any(i in answer.output for i in local["ids_a"])
    diff = runner.invoke(lineage_app, ["diff", local["a"]["run_id"], local["b"]["run_id"], *local["args"]])
    assert diff.exit_code == 2 and sel.uri in diff.stderr


# ---------------------------------------------------------------------- an auditor's view of a real curate run
@pytest.fixture(scope="module")
def curated(prefect_server, tmp_path_factory) -> dict:
    """One small curate run (tiny tower, budget 20, uniform) on digits, and its rebuilt index."""
    from flow_helpers import FAST

    from flows.curate import curate

    store_dir = tmp_path_factory.mktemp("audit") / "store"
    result = curate(**{**FAST, "methods": ["uniform"]}, store_url=str(store_dir))
    built = runner.invoke(lineage_app, ["rebuild", "--store", str(store_dir)])
    assert built.exit_code == 0, built.output
    store = ArtifactStore(store_dir)
    dataset = DatasetRef.from_dict(result["dataset"])
    rows = read_samples(store, dataset, columns=["sample_id", "source_uri", "label", "split"]).to_pylist()
    return {"result": result, "args": ["--store", str(store_dir)], "store": store, "dataset": dataset,
            "rows": {r["sample_id"]: r for r in rows}}


def test_samples_of_model_names_the_dataset_rows(curated, tmp_path):
    (run,) = curated["result"]["results"]
    model, sel = ArtifactRef.from_dict(run["model"]), ArtifactRef.from_dict(run["selection"])
    selected = read_selection(curated["store"], sel).sort_by("rank").column("sample_id").to_pylist()
    answer = runner.invoke(lineage_app, ["samples-of-model", model.sha256[:12], "--json", *curated["args"]])
    assert answer.exit_code == 0, answer.output
    assert "warning" not in answer.stderr
    got = json.loads(answer.stdout)
    assert [r["sample_id"] for r in got] == selected and len(got) == 20
    for r in got:  # each sample's source URI, label and split are the dataset's own row
        truth = curated["rows"][r["sample_id"]]
        assert (r["source_uri"], r["label"], r["split"]) == (truth["source_uri"], truth["label"], truth["split"])
        assert r["dataset_version"] == curated["dataset"].version and r["selection_sha256"] == sel.sha256
    assert {r["split"] for r in got} == {"train"} and all(r["source_uri"] and r["label"] for r in got)

    out = tmp_path / "audit.parquet"
    written = runner.invoke(lineage_app, ["samples-of-model", model.uri, "--parquet", str(out), *curated["args"]])
    assert written.exit_code == 0, written.output
    table = pq.read_table(out)
    assert table.column_names == ["sample_id", "rank", "weight", "source_uri", "label", "split", "dataset_version",
                                  "selection_sha256"]
    assert table.to_pylist() == got
    shown = runner.invoke(lineage_app, ["samples-of-model", model.sha256, *curated["args"]])
    assert shown.exit_code == 0 and got[0]["source_uri"] in shown.stdout and "20 rows" in shown.stdout


def test_models_of_sample_names_its_dataset_row(curated, tmp_path):
    (run,) = curated["result"]["results"]
    sel = ArtifactRef.from_dict(run["selection"])
    sample = read_selection(curated["store"], sel).column("sample_id")[3].as_py()
    got = json.loads(runner.invoke(lineage_app, ["models-of-sample", sample, "--json", *curated["args"]]).stdout)
    truth = curated["rows"][sample]
    assert [r["model_sha256"] for r in got] == [ArtifactRef.from_dict(run["model"]).sha256]
    assert [(r["sample_id"], r["source_uri"], r["label"], r["split"], r["dataset_version"]) for r in got] == [
        (sample, truth["source_uri"], truth["label"], truth["split"], curated["dataset"].version)]
    out = tmp_path / "models.parquet"
    assert runner.invoke(lineage_app, ["models-of-sample", sample, "--parquet", str(out),
                                       *curated["args"]]).exit_code == 0
    assert pq.read_table(out).column("source_uri").to_pylist() == [truth["source_uri"]]


def test_show_gives_one_page_about_a_model(curated):
    result = curated["result"]
    (run,) = result["results"]
    model = ArtifactRef.from_dict(run["model"])
    answer = runner.invoke(lineage_app, ["show", model.sha256[:16], "--json", *curated["args"]])
    assert answer.exit_code == 0, answer.output
    page = json.loads(answer.stdout)
    assert (page["model"]["sha256"], page["model"]["uri"]) == (model.sha256, model.uri)
    sel = page["selection"]
    assert (sel["sha256"], sel["method"], sel["n_samples"]) == (run["selection"]["sha256"], "uniform", 20)
    assert sel["params"]["random_state"] == 0
    (sketch,) = sel["sketches"]
    assert sketch["sha256"] == result["sketch"]["artifact"]["sha256"] and sketch["spec"] == result["sketch"]["producer"]
    (dataset,) = page["datasets"]
    assert (dataset["version"], dataset["num_rows"]) == (curated["dataset"].version, curated["dataset"].num_rows)
    assert page["run"]["run_id"] == result["run_id"] and page["run"]["status"] == "completed"
    assert len(page["run"]["config_hash"]) == 64 and page["run"]["git_commit"] == code_provenance().git_commit
    metrics = {(m["stage"], m["name"]): m["value"] for m in page["metrics"]}
    assert metrics[("evaluate.uniform.n20.s0", "accuracy")] == pytest.approx(run["accuracy"])

    text = runner.invoke(lineage_app, ["show", model.uri, *curated["args"]])
    assert text.exit_code == 0, text.output
    for needle in ("selection", "uniform", curated["dataset"].version, result["run_id"], page["run"]["config_hash"],
                   "accuracy", sketch["uri"]):
        assert needle in text.stdout
    unknown = runner.invoke(lineage_app, ["show", "0" * 64, *curated["args"]])
    assert unknown.exit_code == 2 and unknown.stderr.startswith("error: no model")
