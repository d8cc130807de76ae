"""Which store a run uses, passed between tasks as a small JSON-able spec (never credentials).

Credentials for S3 come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile),
so they never enter Prefect parameters, task inputs, cache keys, logs or lineage records.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from storage.artifacts import ArtifactStore

__all__ = ["DEFAULT_STORE", "open_store", "result_storage_path", "store_spec"]

DEFAULT_STORE = "./skmm-store"


def store_spec(url: str | os.PathLike = DEFAULT_STORE, endpoint_url: str | None = None) -> dict[str, Any]:
    """The spec tasks receive: an absolute URL (local paths resolved) and an optional S3 endpoint."""
    text = os.fspath(url)
    if "://" not in text:
        text = "file://" + str(pathlib.Path(text).expanduser().resolve())
    if "@" in text.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError("put credentials in the environment (AWS_ACCESS_KEY_ID, ...), not in the store URL")
    return {"url": text, "endpoint_url": endpoint_url}


def open_store(spec: dict[str, Any]) -> ArtifactStore:
    """The ArtifactStore a spec names."""
    options: dict[str, Any] = {}
    if spec.get("endpoint_url"):
        options["endpoint_url"] = spec["endpoint_url"]
    return ArtifactStore(spec["url"], storage_options=options)


def result_storage_path(spec: dict[str, Any]) -> pathlib.Path:
    """Where Prefect persists cached task results (small JSON refs): inside a local store, so a cache lives as
    long as the artifacts it points to; for remote stores, a per-store folder in the user's cache directory."""
    url = spec["url"]
    if url.startswith("file://"):
        return pathlib.Path(url[len("file://"):]) / "prefect-results"
    import hashlib

    base = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return base / "skmm" / "prefect-results" / hashlib.sha256(url.encode()).hexdigest()[:16]
