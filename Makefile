# The two quickstart commands (README): `make demo` runs the main job on the embedded default,
# `make test` runs the test suite. Each creates or reuses the local virtualenv .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: venv
	$(BIN)/python ray_jobs/fit_profiles.py --demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

lint: venv
	$(BIN)/ruff check xpeft ray_jobs tests benchmarks
