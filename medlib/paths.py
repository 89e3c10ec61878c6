"""Where things live: repo root, shared evaluation data, outputs and the model cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# In a checkout (editable install) paths are relative to the repo; installed elsewhere, to the cwd.
REPO_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").exists() else Path.cwd()


def default_data_dir() -> Path:
    """Folder of the published benchmark files: $MEDLIB_DATA_DIR, else ../shared/data beside the repo."""
    env = os.environ.get("MEDLIB_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def outputs_dir() -> Path:
    env = os.environ.get("MEDLIB_OUTPUTS")
    return Path(env) if env else (REPO_ROOT / "outputs")


def cache_dir() -> Path:
    """Converted models and other reusable artefacts: $MEDLIB_CACHE, else ~/.cache/medlib."""
    env = os.environ.get("MEDLIB_CACHE")
    return Path(env) if env else (Path.home() / ".cache" / "medlib")


def resolve(path: str | os.PathLike) -> Path:
    """Relative paths in recipes are relative to the repo root, so runs behave the same from any cwd."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)
