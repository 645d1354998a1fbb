# SpaceEvo: `make demo` runs the pipeline on the embedded digits data, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: venv test demo gpu-smoke clean distclean

venv: $(STAMP)

# (Re)install only when the venv is missing or requirements.txt is newer than the stamp.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	@touch $(STAMP)

# OMP_NUM_THREADS is unset so torch can use every core.
test: venv
	env -u OMP_NUM_THREADS $(PY) -m pytest -q tests

demo: venv
	$(PY) run_demo.py $(DEMO_ARGS)

# A few steps of each multi-rank stage on 1 and 2 CUDA GPUs (time per step, peak memory); no GPU: says so.
gpu-smoke: venv
	PYTHON=$(PY) scripts/gpu_smoke.sh

# Python caches only; outputs under ./checkpoints are kept (see distclean).
clean:
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache

# Also the venv and every output under ./checkpoints.
distclean: clean
	rm -rf $(VENV) checkpoints
