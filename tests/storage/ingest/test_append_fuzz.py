"""Random growths of a folder and of WebDataset tars — files added, removed, moved, duplicated before or after
their original, rewritten in place, quarantined and repaired; tars added, removed, relabelled, given a broken member
—, with the previous dataset's shards deleted, truncated or given a broken footer in the store, tiny shards, run
limits, spill and bucket sizes, and now and then every file read again (none settled): each grown dataset holds
the rows (source URIs and images included) and version of a from-scratch ingest, and its readers answer alike.
``FUZZ_SEEDS`` / ``FUZZ_STEPS`` run more of them."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from helpers import tar_bytes
from ingest_pools import image_bytes, same_dataset

import storage.ingest.reuse as reuse_mod
import storage.ingest.writer as writer_mod
from storage import sample_reader
from storage.artifacts import ArtifactStore
from storage.datasets import load_manifest
from storage.ingest import SourceError, ingest_image_folder, ingest_webdataset

CLASSES = ("cat", "dog", "fox")
N_SEEDS = int(os.environ.get("FUZZ_SEEDS", "3"))
N_STEPS = int(os.environ.get("FUZZ_STEPS", "6"))


def _setup(monkeypatch, rng):
    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0)
    monkeypatch.setattr(writer_mod, "MAX_RUNS", rng.choice([1, 2, 3, 4]))
    monkeypatch.setattr(reuse_mod, "BASE_BATCH_ROWS", rng.choice([1, 2, 3, 256]))
    kw = dict(writer_mod.DatasetWriter.__init__.__kwdefaults__)
    kw["bucket_bytes"] = rng.choice([1, 300, 3000, 64 * 2**20])
    kw["buffer_bytes"] = rng.choice([1, 500, 16 * 2**20])
    monkeypatch.setattr(writer_mod.DatasetWriter.__init__, "__kwdefaults__", kw)


def _settle(monkeypatch, rng: random.Random) -> None:
    """Usually every unchanged file is reused; now and then none is (all changed too recently): all read now."""
    monkeypatch.setattr(reuse_mod, "SETTLE_NS", 0 if rng.random() < 0.8 else 10**30)


def _damage_store(store: ArtifactStore, dataset, rng: random.Random):
    """Damage a shard; returns a function restoring a same-size damage (the store's publish repairs only a copy
    of another size: a re-cut shard of the same rows would otherwise keep the damaged copy)."""
    shards = load_manifest(store, dataset).shards
    if not shards or rng.random() > 0.35:
        return lambda: None
    sh = rng.choice(shards)
    path = Path(store._path(store._rel_from_uri(sh.artifact.uri)))
    if not path.exists():
        return lambda: None
    what = rng.choice(["delete", "truncate", "footer"])
    if what == "delete":
        path.unlink()
    elif what == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, a broken footer: the size check passes, the metadata read fails
        good = path.read_bytes()
        data = bytearray(good)
        data[-12:-8] = b"\xff\xff\xff\x7f"
        path.write_bytes(bytes(data))
        return lambda: path.write_bytes(good)
    return lambda: None


def _compare(store, result, fresh_store, fresh):
    assert (result.dataset.version, result.n_samples, result.n_quarantined, result.n_duplicates_collapsed,
            result.classes, result.split_counts) == (fresh.dataset.version, fresh.n_samples, fresh.n_quarantined,
                                                       fresh.n_duplicates_collapsed, fresh.classes,
                                                       fresh.split_counts)
    assert (result.quarantine and result.quarantine.sha256) == (fresh.quarantine and fresh.quarantine.sha256)
    same_dataset(store, result.dataset, fresh_store, fresh.dataset)
    a = sample_reader.read_metadata(store, result.dataset, ["sample_id", "source_uri", "label", "split"])
    b = sample_reader.read_metadata(fresh_store, fresh.dataset, ["sample_id", "source_uri", "label", "split"])
    assert a.equals(b)
    for split in ("train", "val"):
        x = [t for t in sample_reader.iter_split(store, result.dataset, split, images=True, batch_rows=3)]
        y = [t for t in sample_reader.iter_split(fresh_store, fresh.dataset, split, images=True, batch_rows=3)]
        xs = [r for t in x for r in t.to_pylist()]
        ys = [r for t in y for r in t.to_pylist()]
        assert xs == ys


# ------------------------------------------------------------------------------------------------ folder
def _mutate_folder(pool: Path, rng: random.Random, step: int) -> None:
    files = sorted(p for p in pool.rglob("*") if p.is_file())
    good = [p for p in files if not p.name.startswith("bad")]
    content = {p: p.read_bytes() for p in good}
    by_class = {c: [p for p in good if p.parent.name == c] for c in CLASSES}

    def unique(p):
        return sum(1 for q in good if content[q] == content[p]) == 1

    for k in range(rng.randint(0, 4)):  # new files (names before or after the others)
        cls = rng.choice(CLASSES)
        prefix = rng.choice(["0", "m", "z"])
        (pool / cls / f"{prefix}new{step}-{k}.png").write_bytes(image_bytes(10_000 + 100 * step + k, size=8))
    for _ in range(rng.randint(0, 3)):  # removed
        cls = rng.choice(CLASSES)
        if len(by_class[cls]) > 3:
            p = rng.choice(by_class[cls])
            by_class[cls].remove(p)
            good.remove(p)
            p.unlink()
    if rng.random() < 0.4:  # moved to another class (content nowhere else)
        cands = [p for p in good if unique(p) and len(by_class[p.parent.name]) > 3]
        if cands:
            p = rng.choice(cands)
            other = rng.choice([c for c in CLASSES if c != p.parent.name])
            by_class[p.parent.name].remove(p)
            good.remove(p)
            p.rename(pool / other / f"mv{step}-{p.name}")
    if rng.random() < 0.5:  # duplicate in the same class, sorting before or after the original
        p = rng.choice(good)
        name = rng.choice([f"0dup{step}-{p.name}", f"zdup{step}-{p.name}"])
        shutil.copyfile(p, p.parent / name)
    if rng.random() < 0.3:  # rewritten in place: new content
        p = rng.choice(good)
        p.write_bytes(image_bytes(20_000 + step, size=8))
    if rng.random() < 0.2:  # rewritten in place with the content of another file of its class (a duplicate)
        cls = rng.choice(CLASSES)
        if len(by_class[cls]) > 1:
            a, b = rng.sample(by_class[cls], 2)
            a.write_bytes(content[b])
    if rng.random() < 0.3:  # a corrupt file appears
        (pool / rng.choice(CLASSES) / f"bad{step}.png").write_bytes(image_bytes(30_000 + step, size=8)[:30])
    bads = [p for p in files if p.name.startswith("bad")]
    if bads and rng.random() < 0.4:  # ... and is fixed or removed
        p = rng.choice(bads)
        if rng.random() < 0.5:
            p.unlink()
        else:
            p.write_bytes(image_bytes(40_000 + step, size=8))


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_folder_growths(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    _setup(monkeypatch, rng)
    store, pool = ArtifactStore(tmp_path / "store"), tmp_path / "pool"
    for c, cls in enumerate(CLASSES):
        (pool / cls).mkdir(parents=True)
        for i in range(6):
            (pool / cls / f"img{i}.png").write_bytes(image_bytes(100 * c + i, size=8))
    shard_rows = rng.choice([1, 2, 3, 5])
    result = ingest_image_folder(store, pool, shard_rows=shard_rows)
    n_fresh = 0
    for step in range(N_STEPS):
        restore = _damage_store(store, result.dataset, rng)
        _mutate_folder(pool, rng, step)
        _settle(monkeypatch, rng)
        if rng.random() < 0.15:
            shard_rows = rng.choice([1, 2, 3, 5])
        seed_ = 0 if rng.random() < 0.9 else 1
        fresh_store = ArtifactStore(tmp_path / f"fresh{n_fresh}")
        n_fresh += 1
        try:
            fresh = ingest_image_folder(fresh_store, pool, shard_rows=shard_rows, reuse=False, seed=seed_)
        except SourceError:
            with pytest.raises(SourceError):
                ingest_image_folder(store, pool, shard_rows=shard_rows, seed=seed_)
            restore()
            continue
        result = ingest_image_folder(store, pool, shard_rows=shard_rows, seed=seed_)
        restore()
        _compare(store, result, fresh_store, fresh)
        assert len(load_manifest(store, result.dataset).shard_runs()) <= max(writer_mod.MAX_RUNS, 1)
        shutil.rmtree(tmp_path / f"fresh{n_fresh - 1}")


# ------------------------------------------------------------------------------------------------ webdataset
def _write_tar(path: Path, members: list[tuple[str, int, str]], broken: bool) -> None:
    out = []
    for key, img, label in members:
        out += [(f"{key}.png", image_bytes(img, size=8)), (f"{key}.cls", label.encode())]
    if broken:
        out += [("zzbad.png", image_bytes(999, size=8)[:30]), ("zzbad.cls", b"cat")]
    path.write_bytes(tar_bytes(out))


def _mutate_tars(tars: dict[str, tuple[list[tuple[str, int, str]], bool]], rng: random.Random, step: int,
                 counter: list[int]) -> set[str]:
    """Mutate the tar model; returns the names of tars to (re)write."""
    changed: set[str] = set()

    def fresh_img():
        counter[0] += 1
        return counter[0]

    if rng.random() < 0.5:  # a new tar
        name = rng.choice(["0", "m", "z"]) + f"t{step}.tar"
        members = [(f"k{i:03d}", fresh_img(), rng.choice(CLASSES)) for i in range(rng.randint(1, 4))]
        tars[name] = (members, False)
        changed.add(name)
    if len(tars) > 2 and rng.random() < 0.3:  # a tar removed
        name = rng.choice(sorted(tars))
        del tars[name]
    for name in rng.sample(sorted(tars), min(len(tars), rng.randint(0, 2))):  # a tar rewritten
        members, broken = tars[name]
        members = list(members)
        op = rng.choice(["add", "drop", "relabel", "dup", "broken", "touch"])
        if op == "add":
            members.append((f"k{100 + step:03d}", fresh_img(), rng.choice(CLASSES)))
            members.sort()
        elif op == "drop" and len(members) > 1:
            members.pop(rng.randrange(len(members)))
        elif op == "relabel":
            i = rng.randrange(len(members))
            key, img, label = members[i]
            if sum(1 for ms, _ in tars.values() for _, j, _ in ms if j == img) == 1:
                members[i] = (key, img, rng.choice([c for c in CLASSES if c != label]))
        elif op == "dup":  # a copy of another tar's member, same label
            src = rng.choice(sorted(tars))
            if tars[src][0]:
                _, img, _ = rng.choice(tars[src][0])
                label = next(lab for ms, _ in tars.values() for _, j, lab in ms if j == img)
                members.append((f"k{200 + step:03d}", img, label))
                members.sort()
        elif op == "broken":
            broken = not broken
        tars[name] = (members, broken)
        changed.add(name)
    return changed


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_webdataset_growths(tmp_path, monkeypatch, seed):
    rng = random.Random(1000 + seed)
    _setup(monkeypatch, rng)
    store, shards = ArtifactStore(tmp_path / "store"), tmp_path / "shards"
    shards.mkdir()
    counter = [0]
    tars: dict[str, tuple[list[tuple[str, int, str]], bool]] = {}
    for t in range(4):
        members = []
        for i in range(4):
            counter[0] += 1
            members.append((f"k{i:03d}", counter[0], CLASSES[(t + i) % 3]))
        tars[f"m{t}.tar"] = (members, t == 1)
    for name, (members, broken) in tars.items():
        _write_tar(shards / name, members, broken)
    shard_rows = rng.choice([1, 2, 3, 5])
    result = ingest_webdataset(store, shards, shard_rows=shard_rows)
    for step in range(N_STEPS):
        restore = _damage_store(store, result.dataset, rng)
        changed = _mutate_tars(tars, rng, step, counter)
        for p in shards.iterdir():
            if p.name not in tars:
                p.unlink()
        for name in changed & set(tars):
            _write_tar(shards / name, *tars[name])
        _settle(monkeypatch, rng)
        fresh_store = ArtifactStore(tmp_path / f"fresh{step}")
        try:
            fresh = ingest_webdataset(fresh_store, shards, shard_rows=shard_rows, reuse=False)
        except SourceError:
            with pytest.raises(SourceError):
                ingest_webdataset(store, shards, shard_rows=shard_rows)
            restore()
            continue
        result = ingest_webdataset(store, shards, shard_rows=shard_rows)
        restore()
        _compare(store, result, fresh_store, fresh)
        shutil.rmtree(tmp_path / f"fresh{step}")

