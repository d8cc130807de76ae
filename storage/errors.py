"""Storage errors: one line that names the artifact or URL (credentials redacted), never a traceback soup."""

from __future__ import annotations

import re

__all__ = [
    "ArtifactCorruptedError",
    "ArtifactNotFoundError",
    "MalformedRecordError",
    "StorageError",
    "StoreUnavailableError",
    "redact",
]

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:x-amz-[a-z-]*|signature|sig|token|secret|password|key|access_key)=)[^&\s]*")


def redact(text: str) -> str:
    """Remove credentials from URLs in ``text``: user:secret@ and secret-looking query parameters."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\g<scheme>***@", str(text)))


class StorageError(Exception):
    """Base class; the message is already redacted. ``transient`` marks errors worth retrying (I/O hiccups)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(redact(message))
        self.transient = transient


class ArtifactNotFoundError(StorageError):
    """The artifact's object does not exist in the store."""


class ArtifactCorruptedError(StorageError):
    """The object exists but its bytes do not hash to the ref's sha256 (or its size differs).

    The message ends with what to do (:attr:`ADVICE`): a rerun alone cannot repair the object, because
    publishing bytes to an address that is already taken is a no-op, so the damaged object must go first."""

    ADVICE = "delete that object, then rerun: the stage that wrote it writes it again"

    def __init__(self, message: str, transient: bool = False) -> None:
        if self.ADVICE not in message:
            message = f"{message.rstrip(' .;')}; {self.ADVICE}"
        super().__init__(message, transient)


class StoreUnavailableError(StorageError):
    """The store cannot be reached: missing bucket, unreachable endpoint, refused credentials."""


class MalformedRecordError(StorageError):
    """A ref, lineage record or manifest does not have the expected shape."""
