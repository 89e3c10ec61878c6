"""The data layer on the real published files, generated paper-scale rows and planted bad rows."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from medlib import prompts
from medlib.config import load_eval, load_train
from medlib.data.decontam import normalised_key
from medlib.data.eval_sets import load_eval_set
from medlib.data.io import read_jsonl
from medlib.data.loaders import load_source
from medlib.data.mixtures import build_mixture
from medlib.data.synthetic import write_paper_scale_folder
from medlib.data.validate import DataError

LOCAL_EVAL = load_eval("local")


def local_eval_set(name, data_dir):
    return load_eval_set(LOCAL_EVAL.sets[name], [data_dir], hub=False, name=name)


def local_chat_eval(data_dir):
    return load_eval_set(LOCAL_EVAL.chat_sets[0], [data_dir], hub=False, strict=False)


def build(profile, name, out, overrides=(), stage1_mixture=None):
    """A training recipe's mixture in `out`, decontaminated against the profile's evaluation sets."""
    return build_mixture(load_train(profile, name, overrides), out, load_eval(profile), stage1_mixture)


REAL_COUNTS = [("medqa", "test", 1273), ("medmcqa", "validation", 4183), ("pubmedqa", "pqa_labeled", 1000),
               ("pubmedqa", "test", 500), ("mmlu_med", "test", 1089), ("genmedgpt", "train", 5452)]


@pytest.mark.parametrize("source,split,expected", REAL_COUNTS)
def test_real_files_load_with_exact_counts(data_dir, source, split, expected):
    result = load_source(source, split, data_dir)
    assert len(result.records) == expected
    assert result.report.skipped == []


def test_answer_spreads_match_the_data_readme(data_dir):
    def spread(source, split):
        return dict(Counter(r["answer"] for r in load_source(source, split, data_dir).records))

    assert spread("pubmedqa", "pqa_labeled") == {"A": 552, "B": 338, "C": 110}  # yes / no / maybe
    assert spread("pubmedqa", "test") == {"A": 276, "B": 169, "C": 55}
    assert spread("medmcqa", "validation") == {"A": 1348, "B": 1085, "C": 925, "D": 825}


def test_records_are_normalised(data_dir):
    medqa = load_source("medqa", "test", data_dir).records[0]
    assert list(medqa["options"]) == ["A", "B", "C", "D"] and medqa["answer"] == "B"
    pubmed = load_source("pubmedqa", "test", data_dir).records[0]
    assert pubmed["options"] == {"A": "yes", "B": "no", "C": "maybe"} and pubmed["context"]
    chat = load_source("genmedgpt", "train", data_dir).records[0]
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]


def test_letter_mapping_holds_both_ways():
    for label in ("yes", "no", "maybe"):
        assert prompts.pubmedqa_letter_to_label(prompts.pubmedqa_label_to_letter(label)) == label
    for letter in "ABC":
        assert prompts.pubmedqa_label_to_letter(prompts.pubmedqa_letter_to_label(letter)) == letter
    assert [prompts.index_to_letter(i) for i in range(4)] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError):
        prompts.pubmedqa_label_to_letter("perhaps")
    with pytest.raises(ValueError):
        prompts.index_to_letter(-1)  # MedMCQA test rows carry cop = -1: no label


def test_mcq_prompt_and_targets():
    record = {"id": "x", "source": "medqa", "question": "Q?", "context": "", "options": {"A": "a", "B": "b"}, "answer": "B"}
    messages = prompts.record_to_messages(record)
    assert messages[0]["content"] == prompts.SYSTEM_PROMPT
    assert "A. a\nB. b" in messages[1]["content"]
    assert messages[-1] == {"role": "assistant", "content": "B"}
    assert prompts.record_to_messages(record, target_style="letter_text")[-1]["content"] == "B. b"
    assert prompts.record_to_messages(record, with_answer=False)[-1]["role"] == "user"
    # the authors' notebooks: "Question:/Options:/A) …" user turn, "Answer: B) text" target, no letter instruction
    authors = prompts.record_to_messages(record, target_style="authors", mcq_format="authors")
    assert authors[1]["content"] == "Question: Q?\nOptions:\nA) a\nB) b"
    assert authors[-1] == {"role": "assistant", "content": "Answer: B) b"}
    pubmed = dict(record, context="An abstract.", options=dict(prompts.PUBMEDQA_OPTIONS), answer="A")
    assert prompts.format_mcq_prompt(pubmed, "authors") == "Context: An abstract.\nQuestion: Q?\nOptions:\nA) yes\nB) no\nC) maybe"
    with pytest.raises(ValueError, match="unknown MCQ format"):
        prompts.format_mcq_prompt(record, "other")


def test_local_standins_never_overlap_evaluation(data_dir):
    train_parts = (load_source("pubmedqa", "pqal_train_standin", data_dir).records
                   + load_source("medmcqa", "validation_train_standin", data_dir).records)
    eval_parts = [r for name in ("medqa", "medmcqa", "pubmedqa", "mmlu_med") for r in local_eval_set(name, data_dir)]
    assert len(local_eval_set("pubmedqa", data_dir)) == 500
    assert {r["id"] for r in train_parts}.isdisjoint({r["id"] for r in eval_parts})
    medmcqa_train = load_source("medmcqa", "validation_train_standin", data_dir).records
    assert len(medmcqa_train) + len(local_eval_set("medmcqa", data_dir)) == 4183
    chat_train = load_source("genmedgpt", "train_standin", data_dir).records
    chat_eval = local_chat_eval(data_dir)
    assert len(chat_eval) == 50 and len(chat_train) == 5402
    assert {r["id"] for r in chat_train}.isdisjoint({r["id"] for r in chat_eval})


def test_local_mixtures_are_disjoint_from_what_is_evaluated(data_dir, tmp_path):
    out1 = build("local", "stage1", tmp_path / "s1")
    out2 = build("local", "stage2", tmp_path / "s2", stage1_mixture=out1)
    evaluated = [r for name in ("medqa", "medmcqa", "pubmedqa", "mmlu_med") for r in local_eval_set(name, data_dir)]
    evaluated += local_chat_eval(data_dir)
    eval_keys = {normalised_key(r) for r in evaluated}
    for out in (out1, out2):
        rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "validation.jsonl")
        assert rows and not any(normalised_key(r) in eval_keys for r in rows)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["standin"] is True and "STAND-IN" in manifest["note"]
        assert manifest["sizes"]["total"] == len(rows)


@pytest.fixture(scope="module")
def paper_scale_dir(tmp_path_factory):
    return write_paper_scale_folder(tmp_path_factory.mktemp("paper_scale"), notechat_rows=110_000)


@pytest.mark.slow
def test_paper_scale_mixtures_have_the_sizes_of_tables_1_and_2(paper_scale_dir, tmp_path):
    d = paper_scale_dir
    stage1 = build("paper", "stage1", tmp_path / "s1", [f"data.data_dir={d}"])
    m1 = json.loads((stage1 / "manifest.json").read_text())
    assert m1["sizes"]["total"] == 10178 + 182822 + 211269 == 404269
    assert m1["sizes"]["validation"] == 40427
    totals = Counter()
    for split in ("train", "validation"):
        totals.update(m1["counts"][split])
    assert dict(totals) == {"medqa": 10178, "medmcqa": 182822, "pubmedqa": 211269}
    stage2 = build("paper", "stage2", tmp_path / "s2", [f"data.data_dir={d}"], stage1_mixture=stage1)
    m2 = json.loads((stage2 / "manifest.json").read_text())
    assert m2["counts"]["train"]["notechat"] == 100000 and m2["counts"]["validation"]["notechat"] == 10000
    assert m2["sizes"] == {"train": 133333, "validation": 13333, "total": 146666}
    # replay given as a ratio of the stage-1 split instead of a count
    ratio = build("paper", "stage2", tmp_path / "s2r", [f"data.data_dir={d}", "data.replay.n_train=0.5",
                                                          "data.replay.n_validation=0.5"], stage1_mixture=stage1)
    assert json.loads((ratio / "manifest.json").read_text())["sizes"]["train"] == 100000 + round(0.5 * 363842)


def test_same_seed_same_hash_other_seed_other_order(data_dir, tmp_path):
    def build_seeded(seed, name):
        out = build("local", "stage1", tmp_path / name, [f"data.seed={seed}"])
        return json.loads((out / "manifest.json").read_text())["content_hash"], [r["id"] for r in read_jsonl(out / "train.jsonl")]

    hash_a, order_a = build_seeded(1, "a")
    hash_b, order_b = build_seeded(1, "b")
    hash_c, order_c = build_seeded(2, "c")
    assert hash_a == hash_b and order_a == order_b
    assert hash_c != hash_a and order_c != order_a


BAD_ROWS = {
    "bad-empty": ({"question": "  ", "options": {"A": "x", "B": "y"}, "answer": "A"}, "empty question"),
    "bad-one-option": ({"question": "Q?", "options": {"A": "x"}, "answer": "A"}, "fewer than 2 options"),
    "bad-answer": ({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "E"}, "not among the options"),
    "bad-type": ({"question": 42, "options": {"A": "x", "B": "y"}, "answer": "A"}, "question must be a string"),
}


def _folder_with_bad_rows(tmp_path, data_dir):
    folder = tmp_path / "bad"
    (folder / "medmcqa").mkdir(parents=True)
    good = {f"good-{i}": {"question": f"Generated question {i}?", "options": {"A": "x", "B": "y"}, "answer": "A"}
            for i in range(20)}
    good.update({k: v for k, (v, _) in BAD_ROWS.items()})
    text = json.dumps(good)
    # a duplicate id: JSON objects cannot repeat keys, so plant it in the Hub's JSONL layout instead
    (folder / "medmcqa" / "train.json").write_text(text)
    (folder / "medqa").mkdir()
    line = json.dumps({"id": "dup", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "y", "answer_idx": "B"})
    (folder / "medqa" / "train.jsonl").write_text(line + "\n" + line + "\n")
    return folder


def test_planted_bad_rows_are_each_reported(tmp_path, data_dir):
    folder = _folder_with_bad_rows(tmp_path, data_dir)
    lenient = load_source("medmcqa", "train", folder, strict=False)
    assert len(lenient.records) == 20 and lenient.rows_read == 24
    reasons = {s["row"]: s["reason"] for s in lenient.report.skipped}
    for key, (_, reason) in BAD_ROWS.items():
        assert reason in reasons[key]
    with pytest.raises(DataError) as err:
        load_source("medmcqa", "train", folder, strict=True)
    assert "train.json" in str(err.value) and "bad-" in str(err.value)
    duplicate = load_source("medqa", "train", folder, strict=False)
    assert len(duplicate.records) == 1 and "duplicate id 'dup'" in duplicate.report.skipped[0]["reason"]
    with pytest.raises(DataError, match="line 2.*duplicate id"):
        load_source("medqa", "train", folder, strict=True)


def test_lenient_build_lists_skipped_rows_in_the_manifest(tmp_path, data_dir):
    folder = _folder_with_bad_rows(tmp_path, data_dir)
    recipe = load_train("paper", "stage1", [f"data.data_dir={folder}", "data.strict=false",
                                            'data.sources=[{"source": "medmcqa", "split": "train"}]'])
    manifest = json.loads((build_mixture(recipe, tmp_path / "m", load_eval("paper")) / "manifest.json").read_text())
    assert manifest["skipped_rows"]["total"] == 4
    assert {r["id"] for r in manifest["skipped_rows"]["rows"]} == set(BAD_ROWS)
    with pytest.raises(DataError, match="bad-"):
        build_mixture(recipe.replace(data=recipe.data.replace(strict=True)), tmp_path / "m", load_eval("paper"))


def test_unreadable_json_names_file_and_line(tmp_path):
    (tmp_path / "medqa").mkdir()
    good = json.dumps({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "x", "answer_idx": "A"})
    (tmp_path / "medqa" / "train.jsonl").write_text(good + "\n{broken\n")
    with pytest.raises(DataError, match=r"train.jsonl: line 2: not valid JSON"):
        load_source("medqa", "train", tmp_path)


def test_decontamination_catches_planted_test_questions(tmp_path, data_dir):
    folder = tmp_path / "planted"
    write_paper_scale_folder(folder, sizes={"medqa": 200, "medmcqa": 200, "pubmedqa_artificial": 50}, notechat_rows=0)
    test_rows = [json.loads(line) for line in (data_dir / "medqa" / "test.jsonl").read_text().splitlines()[:3]]
    test_rows[1]["question"] = test_rows[1]["question"].upper() + "  "  # only equal after normalisation
    with open(folder / "medqa" / "train.jsonl", "a") as f:
        for row in test_rows:
            f.write(json.dumps(row) + "\n")
    mmlu = json.loads((data_dir / "mmlu_med" / "mmlu_med.json").read_text())
    key, value = next(iter(mmlu.items()))
    with open(folder / "medmcqa" / "train.jsonl", "a") as f:
        f.write(json.dumps({"id": "planted-mmlu", "question": value["question"], "opa": value["options"]["A"],
                            "opb": value["options"]["B"], "opc": value["options"]["C"], "opd": value["options"]["D"],
                            "cop": 0}) + "\n")
    recipe = load_train("paper", "stage1", [f"data.data_dir={folder}", "data.decontaminate=drop"])  # the correction
    recipe = recipe.replace(data=recipe.data.replace(sources=tuple(s.replace(n=None) for s in recipe.data.sources)))
    out = build_mixture(recipe, tmp_path / "m", load_eval("paper"))
    decon = json.loads((out / "manifest.json").read_text())["decontamination"]
    assert decon["exact"] == 3 and decon["normalised"] == 1 and decon["dropped"] == 4
    assert decon["by_eval_set"] == {"medqa": 3, "mmlu_med": 1}
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "validation.jsonl")
    assert len(rows) == 450 and "planted-mmlu" not in {r["id"] for r in rows}


def test_samples_run_with_no_data_at_all(tmp_path):
    out = build("local", "stage1", tmp_path / "s1", ["data.data_dir=samples"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sizes"]["total"] > 0 and manifest["data_dir"] == "samples"
    for source, split in [("medqa", "train"), ("medmcqa", "train"), ("pubmedqa", "pqa_artificial"), ("notechat", "train"),
                          ("healthcaremagic", "train"), ("icliniq", "train")]:
        records = load_source(source, split, "samples").records
        assert records and all("[SAMPLE]" in json.dumps(r) for r in records)


def test_cli_build_prints_a_summary(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "medlib", "data", "build", "--profile", "local", "--stage", "1",
                           "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "STAND-IN" in done.stdout and "content hash" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "medlib", "data", "build", "--profile", "local", "--stage", "1",
                          "--set", "data.nope=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown recipe key 'data.nope'" in bad.stderr


def test_notechat_turns_follow_the_authors_speaker_rule():
    from medlib.data.sources import split_notechat_conversation

    text = ("[The patient is in the ward.]\nDoctor: Good morning. How are you feeling?\n"
            "Patient: Not great, my chest hurts.\nPatient’s Family: He has had it since yesterday.\n\n"
            "Nurse: His blood pressure is 150/95.\nyes, since yesterday\nDoctor: We will run an ECG.")
    assert split_notechat_conversation(text) == [
        {"role": "assistant", "content": "Good morning. How are you feeling?"},
        {"role": "user", "content": "Not great, my chest hurts."},
        {"role": "user", "content": "He has had it since yesterday."},   # a family member speaks as the user
        {"role": "user", "content": "His blood pressure is 150/95."},    # any other speaker: a user turn
        {"role": "user", "content": "yes, since yesterday"},             # no "Speaker: ": a user turn as it is
        {"role": "assistant", "content": "We will run an ECG."},
    ]


def test_decontamination_never_aborts_a_strict_build_and_can_only_report(tmp_path, data_dir):
    """A strict paper-profile build asking for every row of a source whose rows repeat a test question:
    `drop` takes what is left and says why; `report` drops nothing and lists the overlaps."""
    folder = tmp_path / "planted"
    write_paper_scale_folder(folder, sizes={"medqa": 40, "medmcqa": 40, "pubmedqa_artificial": 20}, notechat_rows=0)
    test_rows = [json.loads(line) for line in (data_dir / "medqa" / "test.jsonl").read_text().splitlines()[:2]]
    with open(folder / "medqa" / "train.jsonl", "a") as f:
        for row in test_rows:
            f.write(json.dumps(row) + "\n")
    sources = ('data.sources=[{"source": "medqa", "split": "train", "n": 42}, '
               '{"source": "medmcqa", "split": "train", "n": 40}, {"source": "pubmedqa", "split": "pqa_artificial", "n": 20}]')
    corrected = ["data.decontaminate=drop", "data.order=medlib"]  # the paper profile's default is the authors' report
    dropped = json.loads((build("paper", "stage1", tmp_path / "drop", [f"data.data_dir={folder}", sources, *corrected])
                          / "manifest.json").read_text())
    assert dropped["sizes"]["total"] == 100 and dropped["decontamination"]["dropped"] == 2
    assert any("asked for 42 rows but only 40" in note and "2 dropped" in note for note in dropped["notes"])
    reported = json.loads((build("paper", "stage1", tmp_path / "report", [f"data.data_dir={folder}", sources,
                                                                          "data.decontaminate=report"])
                           / "manifest.json").read_text())
    assert reported["sizes"]["total"] == 102 and reported["decontamination"]["dropped"] == 0
    assert reported["decontamination"]["exact"] == 2 and reported["decontamination"]["by_eval_set"] == {"medqa": 2}
    with pytest.raises(DataError, match="asked for 43 rows"):  # more than even decontamination explains: an error
        build("paper", "stage1", tmp_path / "bad", [f"data.data_dir={folder}", sources.replace('"n": 42', '"n": 43'), *corrected])


def test_a_planted_13_gram_overlap_is_found_dropped_or_listed():
    """A question pasted inside a longer training text is no duplicate, but it shares the item's 13-grams."""
    from medlib.data.decontam import EvalIndex, decontaminate

    question = ("A 45-year-old man presents with crushing substernal chest pain radiating to the left arm for two "
                "hours and diaphoresis; which of the following is the most appropriate next step in management")
    options = {"A": "Aspirin and an electrocardiogram", "B": "Discharge home", "C": "Oral antibiotics", "D": "Reassurance"}
    index = EvalIndex()
    index.add("medqa", [{"id": "q1", "source": "medqa", "question": question, "options": options}])
    pasted = {"id": "t1", "source": "notechat", "messages": [
        {"role": "user", "content": "My textbook asks: " + question + "? I am not sure what it wants."},
        {"role": "assistant", "content": "Think about acute coronary syndrome first."}]}
    unrelated = {"id": "t2", "source": "medmcqa", "question": "Which vitamin deficiency causes scurvy?",
                 "options": {"A": "Vitamin C", "B": "Vitamin D", "C": "Vitamin A", "D": "Vitamin K"}}
    kept, report = decontaminate([pasted, unrelated], index, drop=True)
    assert [r["id"] for r in kept] == ["t2"] and report["dropped"] == 1
    assert report["exact"] == report["normalised"] == 0          # no duplicate check would have caught it
    assert report["ngram"]["rows"] == 1 and report["ngram"]["eval_items_by_set"] == {"medqa": 1}
    [match] = report["matches"]
    assert match["match"] == "13-gram" and match["ngram_items"][0]["id"] == "q1" and match["ngram_items"][0]["share"] >= 0.5
    kept, report = decontaminate([pasted, unrelated], index, drop=False)   # report mode: listed, kept
    assert [r["id"] for r in kept] == ["t1", "t2"] and report["dropped"] == 0 and report["matches"][0]["id"] == "t1"
    kept, report = decontaminate([pasted, unrelated], index, drop=True, ngram_threshold=None)
    assert len(kept) == 2 and report["ngram"]["rows"] == 0
