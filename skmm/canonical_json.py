"""The one canonical JSON form of the code base: sorted keys, no whitespace.

Equal values give equal bytes, which is what content hashes, cache keys, sample ids and model headers rest on.
Each caller keeps the encoding it has always had through the keyword flags (they default to ``json.dumps``'s):
``ensure_ascii`` (escape non-ASCII, the default, or keep UTF-8), ``allow_nan`` (refuse NaN/Infinity with a
ValueError when False) and ``default`` (how to encode what JSON does not know, e.g. numpy scalars).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(obj: Any, *, ensure_ascii: bool = True, allow_nan: bool = True,
                   default: Callable[[Any], Any] | None = None) -> str:
    """``obj`` as canonical JSON text (sorted keys, separators ``,`` and ``:``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=allow_nan,
                      default=default)
