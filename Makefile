# fedgrain: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: demo test check lint bench clean

# The virtual environment, created once with an up-to-date pip.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Installs are re-run only when pyproject.toml changes (the stamp files record them).
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/fedgrain demo

test: $(VENV)/.test-installed
	$(PY) -m pytest

# The fast tier while you work: lint, then every test but the long simulations (marked slow).
check: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks
	$(PY) -m pytest -m "not slow" -q

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_core.py --views --out docs/benchmarks.md
	$(PY) benchmarks/bench_inference.py --out docs/benchmarks.md
	$(PY) benchmarks/bench_adaptive.py --out docs/benchmarks.md
	$(PY) benchmarks/bench_meta.py --out docs/benchmarks.md
	$(PY) benchmarks/bench_stream.py --out docs/benchmarks.md
	$(PY) benchmarks/bench_scale.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache fedgrain_demo
