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
only the folder being listed is, as its file names (sorted for a fixed order; ~75 bytes a file, where the
``os.DirEntry`` objects ``os.walk`` holds cost ~220), each name whose listed type is not a plain regular file
(links, special files: stat'ed when used; a plain file needs no stat to be known as one) marked by one character.
"""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from storage.errors import redact
from storage.ingest.common import IMAGE_EXTENSIONS, SourceError, SourceNotFoundError, absolute, is_url, shown_path

__all__ = ["ImageFolder", "ListedFile", "open_image_folder"]


_NOT_PLAIN = "\0"  # marks a listed name whose type is not a plain regular file (names never hold NUL)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class ListedFile:
    """One image file of the folder: absolute path (through links), path relative to the root, class label.
    Made as it is yielded (nothing per file is kept but its name while its folder is listed); its ``stat`` is
    taken once, on first use."""

    __slots__ = ("_plain", "_stat", "label", "path", "rel")

    def __init__(self, path: str, rel: str, label: str, plain: bool = False) -> None:
        self.path, self.rel, self.label = path, rel, label
        self._plain = plain  # the listing's file type said: a regular file, not a link
        self._stat: os.stat_result | None = None

    def __repr__(self) -> str:
        return f"ListedFile({self.rel!r}, label={self.label!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ListedFile) and (self.path, self.rel, self.label) == (other.path, other.rel,
                                                                                       other.label)

    def __hash__(self) -> int:
        return hash((self.path, self.rel, self.label))

    def stat(self) -> os.stat_result:
        """``os.stat`` of the file, links followed (taken once); OSError as ``os.stat`` raises it."""
        if self._stat is None:
            self._stat = os.stat(self.path)
        return self._stat

    def is_regular(self) -> bool:
        """A regular file (links followed); False for a broken link, a FIFO, a socket, a device."""
        if self._plain:
            return True
        try:
            return stat.S_ISREG(self.stat().st_mode)
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
        root = os.stat(self.root)
        for class_dir in self.class_dirs:  # the root is every class folder's ancestor: a link back to it is skipped
            yield from self._walk(class_dir.path, class_dir.name, class_dir.name, {(root.st_dev, root.st_ino)})

    def _walk(self, directory: str, rel: str, label: str, ancestors: set[tuple[int, int]]) -> Iterator[ListedFile]:
        try:
            st = os.stat(directory)
            images, subdirs = self._scan(directory)
        except OSError:
            return  # an unreadable subfolder holds nothing we can list (as os.walk does)
        here = ancestors | {(st.st_dev, st.st_ino)}
        for marked in images:
            plain = not marked.endswith(_NOT_PLAIN)
            name = marked if plain else marked[:-1]
            yield ListedFile(os.path.join(directory, name), f"{rel}/{name}", label, plain)
        del images
        for entry in subdirs:
            try:
                target = entry.stat()
            except OSError:
                continue
            if (target.st_dev, target.st_ino) in here:
                continue  # a link back to an ancestor: following it would never end
            yield from self._walk(entry.path, f"{rel}/{entry.name}", label, here)

    def _scan(self, directory: str) -> tuple[list[str], list[os.DirEntry]]:
        """A folder's image file names, sorted, each name whose listed type is not a plain regular file (a link,
        a FIFO, ...) marked by a trailing NUL, and its subfolders (sorted by name); other files are counted in
        ``n_ignored``. Only names are kept for files: an ``os.DirEntry`` with its path costs ~220 bytes, and a
        class folder may list millions of files. A name cannot hold NUL, so the mark sorts a name just where it
        sorts unmarked (before any longer name it is a prefix of), and costs one character."""
        images: list[str] = []
        subdirs: list[os.DirEntry] = []
        with os.scandir(directory) as it:
            for entry in it:
                if not _visible(entry.name):
                    continue
                if _is_dir(entry):
                    subdirs.append(entry)
                elif _is_image_name(entry.name):
                    images.append(entry.name if _is_plain_file(entry) else entry.name + _NOT_PLAIN)
                else:
                    self.n_ignored += 1
        images.sort()
        subdirs.sort(key=lambda e: e.name)
        return images, subdirs


def _is_plain_file(entry: os.DirEntry) -> bool:
    """A regular file that is not a link, from the listing's file type alone (no stat)."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


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
