"""Datasets and vector tables on local disk and on a real S3 protocol server: content-hash ids, an
order- and shard-independent version over every row, verified reads, and producers that never mix."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

import storage.datasets
from skmm.sketch.spec import SketchSpec
from storage.artifacts import ArtifactRef
from storage.datasets import (
    DatasetManifest,
    DatasetRef,
    VectorTableRef,
    combine_vectors,
    dataset_version,
    load_manifest,
    producer_digest,
    read_samples,
    read_vector_matrix,
    read_vectors,
    sample_id,
    sample_id_array,
    vector_sample_id,
    write_samples,
    write_vector_chunks,
    write_vectors,
)
from storage.errors import ArtifactCorruptedError, MalformedRecordError

CLIP = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}


def make_records(n: int = 40, seed: int = 0) -> list[dict]:
    """n distinct fake images; every fifth is referenced only (no bytes), every seventh is unlabelled."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        data = f"image-{i}".encode() + rng.randbytes(16)
        records.append({
            "sample_id": sample_id(data),
            "source_uri": f"file:///pool/{i}.png",
            "label": None if i % 7 == 0 else i % 3,
            "split": ("train", "val", "test")[i % 3],
            "data": None if i % 5 == 0 else data,
        })
    return records


def corrupt(store, ref: ArtifactRef) -> None:
    path = store._path(store._rel_from_uri(ref.uri))
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    store.fs.pipe_file(path, bytes(data))


# ---------------------------------------------------------------------------------------------- ids
def test_sample_id_is_sha256_of_canonical_bytes():
    assert sample_id(b"abc") == hashlib.sha256(b"abc").hexdigest()
    vec = [1.0, -2.5, 3.25]
    assert vector_sample_id(vec) == hashlib.sha256(np.array(vec, dtype="<f4").tobytes()).hexdigest()
    assert vector_sample_id(np.array(vec, dtype=">f8")) == vector_sample_id(vec)  # dtype/endianness independent


def test_producer_digest_matches_sketch_spec_digest():
    spec = SketchSpec(kind="gaussian", input_dim=64, output_dim=8, seed=3)
    assert producer_digest(spec.to_dict()) == spec.digest


# ---------------------------------------------------------------------------------------------- samples
def test_round_trip_sorted_by_id(store):
    records = make_records()
    ref = write_samples(store, records, shard_rows=16)
    assert ref.num_rows == 40 and DatasetRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    manifest = load_manifest(store, ref)
    assert [s.num_rows for s in manifest.shards] == [16, 16, 8]
    assert all(s.artifact.kind == "samples" and s.artifact.uri.endswith(".parquet") for s in manifest.shards)
    assert ref.manifest.kind == "dataset"
    table = read_samples(store, ref)
    by_id = {r["sample_id"]: r for r in records}
    assert table["sample_id"].to_pylist() == sorted(by_id)
    for row in table.to_pylist():
        want = by_id[row["sample_id"]]
        assert row["source_uri"] == want["source_uri"] and row["split"] == want["split"]
        assert row["label"] == (None if want["label"] is None else str(want["label"]))
        assert row["data"] == want["data"]
    only = read_samples(store, ref, columns=["sample_id", "label"])
    assert only.column_names == ["sample_id", "label"] and only.num_rows == 40


def test_ids_computed_from_data_and_table_input(store):
    datas = [b"one", b"two", b"three"]
    table = pa.table({"source_uri": ["a", "b", "c"], "label": pa.array([1, 2, None], pa.int64()),
                      "data": datas})
    ref = write_samples(store, table)
    out = read_samples(store, ref)
    assert out["sample_id"].to_pylist() == sorted(sample_id(d) for d in datas)
    with pytest.raises(ValueError, match="not the sha256 of its data"):
        write_samples(store, [{"sample_id": sample_id(b"x"), "source_uri": "a", "data": b"y"}])


def test_exact_duplicates_collapse_keeping_first_source(store):
    records = make_records(10)
    dup = dict(records[3], source_uri="s3://mirror/3.png")
    ref = write_samples(store, [*records, dup, dict(records[5])])
    assert ref.num_rows == 10
    table = read_samples(store, ref)
    row = next(r for r in table.to_pylist() if r["sample_id"] == records[3]["sample_id"])
    assert row["source_uri"] == records[3]["source_uri"]
    assert ref.version == write_samples(store, records).version


def test_conflicting_labels_or_splits_name_the_sample(store):
    records = make_records(10)
    sid = records[4]["sample_id"]
    with pytest.raises(ValueError, match=f"sample {sid} appears twice with conflicting labels"):
        write_samples(store, [*records, dict(records[4], label="other")])
    with pytest.raises(ValueError, match=f"sample {sid} appears twice with conflicting splits"):
        write_samples(store, [*records, dict(records[4], split="test" if records[4]["split"] != "test" else "val")])
    assert store.list_paths("objects/dataset") == []  # nothing half-written on refusal


def test_version_and_ids_invariant_under_reorder_and_resharding(store):
    records = make_records(50)
    base = write_samples(store, records, shard_rows=8)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    same_shards = write_samples(store, shuffled, shard_rows=8)
    assert same_shards == base  # same shards → byte-identical manifest, same ref
    assert store.get_bytes(same_shards.manifest) == store.get_bytes(base.manifest)
    resharded = write_samples(store, shuffled, shard_rows=13)
    assert resharded.version == base.version and resharded.num_rows == base.num_rows
    assert resharded.manifest != base.manifest
    ids = read_samples(store, base, columns=["sample_id"])["sample_id"].to_pylist()
    assert read_samples(store, resharded, columns=["sample_id"])["sample_id"].to_pylist() == ids
    single = write_samples(store, shuffled, shard_rows=1000)
    assert single.version == base.version and len(load_manifest(store, single).shards) == 1
    # the version is the documented hash over every (sample_id, label, split) row
    rows = [(r["sample_id"], None if r["label"] is None else str(r["label"]), r["split"]) for r in records]
    assert base.version == dataset_version(rows)


def test_version_changes_when_one_label_or_split_changes(store):
    records = make_records(30)
    base = write_samples(store, records).version
    last = sorted(records, key=lambda r: r["sample_id"])[-1]  # the final row: no prefix-only hashing
    relabelled = [dict(r, label="changed") if r is last else r for r in records]
    assert write_samples(store, relabelled).version != base
    unlabelled = [dict(r, label=None) if r is last else r for r in records]
    assert write_samples(store, unlabelled).version != base
    moved = [dict(r, split="train" if r["split"] != "train" else "test") if r is last else r for r in records]
    assert write_samples(store, moved).version != base
    # a different mirror (source_uri) or dropped bytes is the same dataset
    assert write_samples(store, [dict(r, source_uri="x://" + r["sample_id"], data=None) for r in records]).version \
        == base


def test_corrupted_shard_is_detected_and_named(store):
    ref = write_samples(store, make_records(30), shard_rows=10)
    shard = load_manifest(store, ref).shards[1].artifact
    corrupt(store, shard)
    with pytest.raises(ArtifactCorruptedError, match=shard.sha256[:12]) as info:
        read_samples(store, ref)
    assert shard.uri in str(info.value)


def test_empty_and_invalid_inputs_are_clear_errors(store):
    with pytest.raises(ValueError, match="empty dataset"):
        write_samples(store, [])
    with pytest.raises(ValueError, match="empty dataset"):
        write_samples(store, pa.table({"sample_id": pa.array([], pa.string()),
                                       "source_uri": pa.array([], pa.string())}))
    good = make_records(1)[0]
    with pytest.raises(ValueError, match="split must be one of"):
        write_samples(store, [dict(good, split="holdout")])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        write_samples(store, [dict(good, sample_id="row-17", data=None)])
    with pytest.raises(ValueError, match="unknown field"):
        write_samples(store, [dict(good, extra=1)])
    with pytest.raises(ValueError, match="label must be"):
        write_samples(store, [dict(good, label=True)])
    with pytest.raises(ValueError, match="label must be"):
        write_samples(store, [dict(good, label=[3])])
    # numbers are labels too: integral floats as integers, other numbers (regression targets) as decimal text
    assert read_samples(store, write_samples(store, [dict(good, label=3.0)])).column("label").to_pylist() == ["3"]
    assert read_samples(store, write_samples(store, [dict(good, label=2.5)])).column("label").to_pylist() == ["2.5"]
    with pytest.raises(ValueError, match="shard_rows"):
        write_samples(store, [good], shard_rows=0)


def test_manifest_and_ref_parsing_reject_malformed_records(store):
    ref = write_samples(store, make_records(12), shard_rows=5)
    good = json.loads(store.get_bytes(ref.manifest))
    assert DatasetManifest.from_dict(good) == load_manifest(store, ref)
    assert DatasetManifest.from_json(DatasetManifest.from_dict(good).to_json()).to_dict() == good
    bad_cases = [
        None, [], {}, {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "shards"},
        {**good, "format": "something-else"},
        {**good, "schema_version": 99},
        {**good, "version": "not-a-hash"},
        {**good, "num_rows": good["num_rows"] + 1},  # shards don't add up
        {**good, "num_rows": True},
        {**good, "shards": []},
        {**good, "shards": [{"artifact": {"uri": "x"}, "num_rows": 12}]},
        {**good, "shards": [{**good["shards"][0], "num_rows": -1}, *good["shards"][1:]]},
    ]
    for case in bad_cases:
        with pytest.raises(MalformedRecordError):
            DatasetManifest.from_dict(case)
    for text in (b"{not json", b"\xff\xfe", "[1, 2"):
        with pytest.raises(MalformedRecordError, match="not valid JSON"):
            DatasetManifest.from_json(text)
    ref_dict = ref.to_dict()
    for case in ({**ref_dict, "version": "x"}, {**ref_dict, "num_rows": 0}, {"manifest": ref_dict["manifest"]},
                 {**ref_dict, "manifest": load_manifest(store, ref).shards[0].artifact.to_dict()}):
        with pytest.raises(MalformedRecordError):
            DatasetRef.from_dict(case)
    # a ref whose version disagrees with its (intact) manifest is refused on read
    lying = DatasetRef(ref.manifest, "0" * 64, ref.num_rows)
    with pytest.raises(MalformedRecordError, match="does not match its ref"):
        read_samples(store, lying)


# ---------------------------------------------------------------------------------------------- vectors
def vectors(n: int = 20, k: int = 6, seed: int = 0) -> tuple[list[str], np.ndarray]:
    mat = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return [vector_sample_id(row) for row in mat], mat


def test_vectors_round_trip_and_reorder_by_ids(store):
    ids, mat = vectors()
    ref = write_vectors(store, ids, mat, CLIP)
    assert (ref.kind, ref.num_rows, ref.dim, ref.producer, ref.producer_digest) == \
        ("embeddings", 20, 6, CLIP, producer_digest(CLIP))
    assert VectorTableRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    stored_ids, stored = read_vectors(store, ref)
    assert stored_ids == sorted(ids) and stored.dtype == np.float32 and stored.shape == (20, 6)
    wanted = ids[::-1][:7]
    got_ids, got = read_vectors(store, ref, sample_ids=wanted)
    assert got_ids == wanted
    np.testing.assert_array_equal(got, mat[[ids.index(s) for s in wanted]])
    # the producer travels inside the Parquet file too
    import pyarrow.parquet as pq
    meta = pq.read_schema(pa.BufferReader(store.get_bytes(ref.artifact))).metadata
    assert json.loads(meta[b"skmm.producer"]) == CLIP and meta[b"skmm.producer_digest"].decode() == ref.producer_digest
    # same vectors, any order → same artifact
    perm = np.random.default_rng(1).permutation(20)
    assert write_vectors(store, [ids[i] for i in perm], mat[perm], CLIP) == ref
    missing = sample_id(b"not there")
    with pytest.raises(ValueError, match=f"1 of 2 requested sample ids are not in vector table .*{missing}"):
        read_vectors(store, ref, sample_ids=[ids[0], missing])


def test_sketch_tables_combine_and_refuse_other_producers(store):
    spec = SketchSpec(kind="gaussian", input_dim=64, output_dim=6, seed=3)
    ids, mat = vectors(30)
    a = write_vectors(store, ids[:20], mat[:20], spec.to_dict(), kind="sketch")
    b = write_vectors(store, ids[15:], mat[15:], spec.to_dict(), kind="sketch")  # 5 rows overlap, identical
    assert a.producer_digest == spec.digest and a.artifact.kind == "sketch"
    combined = combine_vectors(store, [b, a])
    assert combined.num_rows == 30 and combined == write_vectors(store, ids, mat, spec.to_dict(), kind="sketch")
    other_spec = SketchSpec(kind="gaussian", input_dim=64, output_dim=6, seed=4)
    c = write_vectors(store, ids[20:], mat[20:], other_spec.to_dict(), kind="sketch")
    with pytest.raises(ValueError, match=f"different producers.*{spec.digest}.*{other_spec.digest}"):
        combine_vectors(store, [a, c])
    changed = mat[15:].copy()
    changed[0, 0] += 1.0
    d = write_vectors(store, ids[15:], changed, spec.to_dict(), kind="sketch")
    with pytest.raises(ValueError, match=f"sample {ids[15]} has different vectors"):
        combine_vectors(store, [a, d])
    with pytest.raises(ValueError, match="at least one"):
        combine_vectors(store, [])


def test_vector_corruption_and_bad_inputs(store):
    ids, mat = vectors(8)
    ref = write_vectors(store, ids, mat, CLIP)
    corrupt(store, ref.artifact)
    with pytest.raises(ArtifactCorruptedError, match=ref.artifact.sha256[:12]):
        read_vectors(store, ref)
    with pytest.raises(ValueError, match="2 sample ids for a matrix of 8 rows"):
        write_vectors(store, ids[:2], mat, CLIP)
    with pytest.raises(ValueError, match="appears more than once"):
        write_vectors(store, [ids[0], *ids[:-1]], mat, CLIP)
    with pytest.raises(ValueError, match="empty vector table"):
        write_vectors(store, [], np.zeros((0, 4), np.float32), CLIP)
    bad = mat.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=f"sample {ids[2]} has non-finite"):
        write_vectors(store, ids, bad, CLIP)
    with pytest.raises(ValueError, match="kind must be one of"):
        write_vectors(store, ids, mat, CLIP, kind="gradients")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="producer"):
        write_vectors(store, ids, mat, {})
    tampered = {**ref.to_dict(), "producer": {**CLIP, "pretrained": "openai"}}
    with pytest.raises(MalformedRecordError, match="does not match its producer"):
        VectorTableRef.from_dict(tampered)


# ---------------------------------------------------------------------------------------------- vectors at scale
def test_write_vectors_bytes_are_pinned(store):
    """Every cached embeddings and sketch artifact in users' stores depends on these exact bytes."""
    ids, mat = vectors(20, 6)
    assert write_vectors(store, ids, mat, CLIP).artifact.sha256 == \
        "0974b6d968e9df4135549f7fc7d1c5f68f4794b60dcdd031029de66cafa34450"
    many = np.random.default_rng(7).standard_normal((70_000, 3)).astype(np.float32)  # two row groups
    hashed = [f"{(i * 2654435761) % (1 << 64):064x}" for i in range(70_000)]
    ref = write_vectors(store, hashed, many, CLIP)
    assert (ref.artifact.sha256, ref.artifact.size) == \
        ("c42144418e0cc6442b1b596294111449a510a773e247ded39445c10c05995c51", 1648609)
    chunks = ((np.sort(np.array(hashed, dtype="S64"))[lo:lo + 9999], many[np.argsort(hashed)][lo:lo + 9999])
              for lo in range(0, 70_000, 9999))
    assert write_vector_chunks(store, chunks, CLIP) == ref  # streamed in odd-sized chunks: the same artifact


def _combine_as_before(store, refs):
    """combine_vectors as it was: a dict of every sample's vector, then write_vectors."""
    seen = {}
    for ref in refs:
        ids, mat = read_vectors(store, ref)
        for sid, vec in zip(ids, mat, strict=True):
            prev = seen.setdefault(sid, vec)
            if prev is not vec and not np.array_equal(prev, vec):
                raise ValueError(f"sample {sid} has different vectors in two tables of producer "
                                 f"{refs[0].producer_digest}")
    ids = sorted(seen)
    return write_vectors(store, ids, np.stack([seen[s] for s in ids]), refs[0].producer, refs[0].kind)


def test_combine_vectors_streams_the_artifact_the_dict_merge_wrote(store, monkeypatch):
    monkeypatch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 8)  # many row groups per table
    spec = SketchSpec(kind="gaussian", input_dim=64, output_dim=5, seed=3).to_dict()
    ids, mat = vectors(60, 5)
    order = np.argsort(ids)
    ids, mat = [ids[i] for i in order], mat[order]
    mat[7] = -0.0  # equal to +0.0 below: an identical duplicate by value, not by bits
    signed = mat.copy()
    signed[7] = 0.0

    def table(rows, values=mat):
        return write_vectors(store, [ids[i] for i in rows], values[rows], spec, kind="sketch")

    a, b, c = table(range(0, 25)), table(range(25, 41)), table(range(41, 60))
    cases = {
        "disjoint, in order": [a, b, c],
        "disjoint, out of order": [c, a, b],
        "overlapping, identical": [table(range(0, 30)), table(range(20, 60))],
        "interleaved": [table(range(0, 60, 2)), table(range(1, 60, 2)), b],
        "repeated": [b, b],
        "first copy wins": [table(range(0, 10), signed), a, c, b],
    }
    for name, refs in cases.items():
        assert combine_vectors(store, refs) == _combine_as_before(store, refs), name
    changed = mat.copy()
    changed[30, 2] += 1.0
    with pytest.raises(ValueError, match=f"sample {ids[30]} has different vectors in two tables"):
        combine_vectors(store, [a, b, table(range(28, 33), changed), c])


def test_combine_vectors_of_a_corrupted_table_publishes_nothing(store):
    ids, mat = vectors(30)
    a = write_vectors(store, ids[:15], mat[:15], CLIP)
    b = write_vectors(store, ids[15:], mat[15:], CLIP)
    before = set(store.list_paths("objects/embeddings"))
    corrupt(store, b.artifact)
    with pytest.raises(ArtifactCorruptedError, match=b.artifact.sha256[:12]):
        combine_vectors(store, [a, b])
    assert set(store.list_paths("objects/embeddings")) == before


def test_read_vector_matrix_places_rows_by_id(store):
    ids, mat = vectors(50, 4)
    ref = write_vectors(store, ids, mat, CLIP)
    by_id = dict(zip(ids, mat, strict=True))
    np.testing.assert_array_equal(read_vector_matrix(store, ref), np.stack([by_id[s] for s in sorted(ids)]))
    wanted = [ids[3], ids[40], ids[3], ids[0]]  # any order, repeats allowed
    for form in (wanted, pa.array(wanted), pa.chunked_array([wanted[:1], wanted[1:]]), sample_id_array(wanted)):
        np.testing.assert_array_equal(read_vector_matrix(store, ref, form), np.stack([by_id[s] for s in wanted]))
    subset = sorted(ids)[5:30:3]  # sorted and unique: filled in place
    np.testing.assert_array_equal(read_vector_matrix(store, ref, subset), np.stack([by_id[s] for s in subset]))
    missing = [sample_id(b"a"), sample_id(b"b")]
    with pytest.raises(ValueError, match=f"3 of 5 requested sample ids are not in vector table .*{missing[0]}"):
        read_vector_matrix(store, ref, [ids[1], missing[0], missing[1], missing[0], ids[2]])
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        read_vector_matrix(store, ref, [ids[0].upper()])


def test_vector_table_with_a_damaged_footer_or_tail_is_reported_corrupted(store):
    ids, mat = vectors(30)
    ref = write_vectors(store, ids, mat, CLIP)
    path = store._path(store._rel_from_uri(ref.artifact.uri))
    data = bytearray(store.fs.cat_file(path))
    data[-20] ^= 0x01  # inside the Parquet footer
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(ArtifactCorruptedError, match=ref.artifact.sha256[:12]):
        read_vector_matrix(store, ref)
    store.fs.pipe_file(path, bytes(data[:-100]))  # truncated
    with pytest.raises(ArtifactCorruptedError, match=ref.artifact.sha256[:12]):
        read_vectors(store, ref)
    data[-20] ^= 0x01
    store.fs.pipe_file(path, bytes(data) + b"tail")  # the right bytes, and more
    with pytest.raises(ArtifactCorruptedError, match=rf"found .* \({ref.artifact.size + 4} bytes\)"):
        read_vector_matrix(store, ref)


def test_write_vector_chunks_checks_order_dims_and_values(store):
    ids, mat = vectors(10, 3)
    order = np.argsort(ids)
    ids, mat = [ids[i] for i in order], mat[order]
    assert write_vector_chunks(store, [(ids[:4], mat[:4]), (ids[4:], mat[4:])], CLIP) == \
        write_vectors(store, ids, mat, CLIP)
    with pytest.raises(ValueError, match="strictly ascending"):
        write_vector_chunks(store, [(ids[4:], mat[4:]), (ids[:4], mat[:4])], CLIP)
    with pytest.raises(ValueError, match="strictly ascending"):
        write_vector_chunks(store, [(ids[:4] + ids[3:4], mat[:5])], CLIP)
    with pytest.raises(ValueError, match="chunk of dim 2 after chunks of dim 3"):
        write_vector_chunks(store, [(ids[:4], mat[:4]), (ids[4:], mat[4:, :2])], CLIP)
    bad = mat.copy()
    bad[6, 0] = np.inf
    with pytest.raises(ValueError, match=f"sample {ids[6]} has non-finite"):
        write_vector_chunks(store, [(ids, bad)], CLIP)
    with pytest.raises(ValueError, match="empty vector table"):
        write_vector_chunks(store, [], CLIP)
    with pytest.raises(ValueError, match="3 sample ids for a chunk of 4 rows"):
        write_vector_chunks(store, [(ids[:3], mat[:4])], CLIP)


def test_read_vectors_of_a_large_pool_holds_one_copy_and_no_per_sample_objects(tmp_path, monkeypatch):
    """Defect: reading a pool's rows by id held the file's bytes, a str and a dict entry per sample and a
    reordered copy (~4x the matrix). Now: the output, the ids as bytes, and one (small here) row group."""
    from storage.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    N, k = 100_000, 16
    ids = [f"{(i * 2654435761) % (1 << 64):064x}" for i in range(N)]
    mat = np.random.default_rng(0).standard_normal((N, k)).astype(np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(storage.datasets, "DEFAULT_SHARD_ROWS", 4096)
        ref = write_vectors(store, ids, mat, CLIP)
    wanted = sorted(ids)
    read_vectors(store, ref, sample_ids=wanted[:10])  # first use: lazy imports and caches
    tracemalloc.start()
    try:
        got = read_vectors(store, ref, sample_ids=wanted)[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, mat[np.argsort(ids)])
    assert peak < 1.25 * (mat.nbytes + N * 64), (peak / 2**20, mat.nbytes / 2**20)


def test_vector_table_out_of_id_order_is_malformed(store):
    """A table not written by write_vectors (ids out of order) is refused, naming it, not silently misread."""
    import pyarrow.parquet as pq

    ids, mat = vectors(6, 2)
    ref = write_vectors(store, ids, mat, CLIP)
    table = pq.read_table(pa.BufferReader(store.get_bytes(ref.artifact)))
    shuffled = table.take([1, 0, 2, 3, 4, 5]).cast(table.schema)
    sink = pa.BufferOutputStream()
    pq.write_table(shuffled, sink)
    bad = VectorTableRef(store.put_bytes(sink.getvalue().to_pybytes(), "embeddings", ".parquet"), ref.kind,
                         ref.producer, ref.producer_digest, ref.num_rows, ref.dim)
    with pytest.raises(MalformedRecordError, match=f"vector table {bad.artifact.uri} is not sorted by sample id"):
        read_vector_matrix(store, bad)
