"""Ingest WebDataset tar shards — the layout img2dataset and DataComp write — local or at any fsspec URL.

A shard is a tar whose members ``<key>.<ext>`` group into samples: the key is the member's path up to the first
dot of its file name, members of one sample are adjacent (WebDataset's rule). A sample is one image member
(``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``, ``gif``, ``tif``, ``tiff``) plus its label, taken from the first
of ``label_from`` that the sample has: ``cls`` (the text of ``<key>.cls``), ``txt`` (the text of
``<key>.txt``), ``json`` (the ``json_label_field`` of ``<key>.json``). Other members are ignored.

- An image that does not decode (or is empty, or larger than ``max_pixels``) is quarantined as
  ``<tar uri>#<member>`` with the reason; a key with a label but no image, and a second image for one key, too;
- a missing or unreadable tar, or one cut short, is quarantined as ``<tar uri>`` (samples read before the damage
  are kept); a sample without a label stops the run with a :class:`SourceError` naming the tar and the key.

Shards are named by a path or URL, a folder or prefix (its ``*.tar`` files), a brace pattern
(``shards-{000000..000009}.tar``, also ``{a,b}``), a glob (``s3://bucket/pool/*.tar``), or a list of these.
Each tar is streamed once, front to back (``tarfile`` stream mode; remote objects through a read-ahead buffer),
one tar after another; hashing and decoding run on the bounded reader pool, so memory holds O(workers) images.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from storage.artifacts import ArtifactStore
from storage.errors import redact
from storage.ingest.checked import CheckedImages
from storage.ingest.common import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SHARD_ROWS,
    IMAGE_EXTENSIONS,
    IngestResult,
    SourceError,
    SourceNotFoundError,
    absolute,
    check_common,
    is_url,
    norm_label,
    one_line,
    raise_if_transient,
)
from storage.ingest.manifest import read_problem, source_uri
from storage.ingest.reading import SourceFiles, ordered_map
from storage.ingest.reuse import (
    BaseSamples,
    SourceHashes,
    read_tar_members,
    readable,
    remove_tar_members,
    source_key,
    write_tar_members,
)
from storage.ingest.writer import DatasetWriter

__all__ = ["LABEL_SOURCES", "expand_braces", "ingest_webdataset", "resolve_shards"]

LABEL_SOURCES = ("cls", "txt", "json")
_IMAGE_EXTS = frozenset(e[1:] for e in IMAGE_EXTENSIONS)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key = up to the name's first dot
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → ``a-000.tar, a-001.tar, a-002.tar`` (zero-padded to the first bound's width);
    ``{x,y}`` → both; several groups expand left to right. No braces: the pattern itself."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = int(numeric.group(1)), int(numeric.group(2))
        width = len(numeric.group(1))
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]  # not a brace expression: keep it literally
        return [head + options[0] + rest for rest in expand_braces(tail)]
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def _is_pattern(text: str) -> bool:
    return bool(_BRACE.search(text)) or bool(_GLOB_CHARS.search(text))


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike],
                   files: SourceFiles) -> list[str]:
    """The tar shards a spec names, in order: absolute local paths or URLs (see the module docstring).

    Raises SourceNotFoundError when nothing local matches (a missing file or folder, an empty folder or
    pattern); remote shards that do not exist are quarantined by the ingest instead."""
    specs = [os.fspath(s) for s in ([shards] if isinstance(shards, str | os.PathLike) else shards)]
    if not specs:
        raise SourceError("webdataset: no shards given")
    out: list[str] = []
    for spec in specs:
        for item in expand_braces(spec):
            if is_url(item):
                if not _GLOB_CHARS.search(item) and not item.lower().endswith(_TAR_SUFFIXES):
                    item = item.rstrip("/") + "/*.tar"  # a remote folder (prefix): its .tar objects
                out.extend(files.glob(item) if _GLOB_CHARS.search(item) else [item])
                continue
            path = absolute(item) if not _GLOB_CHARS.search(item) else None
            if path is None:
                out.extend(sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(item.removeprefix(
                    "file://")))))
            elif path.is_dir():
                out.extend(sorted(str(p) for p in path.iterdir()
                                  if p.name.lower().endswith(".tar") and not p.name.startswith(".")))
            else:
                out.append(str(path))
    if all(not is_url(s) and not os.path.exists(s) for s in out):  # also when nothing matched
        raise SourceNotFoundError(f"webdataset {_shown(specs)}: no tar shard exists there "
                                  "(expected a .tar file, a folder of them, a brace pattern or a glob)")
    return out


def _shown(specs: Sequence[str]) -> str:
    return redact(specs[0] if len(specs) == 1 else f"{specs[0]} (+{len(specs) - 1} more)")


def _text(data: bytes, where: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{where}: its {what} member is not UTF-8 text") from None


def _label(members: Mapping[str, tuple[str, bytes]], label_from: Sequence[str], json_field: str,
           where: str) -> str | None:
    for source in label_from:
        if source not in members:
            continue
        name, data = members[source]
        if source != "json":
            return norm_label(_text(data, where, f".{source}"), where)
        try:
            meta = json.loads(_text(data, where, ".json"))
        except ValueError:
            raise SourceError(f"{where}: {name} is not valid JSON") from None
        if isinstance(meta, dict) and meta.get(json_field) is not None:
            return norm_label(meta[json_field], where)
    return None


# An item for the reader pool: (source uri, label, image bytes, reason it is already quarantined).
_Item = tuple[str, str, bytes | None, str | None]


def _group(tar_uri: str, tar_shown: str, key: str, images: list[tuple[str, bytes]],
           members: dict[str, tuple[str, bytes]], label_from: Sequence[str], json_field: str) -> Iterator[_Item]:
    where = f"webdataset shard {tar_shown} sample {key!r}"
    label = _label(members, label_from, json_field, where)
    if not images:
        if label is not None:
            yield f"{tar_uri}#{key}", label, None, "no image member for this key"
        return
    if label is None:
        wanted = ", ".join(f".{s}" if s != "json" else f".json with {json_field!r}" for s in label_from)
        raise SourceError(f"{where} has no label (expected a {wanted} member); every sample needs one")
    (first, data), *others = images
    yield f"{tar_uri}#{first}", label, data, None
    for name, _ in others:
        yield f"{tar_uri}#{name}", label, None, f"a second image for key {key!r} (one image per sample)"


def _tar_items(shard: str, files: SourceFiles, label_from: Sequence[str], json_field: str) -> Iterator[_Item]:
    """The samples of one tar, streamed (one sample's members in memory at a time)."""
    tar_uri, tar_shown = source_uri(shard), redact(shard)
    try:
        fh = files.open(shard)
    except FileNotFoundError:
        yield tar_uri, "", None, "missing file"
        return
    except Exception as exc:
        raise_if_transient(exc, tar_shown)
        yield tar_uri, "", None, f"cannot read file: {read_problem(exc)}"
        return
    keep = _IMAGE_EXTS | set(label_from)
    key: str | None = None
    images: list[tuple[str, bytes]] = []
    members: dict[str, tuple[str, bytes]] = {}
    n = 0
    with fh:
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for info in tar:
                    match = _KEY.match(info.name)
                    if not info.isfile() or match is None or posixpath.basename(info.name).startswith("."):
                        continue
                    member_key, ext = match.group(1), match.group(2).lower()
                    if member_key != key:
                        if key is not None:
                            yield from _group(tar_uri, tar_shown, key, images, members, label_from, json_field)
                            n += 1
                        key, images, members = member_key, [], {}
                    if ext not in keep:
                        continue
                    reader = tar.extractfile(info)
                    data = reader.read() if reader is not None else b""
                    if ext in _IMAGE_EXTS:
                        images.append((info.name, data))
                    else:
                        members.setdefault(ext, (info.name, data))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise_if_transient(exc, tar_shown)
            if key is not None:  # the sample being assembled when the tar broke is lost with the rest
                yield f"{tar_uri}#{key}", "", None, "cut off by the tar's damage (see the tar's own row)"
            yield tar_uri, "", None, f"cannot read tar (after {n} samples): {one_line(exc)}"
            return
    if key is not None:
        yield from _group(tar_uri, tar_shown, key, images, members, label_from, json_field)


def ingest_webdataset(store: ArtifactStore, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                      label_from: Sequence[str] = LABEL_SOURCES, json_label_field: str = "label",
                      val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                      shard_rows: int = DEFAULT_SHARD_ROWS, storage_options: Mapping[str, Any] | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS, reuse: bool = True) -> IngestResult:
    """Ingest WebDataset tar shards (see the module docstring) into a dataset on ``store``.

    ``source_uri`` of a sample is ``<tar uri>#<image member>``; splits: :func:`assign_split`. Remote shards use
    ``storage_options``, else credentials from the environment (a public bucket is read anonymously).

    With ``reuse`` (the default), a tar unchanged since this store's last ingest of these shards (same path, size,
    mtime, ctime and inode; or the same URL, size and ETag) that was read whole without a quarantined member is
    not read again: its samples (ids, labels) come from the store's record of it and their bytes from that
    dataset's shards (:mod:`storage.ingest.reuse`); the dataset is the same either way. ``n_reused`` in the result
    counts the samples not read.

    Raises SourceNotFoundError (no shard there) or SourceError (a sample without a label, naming tar and key; a
    label that is not text; the same image under two labels; fewer than 2 classes, or than 2 in train).
    """
    check_common(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, shard_rows=shard_rows,
                 max_pixels=max_pixels)
    label_from = tuple(label_from)
    if not label_from or not set(label_from) <= set(LABEL_SOURCES):
        raise ValueError(f"label_from must be some of {LABEL_SOURCES}; got {label_from!r}")
    files = SourceFiles(storage_options)
    specs = [os.fspath(s) for s in ([shards] if isinstance(shards, str | os.PathLike) else shards)]
    tars = resolve_shards(specs, files)
    checked = CheckedImages(store, max_pixels)
    scope = {"kind": "webdataset", "root": _tars_root(tars), "label_from": list(label_from),
             "json_label_field": json_label_field}
    hashes = SourceHashes(store, scope, checked.policy) if reuse else None
    previous = hashes.load() if hashes is not None else None
    keys: list[bytes | None] = [None] * len(tars)
    lists: list[str | None] = [None] * len(tars)  # the member list an unchanged tar is replayed from

    def items() -> Iterator[tuple[int, _Item | None, str | None]]:
        """The pool's entries in source order: a tar's items, or (t, None, its member list's sha256) for a tar
        known unchanged — the list itself is read when the entry is taken, so reading ahead holds no lists."""
        for t, shard in enumerate(tars):
            if hashes is not None:
                keys[t] = source_key(shard, files)[0]
                known = hashes.lookup(keys[t]) if keys[t] is not None else None
                if known is not None and readable(shard):
                    yield t, None, known
                    continue
            for item in _tar_items(shard, files, label_from, json_label_field):
                yield t, item, None

    def check(entry: tuple[int, _Item | None, str | None]
              ) -> tuple[int, _Item | None, str | None, str | None, str | None]:
        t, item, known = entry
        if known is not None:
            return t, item, known, None, None
        data, problem = item[2], item[3]
        if problem is not None or data is None:
            return t, item, None, None, problem or "unreadable"
        sid, problem = checked.check(data)
        return t, item, None, sid, problem

    # tars read now and read whole without a quarantined member: their member lists (written as each tar ends,
    # so memory holds one tar's list; nothing names them until the source-hash record, after publishing)
    listed: list[tuple[int, str]] = []
    current: list[Any] = [None, None]  # [tar index, its members so far, or None once one was quarantined]

    def end_tar() -> None:
        t, members = current
        if t is not None and members and keys[t] is not None:
            listed.append((t, write_tar_members(store, members)))
        current[:] = [None, None]

    def take(writer: DatasetWriter, t: int, item: _Item, sid: str | None, problem: str | None) -> None:
        """One item of a tar read now."""
        uri, label, data, _ = item
        if current[0] != t:
            end_tar()
            current[:] = [t, []]
        if sid is None or data is None:
            writer.quarantine(uri, problem or "unreadable")
            current[1] = None  # a tar with a quarantined member is read again next time
            return
        writer.add(sid, uri, label, None, data)
        if current[1] is not None and hashes is not None:
            current[1].append((uri, sid, label, len(data)))

    def replay(writer: DatasetWriter, t: int, known: str) -> None:
        """A tar known unchanged: its members in one step from its list; read now instead when the list is gone
        or a sample of it is in a lost shard of the previous dataset (the tar is read once, not each member)."""
        members = read_tar_members(store, known)
        if members is not None and not any(hashes.lost(sid) for _, sid, _, _ in members):
            lists[t] = known
            writer.add_reused(members)
            return
        del members
        for t_, item, _, sid, problem in ordered_map(
                check, ((t, item, None) for item in _tar_items(tars[t], files, label_from, json_label_field))):
            take(writer, t_, item, sid, problem)

    tar_of_uri = {source_uri(t): t for t in tars}

    def fetch(uri: str) -> bytes:
        return _read_member(uri, files, tar_of_uri)

    with DatasetWriter(store, source_name=f"webdataset {_shown(specs)}", shard_rows=shard_rows, seed=seed,
                       val_fraction=val_fraction, test_fraction=test_fraction,
                       base=BaseSamples(store, previous, fetch, hashes.lost_shards) if previous is not None
                       else None) as writer:
        for t, item, known, sid, problem in ordered_map(check, items(), inline=lambda entry: entry[2] is not None):
            if known is not None:
                replay(writer, t, known)
            else:
                take(writer, t, item, sid, problem)
        end_tar()
        superseded: set[str] = set()
        if hashes is not None:
            superseded = hashes.values()  # the member lists the last record named
            hashes.release()  # every lookup is done: free the record before the second pass
        result = writer.finish(source=_source(specs, tars))
    checked.commit()  # only once the dataset is published
    if hashes is not None:
        for t, sha in listed:
            hashes.record(keys[t], sha)
        for t, known in enumerate(lists):
            if known is not None:
                hashes.record(keys[t], known)
        if hashes.commit(result.dataset, writer.new_rows) is not None:
            remove_tar_members(store, superseded - {sha for _, sha in listed} - {k for k in lists if k})
    return result


def _tars_root(tars: Sequence[str]) -> str:
    """The folder (or URL prefix) that holds all the tars: what identifies a WebDataset pool across nights, since
    its spec may not stay the same (a brace range that grows, a list with one more tar)."""
    dirs = [t.rsplit("/", 1)[0] for t in tars]
    common = posixpath.commonprefix(dirs)
    return common if all(d == common for d in dirs) else common[:common.rfind("/") + 1]


def _read_member(uri: str, files: SourceFiles, tars: Mapping[str, str]) -> bytes:
    """One member's bytes by scanning its tar (``<tar uri>#<member>``): the fallback when the store lost them.
    ``tars`` maps each tar's URI to its path or URL, so that a ``#`` in a tar's URL or a member's name cannot
    split the URI in the wrong place."""
    target = name = None
    for i, ch in enumerate(uri):
        if ch == "#" and uri[:i] in tars:
            target, name = tars[uri[:i]], uri[i + 1:]
            break
    if target is None:
        raise FileNotFoundError(uri)
    with files.open(target) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for info in tar:
            if info.name == name and info.isfile():
                reader = tar.extractfile(info)
                return reader.read() if reader is not None else b""
    raise FileNotFoundError(uri)


def _source(specs: Sequence[str], tars: Sequence[str]) -> str:
    """The result's ``source``: the spec as a URI (a pattern stays a pattern), or the first shard's folder."""
    if len(specs) != 1:
        return source_uri(posixpath.dirname(tars[0]) if is_url(tars[0]) else os.path.dirname(tars[0]))
    spec = specs[0]
    if is_url(spec):
        return redact(spec)
    return "file://" + str(absolute(spec)) if _is_pattern(spec) else absolute(spec).as_uri()
