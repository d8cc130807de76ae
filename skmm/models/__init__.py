"""Feature extractors for the pipeline's "embed" stage (open_clip image towers; imported lazily)."""

from skmm.models.clip import *  # noqa: F403 - the public names are clip's own
from skmm.models.clip import __all__  # noqa: F401 - one list, kept in clip.py
