"""The one listing of an image folder, used by the ingest *and* by its cache fingerprint.

Both walk the same files or the cache goes stale (an image edited inside a symlinked class folder was invisible to
a fingerprint that did not follow the link; a ``.png`` renamed to ``.txt`` was still counted). Rules:

- each visible first-level subfolder of the root is a class (its name is the label); files directly in the root
  are ignored; a class name that is not valid UTF-8 is a :class:`SourceError` naming the folder (labels are text);
- inside a class folder, files are found recursively, in a fixed order (a folder's files sorted by name, then its
  subfolders sorted by name, depth first — ``os.walk``'s order), by extension (:data:`IMAGE_EXTENSIONS`,
  case-insensitive, of the name as listed); other files are counted as ignored;
- hidden names (starting with ``.``: ``.DS_Store``, ``.ipynb_checkpoints``) are skipped at every level;
- **symbolic links are followed**, to files and to folders alike (a folder that links back to one of its own
  ancestors is skipped, so a cycle cannot loop); a file's path is the path through the link, not its target;
- a broken link or a special file (FIFO, socket, device) with an image extension is listed, and the ingest
  quarantines it (it is never opened: reading a FIFO would block).

Listing is streaming (a generator of :class:`ListedFile`): a pool of millions never becomes a list in memory;
only the folder being listed is (its entries, sorted for a fixed order, as ``os.walk`` holds them too).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from storage.errors import redact
from storage.ingest.common import IMAGE_EXTENSIONS, SourceError, SourceNotFoundError, absolute, is_url, shown_path

__all__ = ["ImageFolder", "ListedFile", "open_image_folder"]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ListedFile:
    """One image file of the folder: absolute path (through links), path relative to the root, class label."""

    path: str
    rel: str
    label: str
    entry: os.DirEntry = field(compare=False, repr=False)

    def is_regular(self) -> bool:
        """A regular file (links followed); False for a broken link, a FIFO, a socket, a device."""
        try:
            return self.entry.is_file()
        except OSError:
            return False


@dataclass
class ImageFolder:
    """An opened image folder: its resolved root and class folders; :meth:`files` streams the images."""

    root: pathlib.Path
    class_dirs: list[os.DirEntry]
    n_ignored: int = 0

    def files(self) -> Iterator[ListedFile]:
        """Every image file, class by class, in the fixed walk order; counts other files in ``n_ignored``."""
        self.n_ignored = 0
        for class_dir in self.class_dirs:
            yield from self._walk(class_dir.path, class_dir.name, class_dir.name, set())

    def _walk(self, directory: str, rel: str, label: str, ancestors: set[tuple[int, int]]) -> Iterator[ListedFile]:
        try:
            st = os.stat(directory)
            with os.scandir(directory) as it:
                entries = sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)
        except OSError:
            return  # an unreadable subfolder holds nothing we can list (as os.walk does)
        here = ancestors | {(st.st_dev, st.st_ino)}
        subdirs = []
        for entry in entries:
            if _is_dir(entry):
                subdirs.append(entry)
            elif _is_image_name(entry.name):
                yield ListedFile(entry.path, f"{rel}/{entry.name}", label, entry)
            else:
                self.n_ignored += 1
        for entry in subdirs:
            try:
                target = entry.stat()
            except OSError:
                continue
            if (target.st_dev, target.st_ino) in here:
                continue  # a link back to an ancestor: following it would never end
            yield from self._walk(entry.path, f"{rel}/{entry.name}", label, here)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _check_label(name: str, path: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(f"class folder {shown_path(path)} has a name that is not valid UTF-8; rename it "
                          "(a class folder's name is its label, which must be text)") from None


def open_image_folder(folder: str | os.PathLike) -> ImageFolder:
    """Check and open ``folder/<label>/**/<image>``; raises SourceNotFoundError (missing) or SourceError (a URL,
    not a directory, empty, no class subfolders, a class name that is not UTF-8), each naming the folder."""
    text = os.fspath(folder)
    if is_url(text):
        raise SourceError(f"image folder must be a local folder, got {redact(text)}; list remote files in a "
                          "manifest (or pack them as WebDataset tar shards)")
    root = absolute(text)
    if not root.exists():
        raise SourceNotFoundError(f"image folder {shown_path(root)} does not exist")
    if not root.is_dir():
        raise SourceError(f"image folder {shown_path(root)} is not a directory")
    with os.scandir(root) as it:
        entries = sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)
    if not entries:
        raise SourceError(f"image folder {shown_path(root)} is empty; expected class subfolders "
                          f"{shown_path(root)}/<label>/<images>")
    class_dirs = [e for e in entries if _is_dir(e)]
    if not class_dirs:
        raise SourceError(f"image folder {shown_path(root)} has no class subfolders; expected "
                          f"{shown_path(root)}/<label>/<images>")
    for entry in class_dirs:
        _check_label(entry.name, entry.path)
    return ImageFolder(root, class_dirs)
