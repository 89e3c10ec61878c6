"""Paper fidelity (issue 12): what the authors ran, as the paper profile's default.

- golden examples: the authors' user turn, target and chatml text per source, character for character
  (../shared/reference/authors_notebooks.md);
- chatml maps <|im_end|> onto EOS the way Unsloth's get_chat_template(map_eos_token=True) does;
- the Hub-shaped fixtures load through datasets.load_dataset with exact counts and their quirks;
- the authors' mixtures are row-exact: medlib's build equals the authors' datasets pipeline, written
  here with the authors' own formatting code (tests/authors_code.py, transcribed from their notebooks at
  commit ed892cf), row for row and in order;
- authors' mode against their code on awkward rows: whitespace, "Doctor:" twice, empty turns, repeated and
  out-of-set answer letters;
- decontamination reports in authors mode and drops (counted) in corrected mode, never aborting;
- constant-length packing; the smoke preset; the paper-profile smoke run (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys

import authors_code
import pytest

from medlib.config import load_eval, load_recipe, load_train, preset_overrides
from medlib.data.loaders import SAMPLES_DIR, load_source
from medlib.data.mixtures import build_mixture, read_mixture
from medlib.models import TINY_LLAMA, load_tokenizer
from medlib.paths import REPO_ROOT
from medlib.prompts import (CHATML_TEMPLATE, SYSTEM_PROMPT, apply_chat_template_choice, format_mcq_prompt, mcq_target,
                            record_to_messages, render_chat)

HUB = SAMPLES_DIR / "hub"
MIRROR = {"data.hub": False, "data.hub_mirror": "samples/hub"}


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return apply_chat_template_choice(load_tokenizer(TINY_LLAMA), "chatml")


def _first(source: str, split: str) -> dict:
    return load_source(source, split, hub=True, hub_mirror="samples/hub").records[0]


# ----------------------------------------------------------------------------- golden examples


def test_authors_golden_example_per_source(chatml_tokenizer):
    medqa = _first("medqa", "train")
    assert format_mcq_prompt(medqa, "authors") == (
        "Question: [SAMPLE] A 54-year-old man has crushing chest pain radiating to the left arm for 30 minutes. "
        "Which test should be done first?\nOptions:\nA) Electrocardiogram\nB) Chest CT\nC) Colonoscopy\nD) Skin biopsy")
    assert mcq_target(medqa, "authors") == "Answer: A) Electrocardiogram"
    medmcqa = _first("medmcqa", "train")
    assert format_mcq_prompt(medmcqa, "authors") == (
        "Question: [SAMPLE] (MedMCQA) A 54-year-old man has crushing chest pain radiating to the left arm for 30 "
        "minutes. Which test should be done first?\nOptions:\nA) Electrocardiogram\nB) Chest CT\nC) Colonoscopy\n"
        "D) Skin biopsy")
    pubmedqa = _first("pubmedqa", "pqa_artificial")
    # The authors: Context: {" ".join(context["contexts"])} -- no section labels, one space between sections.
    assert format_mcq_prompt(pubmedqa, "authors") == (
        "Context: [SAMPLE] Background sentence 0 written for the sample file. [SAMPLE] A small cohort was studied; "
        "results are described here as an example.\nQuestion: [SAMPLE] (PQA-A) Does regular aerobic exercise lower "
        "resting blood pressure in adults with hypertension?\nOptions:\nA) yes\nB) no\nC) maybe")
    assert mcq_target(pubmedqa, "authors") == "Answer: A) yes"
    text = render_chat(chatml_tokenizer, record_to_messages(medqa, SYSTEM_PROMPT, "authors", mcq_format="authors"))
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                    f"{format_mcq_prompt(medqa, 'authors')}<|im_end|>\n<|im_start|>assistant\n"
                    "Answer: A) Electrocardiogram<|im_end|>\n")
    notechat = load_source("notechat", "train", hub=True, hub_mirror="samples/hub").records[-1]
    text = render_chat(chatml_tokenizer, record_to_messages(notechat, SYSTEM_PROMPT))
    assert text.endswith("<|im_start|>user\nHer ankle is swollen on the outside.<|im_end|>\n"  # Nurse: a user turn
                         "<|im_start|>user\nmm, it hurts when I walk<|im_end|>\n"               # no speaker: as it is
                         "<|im_start|>assistant\nIt looks like a sprain; rest, ice and elevation will help.<|im_end|>\n")
    assert "[Doctor examines" not in text  # bracket lines are skipped


def test_notechat_fixture_dialogues_follow_the_authors_rule():
    records = load_source("notechat", "train", hub=True, hub_mirror="samples/hub").records
    family = records[-2]["messages"]
    assert [m["role"] for m in family] == ["assistant", "user", "user", "assistant", "user", "assistant"]
    assert family[2]["content"] == "He has also been more tired than usual."   # "Patient’s Family:" dropped, not merged
    said = [m["content"] for r in records for m in r["messages"]]
    assert not any("enters with his daughter" in t or "Doctor examines" in t for t in said)  # bracket lines skipped


def test_chatml_maps_im_end_onto_the_eos_of_a_llama_like_tokenizer():
    """Llama 3.1 has no <|im_end|>: Unsloth renames its EOS token to <|im_end|>, keeping the id."""
    from tokenizers import Tokenizer

    smol = load_tokenizer(TINY_LLAMA)
    eos_id = smol.convert_tokens_to_ids("<|im_end|>")
    llama_like = type(smol)(tokenizer_object=Tokenizer.from_str(
        smol._tokenizer.to_str().replace('"<|im_end|>"', '"<|eot_id|>"')), eos_token="<|eot_id|>")
    assert "<|im_end|>" not in llama_like.get_vocab()
    mapped = apply_chat_template_choice(llama_like, "chatml")
    assert mapped.eos_token == "<|im_end|>" and mapped.eos_token_id == eos_id
    assert mapped("<|im_end|>", add_special_tokens=False)["input_ids"] == [eos_id]
    assert mapped.chat_template == CHATML_TEMPLATE and "<|eot_id|>" not in mapped.get_vocab()
    assert apply_chat_template_choice(smol, "native") is smol
    with pytest.raises(ValueError, match="unknown chat template"):
        apply_chat_template_choice(smol, "llama-2")


def test_figures_3_10_are_the_papers_text_verbatim():
    import importlib.util

    import yaml

    from medlib.paths import default_data_dir

    spec = importlib.util.spec_from_file_location("transcribe", REPO_ROOT / "scripts" / "transcribe_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paper = (default_data_dir().parent / "reference" / "paper_med_nirvana_2024.txt").read_text(encoding="utf-8")
    shipped = yaml.safe_load((REPO_ROOT / "medlib/reference/figures_3_10.yaml").read_text(encoding="utf-8"))["samples"]
    assert shipped == module.transcribe(paper) and [s["figure"] for s in shipped] == list(range(3, 11))
    for sample in shipped:  # every field is a span of the paper's text, character for character
        for key in ("query", "physician", "llama_instruct", "med_nirvana"):
            assert sample[key] and sample[key] in paper, (sample["figure"], key)
    assert shipped[7]["query"] == ("When I have the fever, can I take Cetirizine in the morning and then Paracetamol "
                                   "in the afternoon?")


# ----------------------------------------------------------------------------- Hub-shaped fixtures


def test_hub_fixtures_load_through_datasets_with_exact_counts_and_quirks():
    counts = {("medqa", "train"): 9, ("medqa", "validation"): 2, ("medqa", "test"): 4, ("medmcqa", "train"): 9,
              ("medmcqa", "validation"): 12, ("pubmedqa", "pqa_artificial"): 8, ("pubmedqa", "pqa_labeled"): 8,
              ("notechat", "train"): 10, ("healthcaremagic", "train"): 50, ("icliniq", "train"): 60,
              ("mmlu_med", "test"): 6}
    for (source, split), n in counts.items():
        result = load_source(source, split, hub=True, hub_mirror="samples/hub")
        assert (result.rows_read, len(result.records)) == (n, n), (source, split)
        assert result.origin.startswith("mirror:")
    # MedMCQA's test split is unlabelled: strict stops naming the row, lenient skips and counts all 3
    with pytest.raises(ValueError, match="cop = -1"):
        load_source("medmcqa", "test", hub=True, hub_mirror="samples/hub")
    lenient = load_source("medmcqa", "test", hub=True, hub_mirror="samples/hub", strict=False)
    assert lenient.rows_read == 3 and lenient.records == [] and sum(lenient.report.counts().values()) == 3
    # both MedQA variants hold the same questions and normalise to the same records
    from datasets import load_dataset

    plain = load_dataset(str(HUB / "GBaker/MedQA-USMLE-4-options"), split="test")
    hf = load_source("medqa", "test", hub=True, hub_mirror="samples/hub").records
    assert [r["question"] for r in hf] == plain["question"]
    assert [r["answer"] for r in hf] == plain["answer_idx"]
    assert [list(r["options"].values()) for r in hf] == [list(o.values()) for o in plain["options"]]
    # a MedQA training row repeats a test question word for word
    assert hf[0]["question"] in {r["question"] for r in load_source("medqa", "train", hub=True, hub_mirror="samples/hub").records}


# ----------------------------------------------------------------------------- row-exact mixtures


def _authors_stage1_rows():
    """The authors' stage-1 notebook, their own formatting code (tests/authors_code.py, commit ed892cf) on each
    raw Hub row, the three datasets concatenated, shuffle(seed=42), train_test_split(test_size=0.1, seed=42)."""
    from datasets import concatenate_datasets, load_dataset

    def rows(conversation):
        return lambda x: {"user": conversation(x)[0]["value"], "target": conversation(x)[1]["value"]}

    medqa = load_dataset(str(HUB / "GBaker/MedQA-USMLE-4-options-hf"), split="train").map(rows(authors_code.medqa_conversation))
    medmcqa = load_dataset(str(HUB / "openlifescienceai/medmcqa"), split="train").map(rows(authors_code.medmcqa_conversation))
    pubmedqa = load_dataset(str(HUB / "qiaojin/PubMedQA"), "pqa_artificial", split="train").map(
        rows(authors_code.pubmedqa_conversation))
    keep = ["user", "target"]
    mixed = concatenate_datasets([d.select_columns(keep) for d in (medqa, medmcqa, pubmedqa)])
    return mixed.shuffle(seed=42).train_test_split(test_size=0.1, seed=42)


def _medlib_rows(records: list[dict]) -> list[tuple]:
    out = []
    for r in records:
        if "options" in r:
            out.append((format_mcq_prompt(r, "authors"), mcq_target(r, "authors")))
        else:
            out.append(tuple(m["content"] for m in r["messages"]))
    return out


def _authors_notechat_turns(conversation: str) -> tuple:
    return tuple(turn["value"] for turn in authors_code.convert_conversation(conversation))


# A raw row of each kind with what the authors' code handles differently from medlib's: whitespace around the
# question, "Doctor:" twice in one line, a bare "Doctor:" line, a bare "Patient:" line, brackets and blanks.
AWKWARD_MEDQA = {"id": "q-ws", "sent1": "  A 30-year-old has a fever.   Which drug?\n", "ending0": "Aspirin",
                 "ending1": "Ceftriaxone ", "ending2": "Insulin", "ending3": "Heparin", "label": 1}
AWKWARD_NOTECHAT = ("Doctor: Hello, I am Doctor: Smith's colleague.\n\n  Patient: My chest hurts.  \n[The doctor listens]\n"
                    "Doctor:\nPatient:\nPatient’s Family: He fainted twice.\nmm, since Monday\nDoctor: Let us run an ECG.")
AWKWARD_REPLIES = ["Answer: B) Ceftriaxone", "Answer: B. Actually, to be sure, Answer: B", "Answer: E) none of these",
                   "Answer: A) yes. On reflection, Answer: C", "B", "The answer is B", "Answer:B", "answer: b"]


def test_authors_mode_is_the_authors_own_code_on_awkward_rows():
    """Against their notebook cells themselves (tests/authors_code.py), not a description of them."""
    from medlib.data.sources import normalise_medqa, normalise_notechat
    from medlib.data.validate import record_problem
    from medlib.evaluate.mcq import parse_answer_authors

    record = normalise_medqa(AWKWARD_MEDQA, 0, "test")
    theirs = authors_code.medqa_conversation(AWKWARD_MEDQA)
    assert format_mcq_prompt(record, "authors") == theirs[0]["value"]          # the question is not stripped
    assert mcq_target(record, "authors") == theirs[1]["value"]
    assert format_mcq_prompt(record, "authors") + load_eval("paper").mcq.answer_cue == \
        authors_code.medqa_eval_input_text(AWKWARD_MEDQA)
    assert "Question: A 30-year-old has a fever.   Which drug?\n\nOptions" in format_mcq_prompt(record, "medlib")  # stripped

    dialogue = normalise_notechat("authors")({"conversation": AWKWARD_NOTECHAT}, 7)
    theirs = authors_code.convert_conversation(AWKWARD_NOTECHAT)
    assert [(m["role"], m["content"]) for m in dialogue["messages"]] == \
        [({"gpt": "assistant", "human": "user"}[t["from"]], t["value"]) for t in theirs]
    assert dialogue["messages"][0]["content"] == "Hello, I am  Smith's colleague."   # every "Doctor:" removed
    assert ("assistant", "") in [(m["role"], m["content"]) for m in dialogue["messages"]]  # the empty turn is kept
    assert record_problem(dialogue) is None                                             # and no row is rejected
    medlib_turns = normalise_notechat("medlib")({"conversation": AWKWARD_NOTECHAT}, 7)["messages"]
    assert medlib_turns[0]["content"] == "Hello, I am Doctor: Smith's colleague."
    assert all(m["content"] for m in medlib_turns) and len(medlib_turns) == len(theirs) - 1

    for reply in AWKWARD_REPLIES:
        for letters in ("ABCD", "ABC"):
            assert (parse_answer_authors(reply, letters) or "") == authors_code.predicted_answer_of(reply, letters), reply
    assert parse_answer_authors(AWKWARD_REPLIES[1], "ABCD") == "B"      # a repeated letter counts once
    assert parse_answer_authors(AWKWARD_REPLIES[2], "ABCD") is None     # a letter outside the set is ignored


@pytest.mark.parametrize("stage", [1, 2])
def test_authors_mixtures_are_the_authors_rows_in_their_order(tmp_path, stage):
    from datasets import concatenate_datasets, load_dataset

    eval_recipe = load_eval("paper", preset="smoke")
    stage1 = build_mixture(load_train("paper", 1, preset="smoke"), tmp_path / "stage1", eval_recipe)
    authors = _authors_stage1_rows()
    if stage == 1:
        train, validation, _ = read_mixture(stage1)
        assert _medlib_rows(train) == list(zip(authors["train"]["user"], authors["train"]["target"]))
        assert _medlib_rows(validation) == list(zip(authors["test"]["user"], authors["test"]["target"]))
        assert len(validation) == 3  # ceil(0.1 x 26), as train_test_split counts
        return
    recipe = load_train("paper", 2, preset="smoke")  # NoteChat 8 + 2, replay 3 + 1
    stage2 = build_mixture(recipe, tmp_path / "stage2", eval_recipe, stage1)
    train, validation, _ = read_mixture(stage2)
    notechat = load_dataset(str(HUB / "akemiH/NoteChat"), split="train").shuffle(seed=42)
    notechat = notechat.map(lambda x: {"row": list(_authors_notechat_turns(x["conversation"]))})
    replay = {split: authors[split].shuffle(seed=42) for split in ("train", "test")}

    def expected(nc, rp):  # their stage-2 split: NoteChat rows, then replay rows, concatenated and shuffle(seed=42)
        replayed = rp.map(lambda x: {"row": [x["user"], x["target"]]}).select_columns(["row"])
        mixed = concatenate_datasets([nc.select_columns(["row"]), replayed]).shuffle(seed=42)
        return [tuple(row) for row in mixed["row"]]

    assert _medlib_rows(train) == expected(notechat.select(range(8)), replay["train"].select(range(3)))
    assert _medlib_rows(validation) == expected(notechat.select(range(8, 10)), replay["test"].select(range(1)))


def test_decontamination_reports_in_authors_mode_and_drops_in_corrected_mode(tmp_path):
    eval_recipe = load_eval("paper", preset="smoke")
    authors = json.loads((build_mixture(load_train("paper", 1, preset="smoke"), tmp_path / "a", eval_recipe)
                          / "manifest.json").read_text())
    decon = authors["decontamination"]
    assert decon["dropped"] == 0 and decon["by_eval_set"]["medqa"] >= 1 and authors["sizes"]["total"] == 26
    corrected = load_train("paper", 1, ["data.decontaminate=drop", "data.order=medlib"], preset="smoke")
    dropped = json.loads((build_mixture(corrected, tmp_path / "c", eval_recipe) / "manifest.json").read_text())
    found = sum(decon["by_eval_set"].values())
    assert dropped["decontamination"]["dropped"] == found and dropped["sizes"]["total"] == 26 - found


# ----------------------------------------------------------------------------- packing


def test_constant_length_packing_joins_with_eos_and_trains_every_token(chatml_tokenizer):
    from medlib.training.tokenize import pack_constant_length

    records = load_source("medqa", "train", hub=True, hub_mirror="samples/hub").records
    rows, report = pack_constant_length(chatml_tokenizer, records, 64, seed=0, mcq_format="authors",
                                        target_style="authors")
    texts = [render_chat(chatml_tokenizer, record_to_messages(r, SYSTEM_PROMPT, "authors", mcq_format="authors"))
             for r in records]
    stream = []
    for text in texts:
        stream += chatml_tokenizer(text)["input_ids"] + [chatml_tokenizer.eos_token_id]
    assert report.tokens == len(stream) and report.rows == len(stream) // 64 == len(rows)
    assert report.tokens_dropped == len(stream) % 64
    assert all(set(row) == {"input_ids"} and len(row["input_ids"]) == 64 for row in rows)  # no mask: loss on all
    # every full 64-token chunk of the EOS-joined stream is a row (shuffled within the buffer)
    chunks = sorted(tuple(stream[i:i + 64]) for i in range(0, len(stream) - 63, 64))
    assert sorted(tuple(r["input_ids"]) for r in rows) == chunks


def test_packing_strategy_needs_loss_on_all():
    from medlib.training.arguments import trainer_settings

    recipe = load_train("paper", 1, ["training.loss_on=assistant"], preset="smoke")
    with pytest.raises(ValueError, match="loss_on: all"):
        trainer_settings(recipe, "hf", [])


# ----------------------------------------------------------------------------- the smoke run


SMOKE_CHANGES = {  # beyond sizes: what a CPU and the offline fixtures force (the preset's header says why)
    "model.name", "model.backend", "data.hub", "data.hub_mirror", "bertscore.model_type", "bertscore.num_layers",
    "report.banner",
}
SIZES = {"model.max_seq_length", "data.sources", "data.replay", "training.max_steps", "training.max_eval_samples",
         "training.logging_steps", "training.eval_steps", "training.save_steps", "mcq.limit", "mcq.batch_size",
         "bertscore.n_queries", "bertscore.generation.max_new_tokens", "generation.max_new_tokens"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("replay",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_smoke_preset_changes_only_sizes_and_what_a_cpu_forces():
    for step in ("stage1", "stage2", "eval", "chat"):
        keys = {item.split("=", 1)[0] for item in preset_overrides("smoke", "paper", step)}
        assert keys <= SIZES | SMOKE_CHANGES, keys - SIZES - SMOKE_CHANGES
        base, smoke = _flat(load_recipe("paper", step).to_dict()), _flat(load_recipe("paper", step, preset="smoke").to_dict())
        moved = {k for k in base if base[k] != smoke.get(k)}
        assert moved <= SIZES | SMOKE_CHANGES, moved
    stage1 = load_train("paper", 1, preset="smoke")  # the authors' fidelity settings are untouched
    assert (stage1.prompt.chat_template, stage1.training.packing_strategy, stage1.training.loss_on,
            stage1.training.gradient_accumulation_steps, stage1.data.order, stage1.seed, stage1.data.seed) == \
        ("chatml", "constant_length", "all", 4, "authors", 0, 42)


SMOKE_ARTIFACTS = [
    "data/stage1/manifest.json", "data/stage2/manifest.json", "med-mix/adapter_model.safetensors",
    "med-mix/run_metadata.json", "med-mix/tokenizer_config.json", "med-mix/loss_curve.png",
    "med-nirvana/adapter_model.safetensors", "med-nirvana/run_metadata.json", "eval/table3.md", "eval/table3.csv",
    "eval/table3_paired.json", "eval/table4.md", "eval/table4.csv", "eval/table4_paired.json", "eval/samples.md",
    "eval/mcq/base/results.json", "eval/mcq/med-mix/results.json", "eval/mcq/med-nirvana/results.json",
    "eval/bertscore/med-nirvana/results.json", "figures/table3_mcq_accuracy.png", "figures/table4_bertscore.png",
    "figures/figure11_loss_stage1_med_mix.png", "figures/figure12_loss_stage2_med_nirvana.png",
    "eval/figures_3_10.md", "eval/bertscore/med-nirvana/paper_samples.jsonl", "chat/transcript.md", "REPORT.md",
] + [f"notebooks/{name}.ipynb" for name in ("00_data_prep", "01_stage1_med_mix", "02_stage2_med_nirvana",
                                             "03_eval_mcq", "04_eval_bertscore", "05_loss_curves", "06_chat")]


@pytest.mark.slow
def test_paper_profile_smoke_run_produces_every_artifact(tmp_path):
    out = tmp_path / "paper-smoke"
    proc = subprocess.run([sys.executable, "-m", "medlib", "reproduce", "--profile", "paper", "--smoke", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = [a for a in SMOKE_ARTIFACTS if not (out / a).exists()]
    assert not missing, missing
    meta = json.loads((out / "med-nirvana/run_metadata.json").read_text())
    assert meta["fidelity"]["chat_template"] == "chatml" and meta["fidelity"]["packing"] == "constant_length"
    assert meta["data"]["train"]["strategy"] == "constant_length" and meta["global_step"] == 3
    assert meta["handoff"] == "requantized_merge" and meta["base_model"] == TINY_LLAMA
    # the authors' handoff: stage 2 trained on the merged Med-Mix in 4-bit, and ships its adapter on exactly that
    assert meta["trained_against"]["model"] == "../med-mix/merged_16bit" and meta["trained_against"]["in_4bit"]
    assert (out / "med-mix/merged_16bit/merged_from.json").exists()
    stage1 = json.loads((out / "med-mix/run_metadata.json").read_text())
    measured = stage1["handoff_measure"]
    assert measured["all"]["matrices"] == 14 and measured["merge_dtype"] == "bfloat16"  # 2 layers x 7 projections
    assert set(measured["validation_loss"]) == {"trained", "requantized_merge", "base"}
    mcq = json.loads((out / "eval/mcq/med-nirvana/results.json").read_text())
    assert mcq["settings"]["parse"] == "authors" and mcq["settings"]["answer_cue"] == "\nAnswer:"
    assert mcq["training_fidelity"]["target_style"] == "authors"
    assert "SMOKE RUN" in (out / "REPORT.md").read_text()
    manifest = json.loads((out / "data/stage1/manifest.json").read_text())
    assert manifest["data_dir"] == "hub mirror samples/hub" and manifest["order"] == "authors"
    assert all(s["origin"].startswith("mirror:") for s in manifest["sources"])
