# thyrobench: `make demo` sets everything up and runs a small benchmark; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# pyradiomics 3.0.1 only builds without build isolation, after numpy and versioneer.
	$(PIP) install numpy versioneer setuptools wheel
	$(PIP) install --no-build-isolation pyradiomics==3.0.1
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/bench run --quick --methods vanilla,st-unet --folds 2 --workspace demo-workspace

test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(VENV)/bin/pytest tests/benchmarks --benchmark-enable --benchmark-only -q

lint: setup
	$(VENV)/bin/ruff check bench methods datasets leaderboard tests

clean:
	rm -rf $(VENV) demo-workspace bench-workspace
