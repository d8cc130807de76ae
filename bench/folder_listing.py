"""What listing one flat class folder holds: a 10^7-image pool in a few class folders lists millions of files a
folder, and the listing keeps the folder being listed in memory (sorted, for a fixed order).

Two ways, each in a fresh process, over the same folder of ``--n`` empty ``.jpg`` files (names as
bench/scale_pool.py writes them):

- ``direntries``: what the listing held before — the folder's ``os.DirEntry`` objects, sorted by name (as
  ``os.walk`` holds them too);
- ``names``: the listing now (``storage.ingest.listing``): ``open_image_folder(...).files()`` up to its first file,
  i.e. the folder scanned, sorted and held as file names.

Peak of Python allocations (tracemalloc) and, in another fresh process, the peak RSS over the RSS before the
listing, per file.

    .venv/bin/python bench/folder_listing.py [--n 1000000]   # → bench/results/folder_listing.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import tracemalloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from scale import in_child


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def listed(root: str, how: str, trace: bool) -> dict:
    """Hold the class folder ``root/a`` the ``how`` way; the peak RSS above the start or (``trace``) the peak of
    Python allocations (tracemalloc's own records inflate RSS, so the two are measured in separate processes)."""
    from storage.ingest.listing import open_image_folder

    before = _rss_mib()
    if trace:
        tracemalloc.start()
    if how == "direntries":
        with os.scandir(os.path.join(root, "a")) as it:
            held = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        first = held[0].name
    else:
        files = open_image_folder(root).files()
        first = next(files).rel
    if trace:
        _, peak = tracemalloc.get_traced_memory()
        return {"first": first, "traced_peak_mib": round(peak / 2**20, 1)}
    return {"first": first, "rss_over_start_mib": round(_rss_mib() - before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent / "results" / "folder_listing.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "a"
        folder.mkdir()
        (pathlib.Path(tmp) / "b").mkdir()
        for i in range(args.n):
            (folder / f"{i:08d}.jpg").touch()
        result: dict = {"command": " ".join(sys.argv), "n_files": args.n}
        for how in ("direntries", "names"):
            traced, plain = in_child(listed, tmp, how, True), in_child(listed, tmp, how, False)
            row = {"traced_peak_mib": traced["traced_peak_mib"],
                   "traced_bytes_a_file": round(traced["traced_peak_mib"] * 2**20 / args.n),
                   "rss_over_start_mib": plain["rss_over_start_mib"],
                   "rss_bytes_a_file": round(plain["rss_over_start_mib"] * 2**20 / args.n),
                   "peak_rss_mib": plain["peak_rss_mib"], "seconds": plain["process_wall_s"]}
            result[how] = row
            print(how, row, flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
