"""What every run does before its work, through the real flows (Prefect test server, local store): it removes
staging debris of killed runs that is old enough (a fresh staging file may belong to a live writer and stays),
and its lineage records the code that runs (the commit of the tree skmm was imported from, and the installed
version), not the HEAD of the repository the caller happens to stand in."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import time
import uuid

import pytest

from flows.curate import ModelConfig, curate
from flows.rerun import reevaluate
from storage.lineage import EVENTS_PREFIX, code_provenance, event_record, parse_event
from tasks.store import open_store, store_spec

REPO = pathlib.Path(__file__).resolve().parents[2]
DAY_S = 24 * 3600


def _git(cwd: pathlib.Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def _this_checkout() -> str | None:
    try:
        return _git(REPO, "rev-parse", "HEAD") if _git(REPO, "ls-files", "skmm/__init__.py") else None
    except (OSError, subprocess.CalledProcessError):
        return None


def _staging(store_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Leftovers in the store's staging folder: one a day and an hour old, one fresh, and an old file whose name
    is not a staging name (never ours to delete)."""
    tmp = store_dir / "tmp"
    tmp.mkdir(parents=True)
    files = {"old": tmp / f".{uuid.uuid4().hex}-killed", "fresh": tmp / f".{uuid.uuid4().hex}-writing",
             "other": tmp / "notes.txt"}
    for path in files.values():
        path.write_bytes(b"x" * 1000)
    old = time.time() - DAY_S - 3600
    for key in ("old", "other"):
        os.utime(files[key], (old, old))
    return files


def test_a_run_removes_old_staging_and_records_the_running_code(prefect_server, tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    files = _staging(store_dir)
    other = tmp_path / "other"  # the caller stands in another repository, with GIT_DIR pointing at it
    (other / "src").mkdir(parents=True)
    (other / "src" / "x.py").write_text("")
    _git(other, "init", "-q")
    _git(other, "add", "src/x.py")
    _git(other, "commit", "-q", "-m", "not skmm")
    monkeypatch.chdir(other)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    code_provenance.cache_clear()
    with pytest.raises(ValueError, match="unknown open_clip model"):  # fails at once, after the run's start
        curate(model=ModelConfig(name="no-such-model"), store_url=str(store_dir))

    assert not files["old"].exists()
    assert files["fresh"].exists() and files["other"].exists()
    st = open_store(store_spec(store_dir))
    events = [parse_event(st.read_rel(rel), rel) for rel in st.list_paths(EVENTS_PREFIX)]
    assert events
    for event in events:
        facets = event_record(event)
        assert facets["git_commit"] == _this_checkout() != _git(other, "rev-parse", "HEAD")
        assert facets["skmm_version"] == importlib.metadata.version("skmm")


def test_reruns_remove_old_staging_too(prefect_server, tmp_path):
    store_dir = tmp_path / "store"
    files = _staging(store_dir)
    with pytest.raises(Exception, match="0123abcd"):  # no such run: fails right after opening the store
        reevaluate(run="0123abcd", store_url=str(store_dir))
    assert not files["old"].exists() and files["fresh"].exists() and files["other"].exists()
