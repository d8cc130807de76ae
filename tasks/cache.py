"""Cache keys from content, not paths: a stage reruns only when its inputs' bytes, its parameters or its code
change.

Prefect's INPUTS policy hashes argument values as given; our tasks exchange artifact refs whose ``uri`` would
tie the key to a location. :class:`ContentCache` reduces every ref to its content hash before hashing, adds an
explicit ``code_version`` (TASK_SOURCE sees only the task body, not the helpers it calls), and raises — never
returns None — when an input cannot be canonicalised, so a broken key is loud instead of silently uncached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy

__all__ = ["ContentCache", "content_view"]

_LOCATION_KEYS = {"uri", "source_uri"}


def content_view(value: Any) -> Any:
    """The part of an input that identifies its content: refs lose their location, the rest stays."""
    if isinstance(value, dict):
        has_hash = "sha256" in value or "version" in value
        return {k: content_view(v) for k, v in sorted(value.items())
                if not (has_hash and k in _LOCATION_KEYS)}
    if isinstance(value, list | tuple):
        return [content_view(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "to_dict"):
        return content_view(value.to_dict())
    raise TypeError(f"cannot derive a content cache key from a {type(value).__name__}; pass refs, not data")


@dataclass(kw_only=True)
class ContentCache(CachePolicy):
    """Key = sha256(task name, code version, canonical JSON of the content view of the inputs).

    Our fields are keyword-only, and ``key_storage`` (CachePolicy's own first field) must stay None: a positional
    code version landing there would silently move the cache records into a folder named after it.

    ``ignore`` names inputs that must not affect the key (e.g. a progress-bar flag); ``key_inputs`` lets a task
    replace its inputs by a content fingerprint it computes (e.g. of a source folder's files).
    """

    code_version: str = "1"
    ignore: tuple[str, ...] = ()
    key_inputs: Any = None

    def __post_init__(self) -> None:
        if self.key_storage is not None:
            raise TypeError("ContentCache takes keyword arguments only (code_version=...); key_storage must be None")

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        selected = {k: v for k, v in inputs.items() if k not in self.ignore}
        if self.key_inputs is not None:
            selected = self.key_inputs(selected)
        payload = {"task": task_ctx.task.name, "code": self.code_version, "inputs": content_view(selected)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
