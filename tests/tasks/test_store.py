"""Store specs and where Prefect keeps cached task results: always inside the store, for local and S3 stores."""

from __future__ import annotations

import threading

import fsspec
import pytest
from prefect import task

from tasks.cache import JsonLocalResultsFileSystem, JsonResultsFileSystem
from tasks.store import result_storage, store_spec


@task(persist_result=True, result_serializer="json")
def double(x: int) -> dict:
    return {"x": 2 * x}


def test_store_spec_resolves_local_paths_and_refuses_credentials_in_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_spec("store") == {"url": f"file://{tmp_path.resolve()}/store", "endpoint_url": None}
    assert store_spec("s3://b/x", "http://127.0.0.1:9")["url"] == "s3://b/x"
    with pytest.raises(ValueError, match="environment"):
        store_spec("s3://key:secret@b/x")
    with pytest.raises(ValueError, match="environment"):
        store_spec("s3://b/x", "http://key:secret@127.0.0.1:9")


def test_local_results_are_a_saved_guarded_block_inside_the_store(prefect_api, tmp_path):
    block = result_storage(store_spec(tmp_path / "store"))
    assert isinstance(block, JsonLocalResultsFileSystem) and block._block_document_id is not None
    assert block.basepath == str(tmp_path.resolve() / "store" / "prefect-results")
    assert result_storage(store_spec(tmp_path / "store"))._block_document_id == block._block_document_id
    assert result_storage(store_spec(tmp_path / "other"))._block_document_id != block._block_document_id


def test_remote_results_are_a_saved_block_under_the_store_without_credentials(prefect_api, s3_endpoint,
                                                                             monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-must-not-be-saved")
    spec = store_spec("s3://bucket/curation/", s3_endpoint)
    block = result_storage(spec)
    assert block.basepath == "s3://bucket/curation/prefect-results"
    assert block.settings == {"endpoint_url": s3_endpoint}  # credentials stay in the environment

    again = result_storage(spec)  # same store → same block document, updated in place
    assert (again._block_document_name, again._block_document_id) == (block._block_document_name,
                                                                      block._block_document_id)
    other = result_storage(store_spec("s3://bucket/other", s3_endpoint))
    elsewhere = result_storage(store_spec("s3://bucket/curation", "http://127.0.0.1:1"))
    assert len({block._block_document_name, other._block_document_name, elsewhere._block_document_name}) == 3

    from prefect.filesystems import RemoteFileSystem

    loaded = JsonResultsFileSystem.load(block._block_document_name)
    assert "key-must-not-be-saved" not in loaded.model_dump_json()
    double.with_options(result_storage=block)  # accepted: Prefect refuses only unsaved blocks
    with pytest.raises(TypeError, match="persisted server-side"):
        double.with_options(result_storage=RemoteFileSystem(basepath=block.basepath))


def test_concurrent_saves_of_one_store_share_one_block(prefect_api, s3_endpoint):
    spec = store_spec("s3://bucket/raced", s3_endpoint)
    start, ids, errors = threading.Barrier(4), [], []

    def save() -> None:
        start.wait()
        try:
            ids.append(result_storage(spec)._block_document_id)
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 4 and len(set(ids)) == 1, (errors, ids)


def test_task_results_land_in_the_bucket_as_json(prefect_api, s3_bucket):
    import json

    from prefect import flow

    name, options = s3_bucket
    block = result_storage(store_spec(f"s3://{name}/store", options["endpoint_url"]))

    @flow
    def run() -> dict:
        return double.with_options(result_storage=block, result_storage_key="double-{parameters[x]}")(21)

    assert run() == {"x": 42}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    record = json.loads(fs.cat_file(f"{name}/store/prefect-results/double-21"))
    assert json.loads(record["result"]) == {"x": 42} and record["metadata"]["serializer"]["type"] == "json"


class _Planted:
    """Unpickling this writes a marker file: proof that a planted record's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_record_in_a_shared_store_is_never_loaded(prefect_api, s3_bucket, tmp_path):
    """Prefect picks the decoder named inside a record; a record naming pickle must read as a miss (the task runs
    again and writes a clean JSON record), never be unpickled."""
    from prefect import flow
    from prefect.results import ResultStore
    from prefect.serializers import PickleSerializer

    name, options = s3_bucket
    block = result_storage(store_spec(f"s3://{name}/shared", options["endpoint_url"]))
    marker = tmp_path / "code-ran"
    planted = ResultStore(serializer=PickleSerializer()).create_result_record(_Planted(str(marker)), key="k")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.pipe_file(f"{name}/shared/prefect-results/double-key", planted.serialize())
    with pytest.raises(ValueError, match=r"names serializer 'pickle'.*refusing to load it"):
        block.read_path("double-key")

    keyed = double.with_options(result_storage=block, cache_key_fn=lambda *_: "double-key")

    @flow
    def run() -> dict:
        return keyed(4, return_state=True)

    state = run()
    assert state.name == "Completed" and state.result() == {"x": 8}  # ran again: not served from the plant
    assert not marker.exists()
    assert block.read_path("double-key")  # overwritten by a clean record, which reads back
    assert run().name == "Cached"
