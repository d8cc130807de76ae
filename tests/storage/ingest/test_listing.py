"""The folder listing holds the folder being listed compactly: a pool of 10^7 images in a few flat class folders
lists millions of files per folder, and each was an ``os.DirEntry`` (~220 bytes with its name and path)."""

from __future__ import annotations

import os
import tracemalloc

from storage.ingest.listing import open_image_folder

N_FILES = 20_000


def first_file_and_peak(listing):
    """The first listed file, the peak of Python allocations while the listing got to it (its class folder
    scanned, sorted and held), and the other files."""
    tracemalloc.start()
    try:
        files = listing.files()
        first = next(files)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return first, peak, list(files)


def test_listing_a_flat_folder_holds_well_under_a_direntry_a_file(tmp_path):
    folder = tmp_path / "pool" / "cat"
    folder.mkdir(parents=True)
    for i in range(N_FILES):
        (folder / f"{i:08d}.jpg").touch()
    (tmp_path / "pool" / "dog").mkdir()
    (tmp_path / "pool" / "dog" / "x.png").touch()
    listing = open_image_folder(tmp_path / "pool")

    first, held, rest = first_file_and_peak(listing)
    assert [f.rel for f in [first, *rest]] == [f"cat/{i:08d}.jpg" for i in range(N_FILES)] + ["dog/x.png"]
    assert held / N_FILES < 110  # measured ~275 bytes a file with os.DirEntry objects, ~80 with names
    assert first.is_regular() and first.stat().st_size == 0 and first.path == os.path.join(folder, "00000000.jpg")


def test_a_folder_of_links_is_held_as_compactly_and_its_links_are_followed(tmp_path):
    """Pools of links (git-annex, DVC's link cache) list every file as a link: marked in its name, not in a set."""
    target = tmp_path / "blob"
    target.write_bytes(b"x")
    folder = tmp_path / "pool" / "cat"
    folder.mkdir(parents=True)
    for i in range(N_FILES):
        (folder / f"{i:08d}.jpg").symlink_to(target)
    (folder / "broken.png").symlink_to(tmp_path / "nowhere")
    (tmp_path / "pool" / "dog").mkdir()
    (tmp_path / "pool" / "dog" / "x.png").touch()
    listing = open_image_folder(tmp_path / "pool")

    first, held, rest = first_file_and_peak(listing)
    assert held / N_FILES < 110  # ~200 bytes a link with a set of the links' names
    assert [f.rel for f in [first, *rest]] == [f"cat/{i:08d}.jpg" for i in range(N_FILES)] + ["cat/broken.png",
                                                                                               "dog/x.png"]
    assert first.is_regular() and first.stat().st_size == 1
    broken = rest[-2]
    assert broken.path == os.path.join(folder, "broken.png") and not broken.is_regular()


def test_a_link_back_to_the_pool_root_is_an_ancestor_too(tmp_path):
    """A class folder holding a link to the pool's root: skipped like any link back to an ancestor (it listed
    the whole pool again under it, root files included)."""
    pool = tmp_path / "pool"
    for label in ("cat", "dog"):
        (pool / label).mkdir(parents=True)
        (pool / label / "x.png").touch()
    (pool / "loose.png").touch()
    (pool / "cat" / "back").symlink_to(pool, target_is_directory=True)
    assert [f.rel for f in open_image_folder(pool).files()] == ["cat/x.png", "dog/x.png"]
