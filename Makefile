# `make setup` once, then `make test`. Every target uses the project's own .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint quickstart bench clean

setup: $(STAMP)

# Reinstall only when the dependency list or the package layout (setup.py) changes. The
# constraints pin the CPU build of torch that pip finds locally and the torchvision built against it.
$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Tests use tiny tensors, where intra-op threads only add overhead, and some start
# several processes (DDP, kill-and-resume): one thread each keeps 2 cores busy, not thrashing.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: setup
	$(TEST_ENV) $(PY) -m pytest -m "not gpu"

test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -m "not gpu and not slow"

lint: setup
	$(PY) -m ruff check src tests bench train.py sample.py evaluate.py

quickstart: setup
	$(PY) train.py

bench: setup
	$(PY) bench/performance.py
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
