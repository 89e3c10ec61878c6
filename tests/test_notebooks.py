"""Every numbered notebook, executed with papermill on the local profile with tiny parameters,
must produce the artifacts it promises."""

from __future__ import annotations

import csv
import json

import nbformat
import pytest

from medlib.pipeline import layout, stage_recipes
from medlib.reproduce import NOTEBOOK_DIR, NOTEBOOKS, STUDY_NOTEBOOKS, ReproduceError, reproduce

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]

# One override list, the --set language, for every notebook: each recipe takes the keys of its own sections.
STEPS, QUESTIONS, QUERIES, OTHER = 4, 6, 3, 3
TINY = {"overrides": [f"training.max_steps={STEPS}", f"mcq.limit={QUESTIONS}", f"bertscore.n_queries={QUERIES}",
                      f"mcq.other_protocol={OTHER}", "mcq.position_bias=2", "bertscore.generation.max_new_tokens=12", "generation.max_new_tokens=12"]}


def test_notebooks_are_committed_clean_with_a_parameters_cell():
    for name in NOTEBOOKS + STUDY_NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), name
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), name
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "def " not in code and "class " not in code, f"{name}: logic belongs in medlib, not in cells"


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    reproduce("local", out, params=TINY)
    return layout("local", out)


def test_every_notebook_is_executed_into_the_output_folder(reproduced):
    for name in NOTEBOOKS:
        executed = nbformat.read(reproduced.notebooks / f"{name}.ipynb", as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "out_dir" in injected[0].source, name
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, name


def test_data_and_training_artifacts(reproduced):
    for stage, recipe in stage_recipes("local").items():
        manifest = json.loads((reproduced.mixture(recipe.mixture) / "manifest.json").read_text())
        assert manifest["standin"] is True and manifest["sizes"]["train"] > 0
        run = reproduced.run(recipe.run_name)
        assert (run / "adapter_model.safetensors").exists() and (run / "adapter_config.json").exists()
        meta = json.loads((run / "run_metadata.json").read_text())
        assert meta["profile"] == "local" and meta["global_step"] == STEPS
        weights = [p.name for p in run.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors")
                   and ("model" in p.name or "adapter" in p.name)]
        assert weights and all(name.endswith(".safetensors") for name in weights), weights  # weights: safetensors only


def test_tables_hold_the_expected_rows(reproduced):
    with open(reproduced.eval / "table3.csv") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["source"] == "ours"]
    # every model by both protocols, each row labelled with its own
    assert [(r["model"], r["method"]) for r in ours] == [(m, p) for m in ("Base", "Med-Mix", "Med-Nirvana")
                                                         for p in ("loglik", "generate")]
    for r in ours:
        assert r["profile"] == "local"
        for key in ("medqa", "medmcqa", "pubmedqa", "mmlu_med"):
            n = QUESTIONS if r["method"] == "loglik" else OTHER
            assert 0 <= float(r[f"{key}_accuracy"]) <= 100 and int(r[f"{key}_n"]) == n
    assert sum(r["source"].startswith("paper") for r in rows) == 15  # every row of the paper's Table 3
    # the permutation check's headline, once per model (2 questions per set x 4 sets), on its first row
    assert [r["position_checked_questions"] for r in ours] == ["8", ""] * 3
    assert all(0 <= float(r["right_under_all_orders"]) <= 100 for r in ours if r["method"] == "loglik")
    with open(reproduced.eval / "table4.csv") as f:
        table4 = [r for r in csv.DictReader(f) if r["source"] == "ours"]
    assert [r["model"] for r in table4] == ["Base", "Med-Mix", "Med-Nirvana"]
    assert all(0 < float(r["f1"]) <= 1 and r["n"] == str(QUERIES) for r in table4)
    samples = (reproduced.eval / "samples.md").read_text()
    assert samples.count("Med-Nirvana") >= 1 and "hysician" in samples


def test_loss_figures_have_both_curves(reproduced):
    from PIL import Image

    for name in ("figure11_loss_stage1_med_mix.png", "figure12_loss_stage2_med_nirvana.png"):
        description = Image.open(reproduced.figures / name).info["Description"]
        train_points, val_points = [int(part.split(": ")[1].split()[0]) for part in description.split("; ")]
        assert train_points >= 1 and val_points >= 1, description
    for name in ("table3_mcq_accuracy.png", "table4_bertscore.png"):
        assert (reproduced.figures / name).stat().st_size > 10_000


def test_report_and_chat_transcript(reproduced):
    report = reproduced.report.read_text()
    assert "LOCAL PROFILE — NOT THE PAPER'S RESULTS" in report
    for section in ("## Data", "## Training", "## Findings", "## Table 3", "## Table 4", "## Figures", "## Chat demo",
                    "## Notebooks"):
        assert section in report
    assert "figure11_loss_stage1_med_mix.png" in report
    # every model pair on every set and on the BERTScore queries, read into the findings
    assert len(json.loads((reproduced.eval / "table3_paired.json").read_text())) == 3 * 4
    assert len(json.loads((reproduced.eval / "table4_paired.json").read_text())) == 3
    findings = report.split("## Findings", 1)[1].split("\n## ", 1)[0]
    # the paired comparisons, then every model's permutation check on every set (mcq.position_bias)
    assert findings.count("every cyclic permutation") == 3 * 4
    assert findings.count("p = ") == 3 * 4 + 3 + 3 * 4 and "not claims about Med-Nirvana 8B" in findings
    assert "## Answer-letter diagnostics" in report and "## Paired comparisons" in report and "## Position bias" in report
    transcript = json.loads((reproduced.chat / "transcript.json").read_text())
    assert [t["kind"] for t in transcript] == ["greeting", "medical", "urgent", "fallback"]


def test_rerun_skips_finished_notebooks_and_failures_name_the_cell(reproduced, capsys):
    reproduce("local", reproduced.root, params=TINY)
    assert capsys.readouterr().out.count("skipped") == len(NOTEBOOKS)
    with pytest.raises(ReproduceError, match=r"notebook 03_eval_mcq failed at cell \d+: .*nope"):
        reproduce("local", reproduced.root, params={"overrides": [*TINY["overrides"], "mcq.sets=[nope]"]},
                  notebooks=("03_eval_mcq",))
    assert (reproduced.notebooks / "03_eval_mcq.ipynb").exists()  # the executed copy is kept
    with pytest.raises(ReproduceError, match="no notebook has a parameter named typo"):
        reproduce("local", reproduced.root, params={"typo": 1})
    # an override no recipe takes is an error at the first step, naming it and the sections there are
    with pytest.raises(ReproduceError, match="override 'traning.max_steps=4': no train or eval or chat recipe has a section 'traning'"):
        reproduce("local", reproduced.root, params={"overrides": ["traning.max_steps=4"]}, notebooks=("01_stage1_med_mix",))
    with pytest.raises(ReproduceError, match="no notebook named 07_typo"):
        reproduce("local", reproduced.root, notebooks=("07_typo",))
