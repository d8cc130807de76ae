# Two commands on a fresh machine: `make run` (the main job) and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Hermetic runs: no hub downloads, Prefect state in a temporary folder, no telemetry.
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: venv run test lint bench bench-synthetic clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: curate the bundled digits pool with the embedded defaults (local store ./skmm-store, local
# DuckDB lineage, a temporary Prefect server). PREFECT_HOME defaults to a folder in the checkout.
PREFECT_HOME ?= $(CURDIR)/.prefect
run: $(STAMP)
	PREFECT_HOME=$(PREFECT_HOME) $(BIN)/skmm curate digits
	$(BIN)/skmm lineage rebuild --store ./skmm-store > /dev/null && echo "lineage index: skmm-store/lineage.duckdb"

# The paper's synthetic experiment (~20 minutes on 2 cores): table, CSV and plot under bench/out/synthetic.
bench-synthetic: $(STAMP)
	$(BIN)/skmm bench synthetic --out bench/out/synthetic

# Register the scheduled curation on the standing Prefect server at PREFECT_API_URL (deployments/README.md);
# options via DEPLOY_ARGS, e.g. DEPLOY_ARGS='--cron "30 1 * * *" --timezone Europe/Berlin'.
.PHONY: deploy
deploy: $(STAMP)
	PREFECT_HOME=$(PREFECT_HOME) $(BIN)/python -m deployments.curate_nightly deploy $(DEPLOY_ARGS)

# .ci/ensure-chromium: Debian's chromium for the browser test, installed with apt when missing (as root).
# The suite runs in TEST_WORKERS pytest-xdist processes: 2 (CI's cores) took 13 minutes where one process took 19.5;
# `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	.ci/ensure-chromium
	home=$$(mktemp -d) && trap 'rm -rf "$$home"' EXIT && PREFECT_HOME=$$home $(BIN)/pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/moment_matching_step.py
	$(BIN)/python bench/skmm_end_to_end.py
	$(BIN)/python bench/sketch_throughput.py
	$(BIN)/python bench/lineage_index.py
	$(BIN)/python bench/digits_curate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/out .prefect
