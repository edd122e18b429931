# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test bench demo venv clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests --ignore=tests/benchmarks -m "not gpu" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m pytest tests/benchmarks -s -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	bash ddsm_train/run_demo.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
