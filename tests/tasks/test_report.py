"""The report stage: the metric table (with the full-pool reference row when a result has method "full"), the
variant choices, a deterministic plot in the store, and the ``skmm-report`` artifact with the plot inline."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from storage.artifacts import ArtifactRef
from tasks.report import FULL_POOL, artifact_markdown, markdown, plot_png, publish, report, summarize_metrics
from tasks.store import open_store, store_spec


def _results(with_full: bool) -> list[dict]:
    rows = []
    for seed, (a, b) in enumerate(((0.80, 0.70), (0.90, 0.74))):
        rows.append({"method": "skmm_best", "n": 20, "seed": seed, "accuracy": a, "chosen": "skmm_v2"})
        rows.append({"method": "uniform", "n": 20, "seed": seed, "accuracy": b})
        rows.append({"method": "skmm_best", "n": 40, "seed": seed, "accuracy": a + 0.05, "chosen": "skmm"})
        rows.append({"method": "uniform", "n": 40, "seed": seed, "accuracy": b + 0.05})
    if with_full:
        rows.append({"method": FULL_POOL, "n": 1078, "seed": 0, "accuracy": 0.97})
    return rows


def test_the_table_has_one_column_per_budget_and_a_full_pool_row():
    table = markdown(summarize_metrics(_results(with_full=True), "accuracy"), "accuracy")
    lines = table.splitlines()
    assert lines[2] == "| method | n=20 | n=40 |"  # the reference's n is no budget column
    assert lines[4] == "| skmm_best | 0.8500 ± 0.0500 | 0.9000 ± 0.0500 |"
    assert lines[5] == "| uniform | 0.7200 ± 0.0200 | 0.7700 ± 0.0200 |"
    assert lines[6] == "| full pool (n=1078) | 0.9700 ± 0.0000 | 0.9700 ± 0.0000 |"
    plain = markdown(summarize_metrics(_results(with_full=False), "accuracy"), "accuracy")
    assert "full pool" not in plain and plain.splitlines()[:6] == lines[:6]


def test_the_plot_is_deterministic_and_draws_the_reference():
    with_full = summarize_metrics(_results(with_full=True), "accuracy")
    without = summarize_metrics(_results(with_full=False), "accuracy")
    png = plot_png(with_full, "accuracy")
    assert png == plot_png(with_full, "accuracy")  # same bytes each run: the store address is stable
    assert png != plot_png(without, "accuracy")
    assert Image.open(io.BytesIO(png)).size == (715, 440)


def test_report_writes_table_choices_and_plot_to_the_store(tmp_path):
    spec = store_spec(tmp_path / "store")
    rep = report.fn(_results(with_full=True), spec, metric="accuracy")
    assert rep["metric"] == "accuracy"
    assert "| full pool (n=1078) |" in rep["markdown"]
    assert "skmm_best kept (chosen on the val split): n=20: skmm_v2 ×2; n=40: skmm ×2" in rep["markdown"]
    png = open_store(spec).get_bytes(ArtifactRef.from_dict(rep["plot"]))
    assert png.startswith(b"\x89PNG")
    assert report.fn(_results(with_full=True), spec, metric="accuracy") == rep  # deterministic, same refs


def _inline_png(text: str) -> bytes:
    (encoded,) = re.findall(r"!\[accuracy vs budget\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    return base64.b64decode(encoded, validate=True)


def test_the_artifact_text_inlines_the_plot(tmp_path):
    spec = store_spec(tmp_path / "store")
    rep = report.fn(_results(with_full=False), spec, metric="accuracy")
    png = open_store(spec).get_bytes(ArtifactRef.from_dict(rep["plot"]))
    text = artifact_markdown(rep, png)
    assert text.startswith(rep["markdown"])
    assert _inline_png(text) == png
    assert f"- plot `{rep['plot']['uri']}`" in text and "file://" not in text.split("In the store:")[0]


def test_publish_creates_the_report_artifact_with_the_plot_inline(prefect_api, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    spec = store_spec(tmp_path / "store")
    results = _results(with_full=True)

    @flow
    def publish_only() -> str:
        from prefect.runtime import flow_run

        rep = report.fn(results, spec, metric="accuracy")
        publish(results, rep, spec)
        return flow_run.get_id()

    run_id = publish_only()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"skmm-report", "skmm-runs"}
    text = by_key["skmm-report"].data
    assert "| full pool (n=1078) |" in text
    assert Image.open(io.BytesIO(_inline_png(text))).size == (715, 440)


def test_publish_refuses_a_damaged_plot(prefect_api, tmp_path):
    """The inlined plot is read back against its ref: a damaged object fails the stage, not a silent bad image."""
    from prefect import flow

    from storage.errors import StorageError

    spec = store_spec(tmp_path / "store")
    rep = report.fn(_results(with_full=False), spec, metric="accuracy")
    path = tmp_path / "store" / rep["plot"]["uri"].split(str(tmp_path / "store") + "/", 1)[1]
    path.chmod(0o644)
    path.write_bytes(b"not a png")

    @flow
    def publish_only() -> None:
        publish(_results(with_full=False), rep, spec)

    with pytest.raises(StorageError):
        publish_only()
