"""The source registry (issue 23): adding an evaluation set is one registry entry and its line under `sets:` in
eval.yaml (its name in `mcq.sets` scores it), and the set then appears in Table 3, its figure and the training
mixtures' decontamination, with no other edit."""

from __future__ import annotations

import json

import pytest

from medlib.config import load_eval, load_train
from medlib.data.io import write_jsonl
from medlib.data.sources import REGISTRY, Source, register

TOY = [{"id": f"toy-{i}", "question": f"Toy question {i}: which organ pumps blood?", "options": {
    "A": "Heart", "B": "Liver", "C": "Kidney", "D": "Lung"}, "answer": "A"} for i in range(3)]


def _toy_record(raw, row):
    return {"id": raw["id"], "source": "toyqa", "question": raw["question"], "context": "", "options": raw["options"],
            "answer": raw["answer"]}


@pytest.fixture
def toy_set(tmp_path):
    """One registry entry and its file; the eval recipe gets one `sets:` line (here as --set overrides)."""
    register(Source("toyqa", "mcq", "ToyQA", lambda split, rule: _toy_record, local_files={"test": ("toyqa/test.jsonl",)},
                    default_split="test"))
    write_jsonl(tmp_path / "toyqa" / "test.jsonl", TOY)
    yield tmp_path
    REGISTRY.pop("toyqa")


def test_a_registered_set_is_decontaminated_against(toy_set):
    from medlib.data.mixtures import eval_index

    eval_recipe = load_eval("local", ["sets.toyqa={source: toyqa, split: test}", "mcq.sets=[medqa, toyqa]"])
    recipe = load_train("local", 1, [f"data.eval_data_dir={toy_set}"])
    index = eval_index(recipe, eval_recipe, with_chat=False)
    assert index.sizes["toyqa"] == 3
    planted = {**TOY[1], "id": "train-row-9", "source": "medmcqa"}
    assert index.match(planted) == ("exact", "toyqa")


@pytest.mark.slow
def test_a_registered_set_is_scored_into_table_3_and_its_figure(toy_set):
    from medlib.evaluate.mcq import run_mcq
    from medlib.plots import plot_mcq_bars

    recipe = load_eval("local", ["sets.toyqa={source: toyqa, split: test}", "mcq.sets=[toyqa]", f"data.data_dir={toy_set}",
                                 "mcq.limit=null", "mcq.bootstrap_samples=20"])
    out = toy_set / "eval"
    results = run_mcq(recipe, out)
    assert results["sets"]["toyqa"]["n_scored"] == 3
    assert results["sets_source"]["toyqa"]["origin"].endswith("toyqa/test.jsonl")
    table = (out / "table3.md").read_text()
    assert "ToyQA (extra)" in table.splitlines()[2]
    columns = json.loads((out / "table3_columns.json").read_text())
    assert ["toyqa", "ToyQA (extra)"] in columns
    png = plot_mcq_bars(out / "table3.csv", out / "bars.png").read_bytes()
    assert png.startswith(b"\x89PNG")
