"""Feature extractors for the pipeline's "embed" stage (open_clip image towers; imported lazily)."""

from skmm.models.clip import (
    CONFIGS_DIR,
    TINY_MODEL,
    ClipSpec,
    check_model_name,
    clear_model_cache,
    embed_images,
    embed_shards,
    load_clip,
    resolve_device,
)

__all__ = [
    "CONFIGS_DIR",
    "TINY_MODEL",
    "ClipSpec",
    "check_model_name",
    "clear_model_cache",
    "embed_images",
    "embed_shards",
    "load_clip",
    "resolve_device",
]
