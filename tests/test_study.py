"""`medlib study dmt` at tiny size, through notebook 07 as `make study` runs it: every arm trains on the
same dialogue rows with the replay its share asks for, and the table, figure and findings are written."""

from __future__ import annotations

import csv
import json

import pytest

from medlib.reproduce import reproduce
from medlib.study import PAPER_SHARE, Arm, StudyError, replay_rows, study_recipe

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]

# study_<name>.yaml keys and, for Med-Mix, the stage recipe's training.max_steps: one override list
TINY_STUDY = ["max_steps=2", "training.max_steps=2", "mcq.limit=4", "bertscore.n_queries=2", "dialogue_train=12",
              "dialogue_validation=4", "retention_rows=6"]


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
    with pytest.raises(StudyError, match="two or more distinct handoffs"):
        study_recipe("local", name="handoff", handoffs=["stacked"])
    with pytest.raises(StudyError, match="one of 'requantized_merge', 'stacked', 'continue'"):
        study_recipe("local", name="handoff", handoffs=["stacked", "merge"])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    reproduce("local", out, params={"overrides": [*TINY_STUDY, "shares=[0.0, 0.5]", "from_base=true"]},
              notebooks=("07_dmt_study",))
    return out / "study" / "dmt", out


@pytest.fixture(scope="module")
def handoff_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("handoff-study")
    reproduce("local", out, params={"overrides": [*TINY_STUDY, "from_base=false"]}, notebooks=("08_handoff_study",))
    return out / "study" / "handoff", out


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
        assert ("vs_reference" in row) == (row["label"] != "replay-00")
        assert row["retention_n"] + row["retention_unscored"] == 6 and row["retention_loss"] > 0
    # the requantized merge at the handoff, each arm after stage 2, 3 comparisons, and how to read them
    assert len(summary["findings"]) == 8 and "without correction for the 9 comparisons" in summary["findings"][-1]
    assert summary["findings"][0].startswith("At the handoff, the authors' requantized merge keeps")
    assert "not the paper's" in summary["note"]
    table = (study_dir / "table.md").read_text()
    assert "## Findings" in table and "no replay (k = 0)" in table and "stage-2 data alone" in table
    with open(study_dir / "table.csv") as f:
        assert [r["label"] for r in csv.DictReader(f)] == labels
    png = (study_dir / "dmt_tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert (out / "notebooks" / "07_dmt_study.ipynb").exists()


def test_handoff_study_trains_each_handoff_on_the_same_rows_and_compares_with_the_authors(handoff_study):
    study_dir, out = handoff_study
    slugs = ("handoff-requantized-merge", "handoff-stacked", "handoff-continue")
    metas = {arm: json.loads((study_dir / "runs" / arm / "run_metadata.json").read_text()) for arm in slugs}
    assert [m["handoff"] for m in metas.values()] == ["requantized_merge", "stacked", "continue"]
    assert len({m["data"]["content_hash"] for m in metas.values()}) == 1   # one mixture: the same rows for every arm
    # replay-00: the dialogue rows alone, built to count them; replay-25: every arm's mixture
    assert sorted(p.name for p in (study_dir / "data").iterdir()) == ["replay-00", "replay-25"]
    assert metas["handoff-requantized-merge"]["trained_against"]["model"].endswith("med-mix/merged_16bit")
    assert metas["handoff-stacked"]["adapter"]["r"] == 32 and metas["handoff-continue"]["adapter"]["r"] == 16

    summary = json.loads((study_dir / "study.json").read_text())
    rows = {r["label"]: r for r in summary["rows"]}
    assert list(rows) == ["med-mix", *slugs] and summary["reference"]["label"] == slugs[0]
    measured = summary["med_mix_handoff_measure"]["all"]["kept_share"]
    assert rows[slugs[0]]["delta_w1_kept"] == measured < 1.0
    assert rows["handoff-stacked"]["delta_w1_kept"] == rows["handoff-continue"]["delta_w1_kept"] == 1.0
    for label in ("med-mix", *slugs[1:]):
        vs = rows[label]["vs_reference"]
        assert vs["mcq"]["n_paired"] == 12 and vs["retention_loss"]["n_paired"] == 6 and vs["f1"]["n_paired"] == 2
        assert vs["retention_loss"]["ci95"][0] <= vs["retention_loss"]["difference"] <= vs["retention_loss"]["ci95"][1]
    assert "vs_reference" not in rows[slugs[0]] and len(summary["findings"]) == 8
    assert "without correction for the 9 comparisons" in summary["findings"][-1]
    # stage 1's gain over the base: all of it for Med-Mix itself; what the requantized merge keeps, with a CI
    assert rows["med-mix"]["stage1_gain_kept"][0] == pytest.approx(1.0)
    kept, low, high = summary["gain_kept_at_the_handoff"]["requantized_merge"]
    assert low <= kept <= high and summary["gain_kept_at_the_handoff"]["stacked"] == [1.0, 1.0, 1.0]
    assert all(len(rows[label]["stage1_gain_kept"]) == 3 for label in slugs)
    assert (study_dir / "eval" / "retention" / "med-mix-requantized.jsonl").exists()
    table = (study_dir / "table.md").read_text()
    assert "# Handoff study" in table and "| q_proj |" in table and "requantized merge (the authors')" in table
    png = (study_dir / "handoffs.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert (out / "notebooks" / "08_handoff_study.ipynb").exists()
