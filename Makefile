# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# Test workers (pytest-xdist): 2 on the 2-core machines the suite is sized for; PYTEST_WORKERS=0
# runs it in one process.
PYTEST_WORKERS ?= 2

.PHONY: test test-fast lint bench bench-real demo gpu-check venv clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VPY) -m pytest tests --ignore=tests/benchmarks -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The suite without the tests marked slow (a few minutes).
test-fast: lint
	$(VPY) -m pytest tests --ignore=tests/benchmarks -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m pytest tests/benchmarks -s -p no:cacheprovider --ignore=tests/benchmarks/test_bench_real.py $(PYTEST_ARGS)

# Real films side by side (../shared/data/mias_dev, 5 patient folds; about an hour on 2 cores):
# our end-to-end model against the patch heatmap maximum and a plain CNN. BENCH_REAL_OUT keeps it.
bench-real: $(STAMP)
	$(VPY) -m pytest tests/benchmarks/test_bench_real.py -s -p no:cacheprovider $(PYTEST_ARGS)

# The pipeline with the demo config; a second `make demo` into the same DEMO_OUT skips every stage.
DEMO_OUT ?= demo_out/demo
demo: $(STAMP)
	$(VPY) ddsm_train/run_pipeline.py ddsm_train/configs/demo.toml --out $(DEMO_OUT)

# Training/loader/prediction speed and mixed-precision numerics on this machine's GPUs (tiny
# sizes on the CPU when no GPU is visible); GPU_CHECK_ARGS e.g. "--models resnet50 --strict".
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(VPY) ddsm_train/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
