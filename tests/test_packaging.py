"""skmm installs into a team's environment: the wheel built from the checkout, installed with ``-c constraints.txt``
into a fresh virtual environment outside the checkout (never ``--system-site-packages``), runs ``skmm curate
digits`` with the tiny tower from a folder outside the checkout, importing nothing from the source tree.

Two ways to fill the fresh venv with skmm's dependencies:
- default run: the test venv's installed packages are hard-linked into it (seconds, no bytes copied), all but
  the checkout's own editable skmm; pip then installs the wheel with the constraints, so every declared range must
  admit the pinned release that is there (else pip looks for another and the install fails), and ``pip check``
  must pass. ~2 min on 2 loaded cores, most of it the curate run.
- ``-m slow``: pip installs everything from the configured index into an empty venv, as a team would
  (5 min on a quiet machine, 13 min on 2 loaded cores: torch's CUDA build is ~6 GB).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the wheel must not need: local state and build leftovers (setuptools writes build/ and *.egg-info next to
# pyproject.toml, so it builds from a copy, never in the checkout).
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "skmm-store", ".prefect", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".ruff_cache", "out")


CALENDAR_VERSIONED = {"fsspec", "s3fs", "dask", "distributed"}  # no major release to stop below


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = Version(version.strip())
    return pins


def _declared() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


@pytest.mark.parametrize("req", _declared(), ids=str)
def test_dependencies_are_ranges_from_the_tested_pin_to_the_next_major(req):
    """Compatible ranges, so skmm joins an environment with another patch release: at least the release pinned in
    constraints.txt (tested), below the next major (the next minor for 0.x); calendar versions: lower bound only."""
    name = req.name.lower().replace("_", "-")
    pinned = _pins()[name]
    lower = {s.operator: Version(s.version) for s in req.specifier}
    assert lower.get(">=") == pinned and "==" not in lower, (str(req), pinned)
    assert req.specifier.contains(pinned)
    if name in CALENDAR_VERSIONED:
        assert set(lower) == {">="}, str(req)
        return
    major = pinned.major if pinned.major > 0 else None
    expected = Version(f"{major + 1}") if major is not None else Version(f"0.{pinned.minor + 1}")
    assert lower.get("<") == expected, (str(req), expected)


def _run(cmd: list[str | pathlib.Path], cwd: pathlib.Path, timeout: float, **extra: str) -> str:
    """Run ``cmd`` with an environment that points at neither the checkout nor its venv; its stdout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PREFECT_")}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PIP_DISABLE_PIP_VERSION_CHECK="1",
               **extra)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "wheels", src], tmp_path, 600)
    (wheel,) = (tmp_path / "wheels").glob("skmm-*.whl")
    return wheel


def _link_installed_packages(venv: pathlib.Path) -> None:
    """Hard-link this interpreter's site-packages into ``venv``, except the files of the installed skmm (the
    checkout's editable install); copy where a link is impossible (another filesystem)."""
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    own: set[str] = set()
    for f in importlib.metadata.distribution("skmm").files or []:
        parts = pathlib.PurePosixPath(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__"):
            own.add(parts[0])

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    shutil.copytree(site, target, symlinks=True, copy_function=link, dirs_exist_ok=True,
                    ignore=lambda folder, names: own & set(names) if pathlib.Path(folder) == site else set())


def _install_and_curate(tmp_path: pathlib.Path, reuse_installed: bool) -> None:
    wheel = _wheel(tmp_path)
    venv = tmp_path / "venv"
    if reuse_installed:
        _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, 300)
        _link_installed_packages(venv)
    else:
        _run([sys.executable, "-m", "venv", venv], tmp_path, 300)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], tmp_path, 3600)
    _run([python, "-m", "pip", "check"], tmp_path, 300)

    work = tmp_path / "work"  # no skmm sources in it or above it
    work.mkdir()
    where = _run([python, "-c", "import json, flows, skmm, storage, tasks; "
                  "print(json.dumps([m.__file__ for m in (skmm, storage, tasks, flows)]))"], work, 120)
    for path in map(pathlib.Path, json.loads(where)):
        assert path.is_relative_to(venv) and not path.is_relative_to(REPO), path

    out = _run([venv / "bin" / "skmm", "curate", "digits", "--model", "skmm-tiny-vit", "--budgets", "20",
                "--methods", "skmm_best,uniform", "--sketch-dim", "16", "--store", work / "store", "--json"], work,
               900, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    result = json.loads(out)
    assert {(r["method"], r["n"]) for r in result["results"]} == {("skmm_best", 20), ("uniform", 20)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["results"])
    assert result["store"] == f"file://{work / 'store'}"
    assert (work / "store" / "objects" / "model").is_dir()


def test_the_wheel_installs_beside_the_pinned_packages_and_curates(tmp_path):
    _install_and_curate(tmp_path, reuse_installed=True)


@pytest.mark.slow
def test_the_wheel_installs_from_the_index_into_an_empty_venv_and_curates(tmp_path):
    _install_and_curate(tmp_path, reuse_installed=False)
