"""benchmarks/gpu_paper_check.py --tiny: the prepared GPU check runs end to end on a CPU, so it cannot rot
between the rare sessions that have a GPU (issue 25). Every phase runs through medlib with the paper recipes
on medlib:tiny-llama saved pre-quantised, the hf backend in place of Unsloth."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medlib.paths import REPO_ROOT

pytestmark = pytest.mark.slow
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_paper_check.py"


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--tiny", "--work", str(out / "work"), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    return proc, out


def test_every_phase_runs_on_the_tiny_model(check):
    proc, out = check
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {k: v.get("error") for k, v in report["phases"].items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    phases = report["phases"]
    assert list(phases) == ["build_base", "stage1_bf16", "stage1_bf16_8x2", "stage1_fp16", "handoff", "stage2",
                            "table3_generate", "kill_resume"]
    assert phases["stage1_bf16_8x2"]["steps"] == 3
    stage1 = phases["stage1_bf16"]
    assert stage1["steps"] == 3 and stage1["loss_finite"] and stage1["tokens_per_s"] > 0
    assert stage1["handoff_measure"]["all"]["matrices"] == 14           # what the requantized merge keeps, recorded
    assert "needs a CUDA GPU" in phases["stage1_fp16"]["refused_with"]   # the T4 path is refused on a CPU, not half-run
    resumed = phases["kill_resume"]
    assert resumed["killed_by_sigkill"] and resumed["resumed_from"] == "checkpoint-2" and resumed["final_step"] == 4
    handoff = phases["handoff"]
    assert handoff["peak_host_ram_gb"] > 0 and handoff["merged_gb"] > 0
    kept = handoff["kept_share_by_planted_size"]
    assert kept["0.005"]["q_proj"] < kept["0.1"]["q_proj"]               # a larger update survives requantisation better
    assert phases["stage2"]["handoff"] == "requantized_merge" and phases["stage2"]["steps"] == 3
    table3 = phases["table3_generate"]
    assert table3["questions"] == 8 and table3["questions_per_s"] > 0 and "reloaded in 4-bit" in table3["weights"]
    md = (out / "gpu_check.md").read_text()
    assert "--tiny: CPU, tiny model; times mean nothing" in md and "FAILED" not in md
    assert report["projections_t4"] == []   # nothing is projected from a CPU run


def test_the_readme_block_is_regenerated_from_the_json(check, tmp_path):
    _, out = check
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- gpu_check:begin -->\nold figures\n<!-- gpu_check:end -->\noutro\n")
    report = json.loads((out / "gpu_check.json").read_text())
    # as a GPU run would write it: a named GPU, so T4 projections are derived from the measured step
    report.update(gpu_peak=["H100 80GB HBM3", 989.0, 3350.0], tiny=False, device="NVIDIA H100 80GB HBM3")
    report["phases"]["stage1_bf16"]["projected_epoch_h"] = 2.0
    gpu_json = tmp_path / "gpu_check.json"
    gpu_json.write_text(json.dumps(report))
    subprocess.run([sys.executable, str(SCRIPT), "readme", "--json", str(gpu_json), "--readme", str(readme)],
                   cwd=REPO_ROOT, check=True, timeout=120)
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "measured on NVIDIA H100 80GB HBM3" in text and "Projected for a free Colab T4 (not measured)" in text
    assert "x 10.5 (bandwidth) to x 15.2 (tensor FLOP/s)" in text and "| 21-30 h |" in text  # 2.0 h x 10.5 .. x 15.2


def test_two_runs_of_one_check_combine_phase_by_phase(check, tmp_path):
    """A short lease runs the check twice: the second run's passing phases replace the first's failures only."""
    _, out = check
    first = json.loads((out / "gpu_check.json").read_text())
    first["phases"]["handoff"] = {"ok": False, "error": "RuntimeError: the merge refused"}
    second = json.loads((out / "gpu_check.json").read_text())
    second["phases"] = {k: {**v, "marker": "second"} for k, v in second["phases"].items() if k in ("build_base", "handoff")}
    second["skipped"] = ["stage1_bf16_8x2"]
    paths = [tmp_path / "run1.json", tmp_path / "run2.json"]
    for path, report in zip(paths, (first, second)):
        path.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- gpu_check:begin -->\n<!-- gpu_check:end -->\n")
    subprocess.run([sys.executable, str(SCRIPT), "readme", "--json", str(paths[0]), "--json", str(paths[1]),
                    "--readme", str(readme)], cwd=REPO_ROOT, check=True, timeout=120)
    text = readme.read_text()
    assert "Failed in run1, made good by a later run: handoff (RuntimeError: the merge refused)" in text
    assert "run2 (" in text and "skipped stage1_bf16_8x2" in text and "FAILED" not in text
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_paper_check import combine

    combined = combine([first, second], ["run1", "run2"])
    assert combined["phases"]["handoff"]["marker"] == "second"                  # the failure was made good
    assert "marker" not in combined["phases"]["build_base"]                      # a passing phase is kept from run 1
    assert combined["phases"]["handoff"]["from_run"] == "run2" and combined["phases"]["stage2"]["from_run"] == "run1"


def test_the_readme_block_is_the_committed_h100_runs(tmp_path):
    """The README's GPU timings are what `readme` renders from the runs in benchmarks/results, not hand-edited."""
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_paper_check import README_BEGIN, README_END, combine, render_readme

    runs = sorted((REPO_ROOT / "benchmarks" / "results").glob("gpu_check_*_h100_run*.json"))
    assert [p.stem for p in runs] == ["gpu_check_2026-11-26_h100_run1", "gpu_check_2026-11-26_h100_run2"]
    readme = tmp_path / "README.md"
    readme.write_text((REPO_ROOT / "README.md").read_text())
    render_readme(combine([json.loads(p.read_text()) for p in runs], [p.stem for p in runs]), readme)
    block = lambda text: text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]  # noqa: E731
    assert block(readme.read_text()) == block((REPO_ROOT / "README.md").read_text())
    assert "measured on NVIDIA H100 80GB HBM3" in block(readme.read_text())
