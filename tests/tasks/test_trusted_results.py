"""What a cache hit may be, on local and S3 stores alike: a plain-JSON record (a planted pickle is a miss, never
loaded) whose artifacts, and the task's input artifacts, are still intact (else the task runs again, and a
damaged input fails it with an error naming the object and what to do). Each artifact is hashed once per run."""

from __future__ import annotations

import pytest
from prefect import flow, task

from storage.artifacts import ArtifactRef
from storage.errors import ArtifactCorruptedError
from tasks.cache import ContentCache
from tasks.store import open_store, result_storage, store_spec


@task(name="publish", cache_policy=ContentCache(code_version="trust-1"), persist_result=True,
      result_serializer="json")
def publish(text: str, store: dict) -> dict:
    return open_store(store).put_bytes(text.encode(), "blob").to_dict()


@task(name="measure", cache_policy=ContentCache(code_version="trust-1"), persist_result=True,
      result_serializer="json")
def measure(blob: dict, store: dict) -> dict:
    return {"length": len(open_store(store).get_bytes(ArtifactRef.from_dict(blob)))}


@flow(name="trust-pipeline")
def pipeline(text: str, store: dict) -> dict:
    opts = {"result_storage": result_storage(store)}
    made = publish.with_options(**opts)(text, store, return_state=True)
    blob = made.result()
    read = measure.with_options(**opts)(blob, store, return_state=True)
    outcome = read.result(raise_on_failure=False)
    return {"states": (made.name, read.name), "blob": blob, "outcome": outcome if read.is_completed() else str(outcome)}


class _Planted:
    """Unpickling this writes a marker file: proof that a planted record's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(params=["local", "s3"])
def spec(request, tmp_path):
    if request.param == "local":
        return store_spec(tmp_path / "store")
    name, options = request.getfixturevalue("s3_bucket")
    return store_spec(f"s3://{name}/store", options["endpoint_url"])


def _flip_a_byte(store: dict, ref: dict) -> None:
    st = open_store(store)
    path = st._path(st._rel_from_uri(ref["uri"]))
    data = bytearray(st.fs.cat_file(path))
    data[len(data) // 2] ^= 1
    st.fs.pipe_file(path, bytes(data))
    st.fs.invalidate_cache()


def test_a_planted_pickle_record_in_a_local_store_is_never_loaded(prefect_api, tmp_path):
    from prefect.results import ResultStore
    from prefect.serializers import PickleSerializer

    store = store_spec(tmp_path / "store")
    first = pipeline("hello", store)
    assert first["states"] == ("Completed", "Completed") and first["outcome"] == {"length": 5}
    records = [p for p in (tmp_path / "store" / "prefect-results").iterdir() if not p.name.startswith(".")]
    assert len(records) == 2
    marker = tmp_path / "code-ran"
    planted = ResultStore(serializer=PickleSerializer()).create_result_record(_Planted(str(marker)), key="k")
    for record in records:
        record.write_bytes(planted.serialize())

    again = pipeline("hello", store)
    assert not marker.exists()
    assert again["states"] == ("Completed", "Completed") and again["outcome"] == {"length": 5}  # ran, not loaded
    assert pipeline("hello", store)["states"] == ("Cached", "Cached")  # the records were rewritten as plain JSON


def test_a_hit_whose_artifacts_are_damaged_or_gone_runs_again(prefect_api, spec):
    first = pipeline("some bytes", spec)
    assert first["states"] == ("Completed", "Completed")
    assert pipeline("some bytes", spec)["states"] == ("Cached", "Cached")

    _flip_a_byte(spec, first["blob"])
    damaged = pipeline("some bytes", spec)
    assert damaged["states"] == ("Completed", "Failed")  # neither record served: both name the damaged blob
    message = damaged["outcome"]
    assert first["blob"]["uri"] in message and "corrupted" in message and "delete that object, then rerun" in message

    st = open_store(spec)
    st.fs.rm(st._path(st._rel_from_uri(first["blob"]["uri"])))
    st.fs.invalidate_cache()
    repaired = pipeline("some bytes", spec)  # the blob is written again; measure's record is good again
    assert repaired["states"] == ("Completed", "Cached") and repaired["outcome"] == {"length": 10}
    assert pipeline("some bytes", spec)["states"] == ("Cached", "Cached")


def test_each_artifact_is_hashed_once_per_run(prefect_api, tmp_path):
    from tasks.cache import verify_once

    store = store_spec(tmp_path / "store")
    st = open_store(store)
    ref = st.put_bytes(b"0123456789", "blob")
    verify_once(st, ref)
    _flip_a_byte(store, ref.to_dict())
    verify_once(st, ref)  # already verified in this run (none here: this process outside any flow)

    @flow(name="trust-verify")
    def another_run() -> None:
        verify_once(st, ref)

    with pytest.raises(ArtifactCorruptedError, match=ref.sha256[:12]):
        another_run()


def test_a_rerun_hashes_only_the_artifacts_that_changed_since_this_machine_hashed_them(prefect_api, spec,
                                                                                     monkeypatch):
    """A nightly rerun's hits name the pool's kept tables: each flow run used to hash every one of them again (at
    10^7 samples ~30 GB, downloaded from an object store). Now a hit hashes an artifact only when the state the
    store reports for it (its stat, its ETag) is not one this machine hashed it in (storage/verify_memo.py); one
    damaged since is hashed, and refused, as before."""
    import time

    import storage.artifacts
    import storage.verify_memo as memo_mod

    monkeypatch.setattr(memo_mod, "_now_ns", lambda: time.time_ns() + 3_000_000_000)  # the objects have settled
    hashed: list[str] = []
    real_sha256_file = storage.artifacts.sha256_file

    def counting(path):
        hashed.append(str(path))
        return real_sha256_file(path)

    monkeypatch.setattr(storage.artifacts, "sha256_file", counting)  # every verify hashes through it
    first = pipeline("nightly bytes", spec)
    assert pipeline("nightly bytes", spec)["states"] == ("Cached", "Cached")
    assert len(hashed) == 1, hashed  # the first hit hashed the blob; its state is remembered
    hashed.clear()
    assert pipeline("nightly bytes", spec)["states"] == ("Cached", "Cached")  # another flow run
    assert hashed == []  # before: the blob hashed again in every run
    time.sleep(0.05)  # past the filesystem's timestamp tick
    _flip_a_byte(spec, first["blob"])
    assert pipeline("nightly bytes", spec)["states"] == ("Completed", "Failed")
    assert hashed  # hashed again, and refused
