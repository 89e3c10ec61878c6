"""`medlib study dmt` at tiny size, through notebook 07 as `make study` runs it: every arm trains on the
same dialogue rows with the replay its share asks for, and the table, figure and findings are written."""

from __future__ import annotations

import csv
import json

import pytest

from medlib.reproduce import reproduce
from medlib.study import PAPER_SHARE, Arm, StudyError, replay_rows, study_recipe

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]

TINY_STUDY = {"max_steps": 2, "mcq_limit": 4, "n_queries": 2, "shares": [0.0, 0.5], "from_base": True,
              "dialogue_train": 12, "dialogue_validation": 4}


def test_the_papers_share_and_replay_counts():
    assert replay_rows(PAPER_SHARE, 100_000) == 33_333          # Table 2: k beside 100,000 NoteChat rows
    assert replay_rows(0.5, 1000) == 1000 and replay_rows(0.0, 1000) == 0
    assert Arm(0.25).name == "replay share 0.25 (the paper's)" and Arm(0.0, from_base=True).slug == "from-base"
    with pytest.raises(StudyError, match="must be in"):
        replay_rows(1.0, 10)
    with pytest.raises(StudyError, match="0.0 \\(no replay\\)"):
        study_recipe("local", shares=[0.25, 0.5])
    with pytest.raises(StudyError, match="no field 'replay'"):
        study_recipe("local", replay=0.3)
    with pytest.raises(StudyError, match="must be a list of a number"):
        study_recipe("local", shares="0.25")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    reproduce("local", out, params=TINY_STUDY, notebooks=("07_dmt_study",))
    return out / "study" / "dmt", out


def test_every_arm_trains_on_the_same_dialogue_rows_with_its_replay(study):
    study_dir, _ = study
    manifests = {arm: json.loads((study_dir / "data" / arm / "manifest.json").read_text())
                 for arm in ("replay-00", "replay-50", "from-base")}
    assert manifests["replay-00"]["counts"]["train"] == {"genmedgpt": 12}
    assert manifests["replay-50"]["sizes"]["train"] == 24                  # 12 dialogue + 12 replayed (share 0.5)
    assert sum(v for k, v in manifests["replay-50"]["counts"]["train"].items() if k != "genmedgpt") == 12
    dialogue = {arm: sorted(json.loads(line)["id"] for line in (study_dir / "data" / arm / "train.jsonl").read_text().splitlines()
                            if json.loads(line)["source"] == "genmedgpt") for arm in manifests}
    assert dialogue["replay-00"] == dialogue["replay-50"] == dialogue["from-base"]
    metas = {arm: json.loads((study_dir / "runs" / arm / "run_metadata.json").read_text()) for arm in manifests}
    assert metas["replay-50"]["handoff"] == "stacked" and metas["replay-50"]["from_stage1"]
    assert metas["from-base"]["handoff"] == "from_base" and metas["from-base"]["from_stage1"] is None
    assert all(m["global_step"] == 2 for m in metas.values())


def test_study_writes_its_table_figure_and_findings(study):
    study_dir, out = study
    summary = json.loads((study_dir / "study.json").read_text())
    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["med-mix", "replay-00", "replay-50", "from-base"]
    for row in summary["rows"]:
        assert row["mcq_n"] == 3 * 4 and row["f1_n"] == 2
        assert 0 <= row["mcq_ci95"][0] <= row["mcq_accuracy"] <= row["mcq_ci95"][1] <= 1
        assert row["f1_ci95"][0] <= row["f1"] <= row["f1_ci95"][1]
        assert ("vs_no_replay" in row) == (row["label"] != "replay-00")
    assert len(summary["findings"]) == 4 and "without correction" in summary["findings"][-1]
    assert "not the paper's" in summary["note"]
    table = (study_dir / "table.md").read_text()
    assert "## Findings" in table and "no replay (k = 0)" in table and "stage-2 data alone" in table
    with open(study_dir / "table.csv") as f:
        assert [r["label"] for r in csv.DictReader(f)] == labels
    png = (study_dir / "dmt_tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert (out / "notebooks" / "07_dmt_study.ipynb").exists()
