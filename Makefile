# Consortia developer entry points. Every target creates and reuses .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# A real MLflow server for the export test, in its own environment: mlflow 3.17.2 pins
# pyarrow<26 against our pinned 26.0.1, and Consortia itself talks to it over REST only.
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed-stamp

.PHONY: demo test bench lint venv clean

venv: $(STAMP)

# torch first, from the local CPU wheel: asking for it through the project's
# dependencies on an empty venv can pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/consortia demo --headless --report demo-report.json

$(MLFLOW_STAMP):
	test -x $(MLFLOW_VENV)/bin/python || $(PY) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet mlflow==3.17.2
	touch $(MLFLOW_STAMP)

test: $(STAMP) $(MLFLOW_STAMP)
	CONSORTIA_MLFLOW=$(abspath $(MLFLOW_VENV))/bin/mlflow $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/round_overhead.py
	$(BIN)/python benchmarks/poll_load.py
	$(BIN)/python benchmarks/audit_log.py
	$(BIN)/python benchmarks/edge_latency.py
	$(BIN)/python benchmarks/delta_update.py
	$(BIN)/python benchmarks/drift_detection.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/secagg.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) .venv-evidently build *.egg-info demo-report.json
