"""The select stage at N = 10^5, 10^6, 10^7 (m = 64, n = 10 000): wall time and peak RSS per phase.

For each N a synthetic sketch table (50 clusters, as in bench/skmm_end_to_end.py; ids random-looking 64-hex
strings in sorted order) is written in chunks to a temporary local store by one process. Then each method runs in
a fresh process, so that no peak hides another, through the select stage's own steps:

1. ``ids``: the train split's ids as one sorted fixed-width byte array (what ``tasks.select.train_split``
   returns; generated here, because a dataset of 10^7 sample rows is a benchmark of its own);
2. ``read``: ``read_vector_matrix`` of those ids: verified, row group by row group, into one float32 N × m array;
3. ``fit``: the selector on that array (convex SkMM: 500 FISTA steps; SkMMv2: one pass over the sketch per row).

Peak RSS is the process's ru_maxrss after each phase (imports included: torch comes with skmm.select) and, for
the whole process, the parent's os.wait4 rusage of the child (which exits without interpreter teardown).
``--devices`` runs SkMM (convex) and SkMMv2 on each listed device (``numpy``: the default path; ``cpu``/``cuda``:
torch on that device, skmm/select/_torch_ops.py); each run records its device, and the runs key on it too.
Results merge into $SKMM_BENCH_OUT/select_scale.json (default bench/out).

``--auto``: the automatic sketch dimension (issue 8). The table is an N × AUTO_M_MAX (256) sketch, and each method
runs with ``sketch_dim="auto"`` along two paths, each in its own process: ``old`` reads the whole N × 256 sketch
(``read_vector_matrix``) and fits it (the library computes the moment, picks m and projects); ``new`` is what
the stage does now: a ``moment`` child streams the table once into the stored 256 × 256 moment
(tasks.sketch_moment: ``pool_moment``, written as an artifact), then the select child loads it, streams the table
once more through the projection onto the m leading eigenvectors (``tasks.select.read_auto_sketch``) and fits the
reduced sketch (``fit_on_reduced``). Both record the sha256 of the selected indices: they must be equal.
``--paths new`` skips the old path (at 10^7 it holds the 9.5 GiB N × 256 array). ``reduced`` (issue 8, the
stage's current form): a ``reduce`` child does the sketch-moment stage once (the moment pass, the moment stored,
then ``tasks.sketch_moment.write_reduced``: m chosen, the table streamed once more through the projection and
written as the N × m table), and each select child loads the moment, checks the reduced table is its own
(``usable_reduced``), reads it (``read_vector_matrix``: N × m float32) and fits it. Results merge into
select_scale_auto.json, or $SKMM_BENCH_NAME.json when set (e.g. select_scale_reduced).
Run: .venv/bin/python bench/select_scale.py [--sizes 100000,1000000] [--methods skmm,skmm_v2,skmm_best]
     [--devices numpy,cuda]
     .venv/bin/python bench/select_scale.py --auto --sizes 100000,1000000 --methods skmm --max-iter 50
     SKMM_BENCH_NAME=select_scale_reduced .venv/bin/python bench/select_scale.py --auto --paths new,reduced …
Tiny check of the command on the CPU: bench/select_scale.py --sizes 3000 --methods skmm --budget 100 --devices numpy,cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CHUNK = 1 << 16
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
PRODUCER = {"bench": "select_scale", "clusters": 50}


def sorted_ids(N: int, seed: int = 0) -> np.ndarray:
    """N distinct random-looking sample ids in ascending order, as an ``S64`` array (64 bytes each)."""
    rng = np.random.default_rng(seed)
    heads = np.unique(rng.integers(0, 2**63, size=N + N // 100 + 16, dtype=np.uint64))[:N]
    if len(heads) < N:
        raise RuntimeError("id collision: raise the head range")
    out = np.empty((N, 64), dtype=np.uint8)
    for lo in range(0, N, CHUNK):
        rows = min(CHUNK, N - lo)
        raw = np.empty((rows, 32), dtype=np.uint8)
        raw[:, :8] = heads[lo:lo + rows, None].byteswap().view(np.uint8).reshape(rows, 8)  # big-endian: sorted
        raw[:, 8:] = rng.integers(0, 256, size=(rows, 24), dtype=np.uint8)
        out[lo:lo + rows, 0::2] = HEX[raw >> 4]
        out[lo:lo + rows, 1::2] = HEX[raw & 15]
    return out.view("S64").reshape(N)


def sketch_chunks(ids: np.ndarray, m: int, seed: int = 0):
    """(ids, rows) chunks of a 50-cluster float32 sketch, drawn chunk by chunk."""
    rng = np.random.default_rng(seed + 1)
    centers = (rng.standard_normal((50, m)) * rng.uniform(0.5, 5.0, (50, 1))).astype(np.float32)
    for lo in range(0, len(ids), CHUNK):
        rows = min(CHUNK, len(ids) - lo)
        yield ids[lo:lo + rows], centers[rng.integers(0, 50, rows)] + 0.3 * rng.standard_normal((rows, m), np.float32)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Phases:
    """Wall time and peak RSS per named phase of a child, for its JSON line."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.result = {"rss_after_imports_mib": round(peak_mib(), 1), "phases": self.phases}

    def __call__(self, name: str, fn):
        start = time.perf_counter()
        value = fn()
        self.phases[name] = {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak_mib(), 1)}
        return value


def prepare(store_dir: str, N: int, m: int) -> None:
    """Child: write the sketch table; print its ref as JSON."""
    from storage.artifacts import ArtifactStore
    from storage.datasets import write_vector_chunks

    start = time.perf_counter()
    ref = write_vector_chunks(ArtifactStore(store_dir), sketch_chunks(sorted_ids(N), m), PRODUCER, kind="sketch")
    print(json.dumps({"ref": ref.to_dict(), "write_s": round(time.perf_counter() - start, 2),
                      "file_mib": round(ref.artifact.size / 2**20, 1), "peak_rss_mib": round(peak_mib(), 1)}))


def measure(store_dir: str, ref_json: str, method: str, n: int, max_iter: int, device: str = "numpy") -> None:
    """Child: the select stage's phases on the stored sketch; print wall time and peak RSS per phase as JSON."""
    from skmm.select import make_selector
    from storage.artifacts import ArtifactStore
    from storage.datasets import VectorTableRef, read_vector_matrix

    ref = VectorTableRef.from_dict(json.loads(ref_json))
    phase = Phases()
    result = phase.result

    ids = phase("ids", lambda: sorted_ids(ref.num_rows))
    S = phase("read", lambda: read_vector_matrix(ArtifactStore(store_dir), ref, ids))
    params = {"max_iter": max_iter} if method in ("skmm", "skmm_best") else {}
    if device != "numpy":
        if method not in ("skmm", "skmm_v2"):
            raise SystemExit(f"--devices other than numpy run skmm and skmm_v2 only; got method {method!r}")
        params["device"] = device
    sel = phase("fit", lambda: make_selector(method, n, random_state=0, **params).fit(S))
    chosen = [s.decode() for s in ids[sel.indices_]]
    info = sel.selection_.info
    result.update({"sketch_mib": round(S.nbytes / 2**20, 1), "ids_mib": round(ids.nbytes / 2**20, 1),
                   "selected": len(chosen), "chosen": info.get("chosen"), "steps": info.get("steps"),
                   "device_used": info.get("device", "numpy"), "objective": info.get("objective"),
                   "indices_sha256": hashlib.sha256(sel.indices_.tobytes()).hexdigest()})  # equal across devices?
    print(json.dumps(result))


def moment_child(store_dir: str, ref_json: str) -> None:
    """Child (--auto): the sketch-moment stage's work on the stored sketch; print the moment's ref as JSON."""
    from skmm.select.auto_sketch import moment_to_bytes
    from storage.artifacts import ArtifactStore
    from storage.datasets import VectorTableRef
    from tasks.sketch_moment import pool_moment

    ref = VectorTableRef.from_dict(json.loads(ref_json))
    st = ArtifactStore(store_dir)
    phase = Phases()
    ids = phase("ids", lambda: sorted_ids(ref.num_rows))
    moment = phase("moment", lambda: st.put_bytes(moment_to_bytes(pool_moment(st, ref, ids), len(ids),
                                                                 sketch=ref.artifact.sha256), "moment", ".safetensors"))
    print(json.dumps({**phase.result, "moment": moment.to_dict(), "moment_kib": round(moment.size / 1024, 1)}))


def synthetic_dataset(N: int):
    """A DatasetRef standing for the generated train split (its version is all the reduce stage records)."""
    from storage.artifacts import ArtifactRef
    from storage.datasets import DatasetRef

    return DatasetRef(ArtifactRef("bench://select_scale", "0" * 64, 0, "dataset"), "bench-select-scale", N)


def reduce_child(store_dir: str, ref_json: str) -> None:
    """Child (--auto, reduced): the sketch-moment stage as it is now — the moment, then the N × m reduced table;
    print its result (refs) as JSON."""
    from skmm.select.auto_sketch import moment_to_bytes
    from storage.artifacts import ArtifactStore
    from storage.datasets import VectorTableRef
    from tasks.sketch_moment import pool_moment, write_reduced

    ref = VectorTableRef.from_dict(json.loads(ref_json))
    st = ArtifactStore(store_dir)
    dataset = synthetic_dataset(ref.num_rows)
    phase = Phases()
    ids = phase("ids", lambda: sorted_ids(ref.num_rows))
    sigma = phase("moment", lambda: pool_moment(st, ref, ids))
    moment = phase("store_moment", lambda: st.put_bytes(moment_to_bytes(sigma, len(ids), sketch=ref.artifact.sha256,
                                                                        dataset=dataset.version),
                                                         "moment", ".safetensors"))
    reduced = phase("reduce", lambda: write_reduced(st, ref, dataset, ids, sigma, moment))
    stage = {"moment": moment.to_dict(), "reduced": reduced.to_dict(), "num_rows": len(ids), "dim": ref.dim,
             "m": reduced.dim, "auto": reduced.producer["auto"]}
    print(json.dumps({**phase.result, "stage": stage, "m": reduced.dim,
                      "reduced_file_mib": round(reduced.artifact.size / 2**20, 1)}))


def measure_auto(store_dir: str, ref_json: str, method: str, n: int, max_iter: int, path: str,
                 moment_json: str = "") -> None:
    """Child (--auto): the select stage with sketch_dim="auto" along the old, the new or the reduced path (see the
    docstring). ``moment_json``: the moment's ref (new), the reduce child's stage result (reduced)."""
    from skmm.select import make_selector
    from skmm.select.auto_sketch import fit_on_reduced, moment_from_bytes
    from storage.artifacts import ArtifactRef, ArtifactStore
    from storage.datasets import VectorTableRef, read_vector_matrix
    from tasks.select import read_auto_sketch
    from tasks.sketch_moment import load_moment, usable_reduced

    ref = VectorTableRef.from_dict(json.loads(ref_json))
    st = ArtifactStore(store_dir)
    phase = Phases()
    result = phase.result

    ids = phase("ids", lambda: sorted_ids(ref.num_rows))
    params = {"max_iter": max_iter} if method in ("skmm", "skmm_best") else {}
    selector = make_selector(method, n, random_state=0, sketch_dim="auto", **params)
    read_mib = None
    if path == "old":
        S = phase("read", lambda: read_vector_matrix(st, ref, ids))
        sel = phase("fit", lambda: selector.fit(S))
        read_mib = ref.artifact.size / 2**20
    elif path == "reduced":  # tasks.select.run_select with the stage's result
        stage = json.loads(moment_json)
        dataset = synthetic_dataset(ref.num_rows)
        sigma = phase("load_moment", lambda: load_moment(st, stage, ref, dataset, len(ids)))
        reduced, auto = phase("check", lambda: usable_reduced(stage, ref, dataset, len(ids), sigma))
        S = phase("read", lambda: read_vector_matrix(st, reduced, ids))
        sel = phase("fit", lambda: fit_on_reduced(selector, S, None, auto))
        read_mib = reduced.artifact.size / 2**20
    else:
        sigma, _ = phase("load_moment", lambda: moment_from_bytes(st.get_bytes(ArtifactRef.from_dict(
            json.loads(moment_json)))))
        S, auto = phase("read", lambda: read_auto_sketch(st, ref, ids, sigma))
        sel = phase("fit", lambda: fit_on_reduced(selector, S, None, auto))
    info = sel.selection_.info
    if read_mib is None:  # new: the wide table is scanned once (the moment was read above)
        read_mib = ref.artifact.size / 2**20
    result.update({"array_read_mib": round(S.nbytes / 2**20, 1), "file_read_mib": round(read_mib, 1),
                   "m": info["auto_sketch"]["m"],
                   "energy_share": info["auto_sketch"]["energy_share"], "steps": info.get("steps"),
                   "indices_sha256": hashlib.sha256(sel.indices_.tobytes()).hexdigest()})
    print(json.dumps(result))


def run_child(args: list[str], timeout: float) -> tuple[dict, float, float]:
    """Run this script as a child; return (its JSON line, wall seconds, its peak RSS in MiB from wait4)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not lines:
        timed_out = wall >= timeout
        return ({"error": f"exit {proc.returncode} after {wall:.0f} s" + (" (timed out)" if timed_out else ""),
                 "timed_out": timed_out}, wall, usage.ru_maxrss / 1024.0)
    return json.loads(lines[-1]), wall, usage.ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated pool sizes N")
    parser.add_argument("--methods", default="skmm,skmm_v2,skmm_best")
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--budget", type=int, default=10_000)
    parser.add_argument("--v2-budget", type=int, default=None,
                        help="budget for skmm_v2 (one pass over the sketch per row: costly at 10^7)")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--devices", default="numpy",
                        help="comma-separated: numpy (the default path), cpu, cuda (skmm and skmm_v2 as torch ops)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    parser.add_argument("--store", default=None, help="folder for the sketch tables (default: a temporary one)")
    parser.add_argument("--auto", action="store_true",
                        help="sketch_dim='auto' on an N × 256 sketch: the old path (whole sketch) against the new")
    parser.add_argument("--paths", default="old,new", help="with --auto: some of old, new, reduced")
    sub = parser.add_subparsers(dest="child")
    p = sub.add_parser("prepare")
    p.add_argument("store_dir")
    p.add_argument("N", type=int)
    p.add_argument("m", type=int)
    q = sub.add_parser("measure")
    q.add_argument("store_dir")
    q.add_argument("ref")
    q.add_argument("method")
    q.add_argument("n", type=int)
    q.add_argument("max_iter", type=int)
    q.add_argument("device", nargs="?", default="numpy")
    r = sub.add_parser("moment")
    r.add_argument("store_dir")
    r.add_argument("ref")
    rr = sub.add_parser("reduce")
    rr.add_argument("store_dir")
    rr.add_argument("ref")
    a = sub.add_parser("measure-auto")
    for name in ("store_dir", "ref", "method"):
        a.add_argument(name)
    a.add_argument("n", type=int)
    a.add_argument("max_iter", type=int)
    a.add_argument("path", choices=("old", "new", "reduced"))
    a.add_argument("moment", nargs="?", default="")
    args = parser.parse_args()
    if args.child:
        if args.child == "prepare":
            prepare(args.store_dir, args.N, args.m)
        elif args.child == "moment":
            moment_child(args.store_dir, args.ref)
        elif args.child == "reduce":
            reduce_child(args.store_dir, args.ref)
        elif args.child == "measure-auto":
            measure_auto(args.store_dir, args.ref, args.method, args.n, args.max_iter, args.path, args.moment)
        else:
            measure(args.store_dir, args.ref, args.method, args.n, args.max_iter, args.device)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: tearing down torch alone adds ~125 MiB to the process's peak

    # bench/_common imports torch: the parent stays small until the children are done, because a child's ru_maxrss
    # starts from its parent's RSS at fork time
    here = pathlib.Path(__file__).resolve().parent
    if args.auto:
        return main_auto(args, here)
    previous = pathlib.Path(os.environ.get("SKMM_BENCH_OUT", here / "out")) / "select_scale.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else []
    with tempfile.TemporaryDirectory(prefix="skmm-select-scale-", dir=args.store) as root:
        for N in (int(float(s)) for s in args.sizes.split(",")):
            store_dir = os.path.join(root, f"store-{N}")
            made, _, made_peak = run_child(["prepare", store_dir, str(N), str(args.sketch_dim)], args.timeout)
            print(json.dumps({"N": N, "prepare": made, "prepare_peak_rss_mib": round(made_peak, 1)}), flush=True)
            if "ref" not in made:
                continue
            for method in args.methods.split(","):
                n = args.v2_budget if method == "skmm_v2" and args.v2_budget else args.budget
                for device in args.devices.split(",") if method in ("skmm", "skmm_v2") else ["numpy"]:
                    got, wall, peak = run_child(["measure", store_dir, json.dumps(made["ref"]), method, str(n),
                                                 str(args.max_iter), device], args.timeout)
                    run = {"N": N, "m": args.sketch_dim, "n": n, "method": method, "device": device,
                           "child_wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1), **got}
                    print(json.dumps(run), flush=True)
                    runs = [r for r in runs if _key(r) != _key(run)] + [run]
    sys.path.insert(0, str(here))
    from _common import record

    record("select_scale", {"runs": sorted(runs, key=_key)})


def main_auto(args: argparse.Namespace, here: pathlib.Path) -> None:
    """--auto: per N, write an N × 256 sketch, compute its moment once, then each method along each path."""
    from skmm.select.moment_matching import AUTO_M_MAX

    name = os.environ.get("SKMM_BENCH_NAME", "select_scale_auto")
    previous = pathlib.Path(os.environ.get("SKMM_BENCH_OUT", here / "out")) / f"{name}.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else []
    paths = args.paths.split(",")
    with tempfile.TemporaryDirectory(prefix="skmm-select-auto-", dir=args.store) as root:
        for N in (int(float(s)) for s in args.sizes.split(",")):
            store_dir = os.path.join(root, f"store-{N}")
            made, _, made_peak = run_child(["prepare", store_dir, str(N), str(AUTO_M_MAX)], args.timeout)
            print(json.dumps({"N": N, "prepare": made, "prepare_peak_rss_mib": round(made_peak, 1)}), flush=True)
            if "ref" not in made:
                continue
            ref = json.dumps(made["ref"])
            moment = None
            if "new" in paths:
                got, wall, peak = run_child(["moment", store_dir, ref], args.timeout)
                run = {"N": N, "m_max": AUTO_M_MAX, "method": "-", "n": 0, "path": "moment",
                       "child_wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1), **got}
                print(json.dumps(run), flush=True)
                runs = [r for r in runs if _key_auto(r) != _key_auto(run)] + [run]
                moment = got.get("moment")
            stage = None
            if "reduced" in paths:  # the sketch-moment stage as it is now: the moment and the reduced table, once
                got, wall, peak = run_child(["reduce", store_dir, ref], args.timeout)
                run = {"N": N, "m_max": AUTO_M_MAX, "method": "-", "n": 0, "path": "reduce",
                       "child_wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1), **got}
                print(json.dumps(run), flush=True)
                runs = [r for r in runs if _key_auto(r) != _key_auto(run)] + [run]
                stage = got.get("stage")
            for method in args.methods.split(","):
                for path in paths:
                    if (path == "new" and moment is None) or (path == "reduced" and stage is None):
                        continue
                    extra = {"new": [json.dumps(moment)], "reduced": [json.dumps(stage)]}.get(path, [])
                    got, wall, peak = run_child(["measure-auto", store_dir, ref, method, str(args.budget),
                                                 str(args.max_iter), path, *extra], args.timeout)
                    run = {"N": N, "m_max": AUTO_M_MAX, "n": args.budget, "method": method, "path": path,
                           "max_iter": args.max_iter, "child_wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1),
                           **got}
                    print(json.dumps(run), flush=True)
                    runs = [r for r in runs if _key_auto(r) != _key_auto(run)] + [run]
    sys.path.insert(0, str(here))
    from _common import record

    record(name, {"runs": sorted(runs, key=_key_auto)})


def _key_auto(run: dict) -> tuple:
    """An --auto run's identity: pool size, method, budget, path (old, new, reduced, or the moment/reduce child)."""
    return run["N"], run["method"], run["n"], run["path"]


def _key(run: dict) -> tuple:
    """A run's identity: pool size, method, budget and the device its solver ran on (older runs: numpy)."""
    return run["N"], run["method"], run["n"], run.get("device", "numpy")


if __name__ == "__main__":
    main()
