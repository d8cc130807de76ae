"""Bad input through the real curate flow (Prefect test server, tiny open_clip tower, local store, DuckDB index).

Each bad pool, budget or model is a clear one-line error (or, for an unreadable file, a quarantine entry and a
completed run); nothing is left half-written in the store; the lineage index shows the run failed at the stage
that hit the problem. Small Pillow-made pools (2 classes × 12 images of 32×32) keep every run to seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.curate import ModelConfig, SourceConfig, curate
from skmm.models.clip import CONFIGS_DIR, TINY_MODEL
from storage.errors import StorageError
from storage.index import LineageIndex
from storage.lineage import EVENTS_PREFIX, event_record, event_refs, parse_event
from tasks.store import open_store, store_spec

MODEL = ModelConfig(name=TINY_MODEL)
RUN = {"budgets": [6], "methods": ["uniform"], "seeds": [0], "sketch_dim": 8, "model": MODEL}
CLASSES = ("cats", "dogs")
PER_CLASS = 12
SHA_NAME = re.compile(r"^([0-9a-f]{64})(\.[A-Za-z0-9.]+)?$")


# ------------------------------------------------------------------------------------------------ pools
def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    """A 32×32 RGB image: a class-ish base colour plus noise, so every file (and sample id) is distinct."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 40, 40] if seed % 2 else [40, 40, 200], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_pool(root: pathlib.Path, classes: tuple[str, ...] = CLASSES) -> pathlib.Path:
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / label / f"{i:02d}.png").write_bytes(image_bytes(2 * (c * PER_CLASS + i) + c))
    return root


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Every bad input once per module: folders, manifests and a weights file of another tiny config."""
    root = tmp_path_factory.mktemp("pools")
    good = write_pool(root / "good")
    corrupt = root / "corrupt_jpeg"
    shutil.copytree(good, corrupt)
    jpeg = image_bytes(999, "JPEG")
    (corrupt / "cats" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # cut mid-scan: header fine, data not
    zero = root / "zero_byte"
    shutil.copytree(good, zero)
    (zero / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "empty").mkdir()
    write_pool(root / "one_class", classes=("cats",))

    files = sorted(good.rglob("*.png"))
    (root / "no_label.csv").write_text("path,kind\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    rows = [f"{p},{'' if i == 2 else p.parent.name}\n" for i, p in enumerate(files)]  # data row 3: no label
    (root / "empty_label.csv").write_text("path,label\n" + "".join(rows))

    import open_clip
    from safetensors.torch import save_file

    cfg = json.loads((CONFIGS_DIR / f"{TINY_MODEL}.json").read_text())
    other = open_clip.CLIP(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": 3}, cfg["text_cfg"])
    weights = root / "other.safetensors"
    save_file({k: v.detach().contiguous() for k, v in other.state_dict().items()}, str(weights))
    return {"root": root, "good": good, "corrupt_jpeg": corrupt, "zero_byte": zero, "empty": root / "empty",
            "one_class": root / "one_class", "no_label": root / "no_label.csv",
            "empty_label": root / "empty_label.csv", "weights": weights}


def folder(path: pathlib.Path) -> SourceConfig:
    return SourceConfig(kind="folder", path=str(path))


def manifest(path: pathlib.Path) -> SourceConfig:
    return SourceConfig(kind="manifest", path=str(path))


# ------------------------------------------------------------------------------------------------ store checks
def events_of(store_dir: pathlib.Path) -> list[dict]:
    st = open_store(store_spec(store_dir))
    return [parse_event(st.read_rel(rel), rel) for rel in st.list_paths(EVENTS_PREFIX) if rel.endswith(".json")]


def assert_nothing_half_written(store_dir: pathlib.Path) -> None:
    """No staging leftovers; every object hashes to its name; every artifact a lineage event names verifies."""
    files = [p for p in store_dir.rglob("*") if p.is_file()]
    staged = [p for p in files if p.name.startswith(".") or p.relative_to(store_dir).parts[0] == "tmp"
              or p.suffix in (".tmp", ".partial")]
    assert not staged, f"staging leftovers: {staged}"
    for path in (store_dir / "objects").rglob("*"):
        if path.is_file():
            m = SHA_NAME.match(path.name)
            assert m, f"object {path} is not named by its sha256"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == m.group(1), f"{path} does not hash to its name"
    st = open_store(store_spec(store_dir))
    for event in events_of(store_dir):
        refs = event_refs(event)
        for ref in [*refs["inputs"], *refs["outputs"], refs["selection"], refs["model"]]:
            if ref is not None:
                st.verify(ref)  # exists, size and sha256 match the record


def object_kinds(store_dir: pathlib.Path) -> set[str]:
    objects = store_dir / "objects"
    return {p.parent.name for p in objects.rglob("*") if p.is_file()} if objects.exists() else set()


def lineage(store_dir: pathlib.Path, db: pathlib.Path) -> tuple[LineageIndex, dict]:
    """The index rebuilt from the store (sha256 verified) and its one run."""
    index = LineageIndex(db)
    index.rebuild(open_store(store_spec(store_dir)), verify_sha256=True)
    assert index.table("dangling").num_rows == 0 and index.table("malformed").num_rows == 0
    (run,) = index.table("runs").to_pylist()
    return index, run


# ------------------------------------------------------------------------------------------------ error cases
# (case, curate arguments, message regex (whole message), stage that fails, object kinds it may leave behind)
ERROR_CASES = [
    ("missing_folder", lambda p: {"source": folder(p["root"] / "missing")},
     r"image folder /\S+/missing does not exist", "ingest", set()),
    ("empty_folder", lambda p: {"source": folder(p["empty"])},
     r"image folder /\S+/empty is empty; expected class subfolders .*", "ingest", set()),
    ("one_class", lambda p: {"source": folder(p["one_class"])},
     r"image folder /\S+/one_class needs at least 2 classes with usable samples; found 1 \('cats'\)", "ingest",
     set()),
    ("manifest_without_labels", lambda p: {"source": manifest(p["no_label"])},
     r"manifest /\S+/no_label\.csv has no 'label' column \(labels are required\); its columns are "
     r"\['path', 'kind'\]", "ingest", set()),
    ("manifest_row_without_label", lambda p: {"source": manifest(p["empty_label"])},
     r"manifest /\S+/empty_label\.csv row 3 has an empty label \(every sample needs one\)", "ingest", set()),
    ("budget_larger_than_pool", lambda p: {"source": folder(p["good"]), "budgets": [1000]},
     r"budget n=1000 is larger than the pool \(the train split holds \d+ samples\)", "select.uniform.n1000.s0",
     {"samples", "dataset", "embeddings", "sketch"}),
    ("unknown_model", lambda p: {"source": folder(p["good"]), "model": ModelConfig(name="no-such-model")},
     r"unknown open_clip model 'no-such-model'; .*\(\d+ in open_clip\.list_models\(\)\)", "check-inputs",
     set()),  # checked before any ingest work
    ("weights_of_another_model", lambda p: {"source": folder(p["good"]),
                                            "model": ModelConfig(name=TINY_MODEL, pretrained=str(p["weights"]))},
     rf"weights at /\S+/other\.safetensors do not match model {TINY_MODEL}: "
     r"unexpected keys visual\.transformer\.resblocks\.2\..*", "embed", {"samples", "dataset"}),
]
PREVIOUS = {"check-inputs": [], "ingest": ["check-inputs"], "embed": ["check-inputs", "ingest"],
            "select": ["check-inputs", "ingest", "embed", "sketch"]}


@pytest.mark.parametrize(("case", "args", "message", "stage", "kinds"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_is_one_clear_line_and_fails_its_stage(prefect_server, pools, tmp_path, case, args, message,
                                                         stage, kinds):
    store_dir = tmp_path / "store"
    with pytest.raises(Exception) as info:
        curate(**{**RUN, **args(pools)}, store_url=str(store_dir))
    exc = info.value
    # The CLI prints these as one line with exit code 2 (ValueError, FileNotFoundError, StorageError).
    assert isinstance(exc, ValueError | FileNotFoundError | StorageError), repr(exc)
    text = str(exc)
    assert "\n" not in text and re.fullmatch(message, text), text

    assert_nothing_half_written(store_dir)
    assert object_kinds(store_dir) == kinds  # the failing stage published nothing (ingest: nothing at all)

    index, run = lineage(store_dir, tmp_path / "lineage.duckdb")
    assert run["status"] == "failed" and run["failed_stage"] == stage, run
    assert run["error"] == f"{type(exc).__name__}: {text}"
    stages = {r["stage"]: r["status"] for r in index.table("stages").to_pylist()}
    assert stages == {**dict.fromkeys(PREVIOUS[stage.split(".")[0]], "completed"), stage: "failed"}, stages
    (failed,) = index.failed_runs().to_pylist()
    assert (failed["stage"], failed["run_status"]) == (stage, "failed")


# ------------------------------------------------------------------------------------------------ quarantine
QUARANTINE_CASES = [
    ("corrupt_jpeg", "cats/broken.jpg", r"cannot decode image: OSError: (?i:.*truncated.*)"),
    ("zero_byte", "dogs/empty.jpg", r"empty file"),
]


@pytest.mark.parametrize(("case", "bad_file", "reason"), QUARANTINE_CASES, ids=[c[0] for c in QUARANTINE_CASES])
def test_unreadable_file_is_quarantined_and_the_run_completes(prefect_server, pools, tmp_path, case, bad_file,
                                                              reason):
    import pyarrow.parquet as pq

    store_dir = tmp_path / "store"
    source = pools[case]
    result = curate(**RUN, source=folder(source), store_url=str(store_dir))
    assert result["quarantined"] == 1
    assert result["dataset"]["num_rows"] == len(CLASSES) * PER_CLASS  # every good image kept, the bad one not
    assert result["results"][0]["n"] == 6 and 0.0 <= result["results"][0]["accuracy"] <= 1.0
    assert_nothing_half_written(store_dir)

    index, run = lineage(store_dir, tmp_path / "lineage.duckdb")
    assert run["status"] == "completed" and run["failed_stage"] is None
    assert {r["status"] for r in index.table("stages").to_pylist()} == {"completed"}
    ingest_done = [e for e in events_of(store_dir) if e["job"]["name"] == "ingest" and e["eventType"] == "COMPLETE"]
    (event,) = ingest_done
    assert event_record(event)["metrics"]["quarantined"] == 1
    (qref,) = [r for r in event_refs(event)["outputs"] if r.kind == "quarantine"]
    table = pq.read_table(io.BytesIO(open_store(store_spec(store_dir)).get_bytes(qref))).to_pylist()
    assert len(table) == 1 and table[0]["source_uri"] == (source / bad_file).resolve().as_uri(), table
    assert re.fullmatch(reason, table[0]["reason"]), table[0]["reason"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_bad_input_is_one_line_on_stderr_and_exit_2(prefect_server, pools, tmp_path):
    runner = CliRunner()
    common = ["--model", TINY_MODEL, "--budgets", "6", "--methods", "uniform", "--sketch-dim", "8"]
    cases = [
        ([str(pools["no_label"])], r"error: manifest /\S+/no_label\.csv has no 'label' column .*"),
        ([str(pools["one_class"])], r"error: image folder /\S+/one_class needs at least 2 classes .*"),
        ([str(pools["good"]), "--pretrained", str(pools["weights"])],
         rf"error: weights at /\S+/other\.safetensors do not match model {TINY_MODEL}: unexpected keys .*"),
    ]
    for i, (args, expected) in enumerate(cases):
        result = runner.invoke(app, ["curate", *args, *common, "--store", str(tmp_path / f"s{i}")])
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(expected, lines[0]), result.stderr
        assert "Traceback" not in result.output
        assert_nothing_half_written(tmp_path / f"s{i}")


def test_cli_max_pixels_quarantines_larger_images(prefect_server, pools, tmp_path):
    """``--max-pixels`` reaches the ingest: an image above it is quarantined (32×32 images pass at 1 024)."""
    pool = tmp_path / "pool"
    shutil.copytree(pools["good"], pool)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (32, 33, 3), dtype=np.uint8)).save(pool / "cats" / "wide.png")
    store = tmp_path / "s"
    result = CliRunner().invoke(app, ["curate", str(pool), "--model", TINY_MODEL, "--budgets", "6", "--methods",
                                      "uniform", "--sketch-dim", "8", "--max-pixels", "1024", "--store", str(store),
                                      "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["quarantined"] == 1
    assert_nothing_half_written(store)
