"""bench/gpu.sh, the device script, keeps to its time budget: steps past it are skipped and reported, and the
results come back as one archive (a device call returns at most 8 files)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_STEPS = ["cuda_tests", "embed_fp32", "embed_bf16", "ft_sketch", "select_device", "embed_host_cpu", "sketch",
              "select_numpy"]


def run_gpu_sh(tmp_path: pathlib.Path, budget: str, *args: str, min_step: str = "15", tiny: bool = True,
               **extra_env: str) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)  # the steps' temp folder: a step killed at its limit cleans up nothing
    env = {**os.environ, "PYTHON": sys.executable, "SKMM_GPU_SH_BUDGET_S": budget, "SKMM_GPU_SH_MIN_STEP_S": min_step,
           "SKMM_BENCH_OUT": str(tmp_path / "results"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "TMPDIR": str(tmp_path / "tmp"), **extra_env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *(["--tiny"] if tiny else []), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def steps(tmp_path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "results" / "gpu_sh_steps.jsonl").read_text().splitlines()]


def test_steps_past_the_budget_are_skipped_reported_and_packed(tmp_path):
    done = run_gpu_sh(tmp_path, "0", "--pack", str(tmp_path / "out"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"SKIPPED (budget): {' '.join(TINY_STEPS)}" in done.stdout
    lines = steps(tmp_path)
    assert [line["step"] for line in lines] == TINY_STEPS and all(line["skipped"] for line in lines)
    assert os.listdir(tmp_path / "out") == ["gpu_results.tar.gz"]  # one file, replaced whole after every step
    with tarfile.open(tmp_path / "out" / "gpu_results.tar.gz") as archive:
        names = {pathlib.PurePath(name).name for name in archive.getnames()}
    assert {"gpu_sh_steps.jsonl", "gpu_sh_machine.log"} <= names


def test_every_step_is_cut_to_the_budget_left(tmp_path):
    # A 10 s budget for minutes of steps: each runs under what is left of it (the first ones, killed at that limit)
    # or is skipped once less than a second is left; whichever way the time falls, the script keeps to its budget.
    # Only the test session's memo folders count: other tests, in this run's other pytest-xdist worker, may be
    # writing their own skmm-* entries to the system temp folder meanwhile (S3 staging, a bench's work folder).
    litter_before = set(pathlib.Path(tempfile.gettempdir()).glob("skmm-test-cache-*"))
    start = time.monotonic()
    done = run_gpu_sh(tmp_path, "10", min_step="1")
    elapsed = time.monotonic() - start
    # A step killed at its limit skips its exit handlers (the test session's memo folder is removed by one): what
    # the steps write to the temp folder goes to the test's own, never to the system's.
    assert set(pathlib.Path(tempfile.gettempdir()).glob("skmm-test-cache-*")) <= litter_before
    lines = steps(tmp_path)
    assert [line["step"] for line in lines] == TINY_STEPS and done.returncode == 1
    for line in lines:
        if line.get("skipped"):
            assert line["budget_left_s"] < 1
        else:
            assert 1 <= line["limit_s"] <= 10 - line["started_s"]
    assert lines[-1].get("skipped")  # the tiny steps take minutes
    assert elapsed < 10 + 5 + 20  # the budget, the last step's kill grace, and bash/Python start-up


def test_a_bad_budget_or_argument_is_refused(tmp_path):
    bad = run_gpu_sh(tmp_path, "ten")
    assert bad.returncode == 2 and "SKMM_GPU_SH_BUDGET_S must be whole seconds" in bad.stderr
    odd = run_gpu_sh(tmp_path, "10", "--fast")
    assert odd.returncode == 2 and "usage" in odd.stderr
    low = run_gpu_sh(tmp_path, "10", min_step="-1")
    assert low.returncode == 2 and "SKMM_GPU_SH_MIN_STEP_S must be whole seconds" in low.stderr


def _stub(folder: pathlib.Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/usr/bin/env bash\n" + script)
    (folder / name).chmod(0o755)


def test_a_small_dev_shm_on_the_device_is_grown_or_else_the_decode_workers_are_turned_off(tmp_path):
    """Decode workers send images back through /dev/shm; a small one (a container's 64 MB) kills them with SIGBUS.
    The device run (no --tiny; here only its --preflight checks) grows it to 8G where it is under 8 GiB, and
    otherwise decodes in the calling thread and says so. ``mount`` and ``df`` are stubs: the test never touches
    this machine's /dev/shm."""
    stubs = tmp_path / "bin"
    _stub(stubs, "mount", f'echo "$@" >> {tmp_path}/mount.calls; exit "${{MOUNT_EXIT:-0}}"\n')
    small = "Filesystem 1024-blocks Used Available Capacity Mounted\nshm 65536 0 65536 0% /dev/shm\n"
    _stub(stubs, "df", f'printf "{small}"\n')
    _stub(stubs, "nproc", 'echo "${NPROC:-4}"\n')  # the demand grows with the cores: 2 GiB up to 25 of them
    path = f"{stubs}:{os.environ['PATH']}"

    def machine_log(**env: str) -> str:
        done = run_gpu_sh(tmp_path, "0", "--preflight", tiny=False, PATH=path, **env)
        assert done.returncode == 0, done.stdout + done.stderr
        return (tmp_path / "results" / "gpu_sh_machine.log").read_text()  # rewritten by each run

    assert "/dev/shm had 64 MiB free: remounted at 8G" in machine_log()
    assert (tmp_path / "mount.calls").read_text() == "-o remount,size=8G /dev/shm\n"
    assert "64 MiB free (< 2048) and cannot grow: SKMM_DECODE_WORKERS=0" in machine_log(MOUNT_EXIT="1")
    assert "64 MiB free (< 2560) and cannot grow" in machine_log(MOUNT_EXIT="1", NPROC="32")  # 2 × 32 × 40 MiB
    enough = machine_log(SKMM_GPU_SH_SHM_MIB="64")
    assert "SKMM_DECODE_WORKERS" not in enough and "remounted" not in enough
    assert (tmp_path / "mount.calls").read_text().count("\n") == 3  # the first three runs only
    bad = run_gpu_sh(tmp_path, "0", tiny=False, PATH=path, SKMM_GPU_SH_SHM_MIB="2G")
    assert bad.returncode == 2 and "SKMM_GPU_SH_SHM_MIB must be whole MiB" in bad.stderr
