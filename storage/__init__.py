"""Artifact store (fsspec), Parquet datasets with content-hash sample ids, and the DuckDB lineage index."""
