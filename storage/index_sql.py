"""The lineage index's schema: every statement that creates its tables, in one place.

The builder (:mod:`storage.index`) registers the Arrow row lists of :mod:`storage.index_rows` under the ``*_in``
names used here, loads the selection Parquet files with :data:`LOAD_SELECTIONS`, then runs :data:`BUILD`.
"""

from __future__ import annotations

__all__ = ["BUILD", "CREATE_SELECTIONS", "INPUTS", "INSERT_SELECTION_FILES", "LOAD_SELECTIONS", "PROBE_SELECTION",
           "SELECTION_FILES", "TABLES"]

#: Every table of a built index (the names :meth:`LineageIndex.table` accepts).
TABLES = ("runs", "events", "io", "artifacts", "dangling", "malformed", "stages", "selection_files", "samples",
          "selections", "run_selections", "models", "metrics", "datasets", "selection_datasets", "meta")

#: The registered Arrow inputs of :data:`BUILD`.
INPUTS = ("ev_in", "io_in", "metrics_in", "models_in", "art_in", "dangling_in", "malformed_in", "valid_in",
          "datasets_in", "seldata_in")

#: Does one selection file read as (sample_id, rank, weight)? (parameter: a one-path list)
PROBE_SELECTION = "SELECT sample_id::VARCHAR, rank::INTEGER, weight::DOUBLE FROM read_parquet(?) LIMIT 1"

#: The ids of every selection file into ``raw`` (parameter: the local paths; ``sel_files_in`` maps them to ids).
LOAD_SELECTIONS = """
    INSERT INTO raw
    SELECT f.sel_id, r.sample_id::VARCHAR AS sample_id, r.rank::INTEGER AS rank, r.weight::DOUBLE AS weight
    FROM read_parquet(?, filename = true) r JOIN sel_files_in f ON r.filename = f.path"""

SELECTION_FILES = """
    CREATE TABLE selection_files (sel_id INTEGER, uri VARCHAR, sha256 VARCHAR, size BIGINT, n_samples BIGINT,
                                  method VARCHAR, params VARCHAR);
    CREATE TEMP TABLE raw (sel_id INTEGER, sample_id VARCHAR, rank INTEGER, weight DOUBLE);"""

#: selection_files from the loaded ids and each file's key-value metadata (parameters: the paths, twice).
INSERT_SELECTION_FILES = """
    INSERT INTO selection_files
    SELECT f.sel_id, f.uri, f.sha256, f.size, c.n, decode(m.value) AS method, decode(p.value) AS params
    FROM sel_files_in f
    LEFT JOIN (SELECT sel_id, count(*) AS n FROM raw GROUP BY sel_id) c USING (sel_id)
    LEFT JOIN (SELECT * FROM parquet_kv_metadata(?) WHERE decode(key) = 'skmm.method') m ON m.file_name = f.path
    LEFT JOIN (SELECT * FROM parquet_kv_metadata(?) WHERE decode(key) = 'skmm.params') p ON p.file_name = f.path
    ORDER BY f.sel_id"""

#: samples (a dictionary of sample ids) and selections (sel_id, sample_key, rank, weight; one selection is a
#: contiguous range) from ``raw``.
CREATE_SELECTIONS = """
    CREATE TABLE samples AS
        SELECT (row_number() OVER (ORDER BY sample_id) - 1)::INTEGER AS sample_key, sample_id
        FROM (SELECT DISTINCT sample_id FROM raw) ORDER BY sample_id;
    CREATE TABLE selections AS
        SELECT r.sel_id, s.sample_key, r.rank, r.weight
        FROM raw r JOIN samples s USING (sample_id) ORDER BY r.sel_id, s.sample_key;
    DROP TABLE raw;"""

#: Every other table, from the registered :data:`INPUTS` and selection_files.
BUILD = """
    CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
    CREATE TABLE events AS
        SELECT e.object, e.run_id, e.seq, e.stage, e.event_type, e.event_time::TIMESTAMPTZ AS event_time,
               e.flow_run_id, e.attempt, e.git_commit, e.skmm_version, e.config_hash, e.error,
               (v.object IS NULL) AS dangling
        FROM ev_in e LEFT JOIN valid_in v USING (object) ORDER BY e.run_id, e.event_time, e.seq;
    CREATE TABLE io AS SELECT * REPLACE (event_time::TIMESTAMPTZ AS event_time) FROM io_in ORDER BY run_id, event_time;
    CREATE TABLE artifacts AS SELECT * FROM art_in ORDER BY uri;
    CREATE TABLE dangling AS SELECT * FROM dangling_in ORDER BY run_id, object, uri;
    CREATE TABLE malformed AS SELECT * FROM malformed_in ORDER BY object;
    CREATE TABLE metrics AS SELECT * REPLACE (event_time::TIMESTAMPTZ AS event_time) FROM metrics_in
        ORDER BY run_id, event_time, name;
    CREATE TABLE stages AS
        WITH ranked AS (
            SELECT *, row_number() OVER (PARTITION BY run_id, stage ORDER BY event_time DESC, seq DESC) AS rn,
                   min(event_time) OVER (PARTITION BY run_id, stage) AS first_time
            FROM events WHERE NOT dangling)
        SELECT run_id, stage,
               CASE event_type WHEN 'START' THEN 'started' WHEN 'COMPLETE' THEN 'completed' ELSE 'failed' END
                   AS status,
               first_time AS started_at,
               CASE WHEN event_type = 'START' THEN NULL ELSE event_time END AS ended_at,
               error, seq
        FROM ranked WHERE rn = 1 ORDER BY run_id, started_at, seq;
    CREATE TABLE runs AS
        WITH agg AS (
            SELECT run_id, min(event_time) AS started_at, max(event_time) AS last_event_at,
                   count(*) AS n_events, bool_or(dangling) AS has_dangling,
                   arg_max(flow_run_id, event_time) AS flow_run_id,
                   arg_max(attempt, event_time) AS attempt,
                   arg_max(git_commit, event_time) AS git_commit,
                   arg_max(skmm_version, event_time) AS skmm_version,
                   arg_max(config_hash, event_time) AS config_hash
            FROM events GROUP BY run_id),
        st AS (
            SELECT run_id, bool_or(status = 'failed') AS any_failed, bool_or(status = 'started') AS any_open,
                   arg_min(stage, started_at) FILTER (WHERE status = 'failed') AS failed_stage,
                   arg_min(error, started_at) FILTER (WHERE status = 'failed') AS error
            FROM stages GROUP BY run_id)
        SELECT a.run_id, a.flow_run_id, a.attempt,
               -- the attempts of one flow run (Prefect retries) are linked: each names the one before it
               CASE WHEN a.flow_run_id IS NOT NULL THEN lag(a.run_id) OVER (
                   PARTITION BY a.flow_run_id ORDER BY a.attempt NULLS FIRST, a.started_at, a.run_id) END
                   AS previous_attempt,
               a.git_commit, a.config_hash,
               CASE WHEN st.run_id IS NULL THEN 'dangling' WHEN st.any_failed THEN 'failed'
                    WHEN st.any_open THEN 'started' ELSE 'completed' END AS status,
               a.started_at, a.last_event_at, a.n_events, a.has_dangling, st.failed_stage, st.error,
               a.skmm_version
        FROM agg a LEFT JOIN st USING (run_id) ORDER BY a.started_at, a.run_id;
    CREATE TABLE run_selections AS
        SELECT i.run_id, i.stage, i.role, f.sel_id, i.sha256 AS selection_sha256, i.event_time
        FROM io i JOIN selection_files f ON f.sha256 = i.sha256
        WHERE i.kind = 'selection' ORDER BY i.run_id, i.event_time;
    CREATE TABLE models AS
        SELECT m.run_id, m.stage, m.trained_at::TIMESTAMPTZ AS trained_at, m.model_uri, m.model_sha256,
               m.model_size, m.model_kind, m.selection_sha256, f.sel_id, m.object
        FROM models_in m LEFT JOIN selection_files f ON f.sha256 = m.selection_sha256
        ORDER BY m.model_sha256, m.trained_at;
    CREATE TABLE datasets AS SELECT * FROM datasets_in ORDER BY uri;
    CREATE TABLE selection_datasets AS
        SELECT s.*, d.version AS dataset_version, d.num_rows AS dataset_rows
        FROM seldata_in s LEFT JOIN datasets d ON d.sha256 = s.dataset_sha256
        ORDER BY s.selection_sha256, s.dataset_uri;
"""
