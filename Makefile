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
# several processes (DDP, kill-and-resume): one thread each keeps the cores busy, not thrashing.
# pytest-xdist runs one single-threaded worker per core; each test file stays on one worker
# (--dist loadfile), so a module's fixtures (a trained run, a checkpoint) are built once.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
XDIST := -n auto --dist loadfile

test: setup
	$(TEST_ENV) $(PY) -m pytest -m "not gpu" $(XDIST)

test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -m "not gpu and not slow" $(XDIST)

lint: setup
	$(PY) -m ruff check src tests bench train.py sample.py evaluate.py

quickstart: setup
	$(PY) train.py

bench: setup
	$(PY) bench/performance.py
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
