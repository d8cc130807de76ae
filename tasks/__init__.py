"""Prefect tasks: thin, cached wrappers over skmm/ and storage/ (the curation pipeline's stages)."""
