"""`medlib train`: masking, real short QLoRA runs on CPU (SmolLM2-135M, NF4), reload, stage 2, resume, errors.

Runs use the local recipes with CI-sized overrides (a few steps, short sequences, tiny eval) on small
mixtures cut from the real published files in ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlib.config import RecipeError
from medlib.data.io import write_jsonl
from medlib.models import SMOLLM2, SMOLLM2_NF4

# CI-sized: short sequences, few steps, a tiny eval. lr is raised so that 6 steps visibly learn.
FAST = [
    "model.max_seq_length=160", "training.max_steps=6", "training.warmup_steps=1", "training.logging_steps=1",
    "training.eval_steps=3", "training.save_steps=3", "training.max_eval_samples=4",
    "training.per_device_eval_batch_size=4", "training.learning_rate=1e-3",
]


def _write_mixture(folder: Path, train: list[dict], validation: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", validation)
    (folder / "manifest.json").write_text(json.dumps({"counts": {"train": len(train), "validation": len(validation)},
                                                      "note": "test fixture cut from ../shared/data"}))
    return folder


@pytest.fixture(scope="module")
def mcq_records(data_dir):
    from medlib.data.loaders import load_source

    records = load_source("medmcqa", "validation", data_dir).records
    # the shortest questions keep CPU steps quick; sorted by id first so the pick is stable
    records = sorted(sorted(records, key=lambda r: r["id"]), key=lambda r: len(r["question"]) + sum(map(len, r["options"].values())))
    return records[:24]


@pytest.fixture(scope="module")
def dialogue_records(data_dir):
    from medlib.data.loaders import load_source

    return load_source("genmedgpt", "train_standin", data_dir).records[:10]


@pytest.fixture(scope="module")
def stage1_mixture(tmp_path_factory, mcq_records):
    # 8 training rows at batch 4: 6 steps are 3 passes, so the training loss must come down
    return _write_mixture(tmp_path_factory.mktemp("mix1"), mcq_records[:8], mcq_records[20:24])


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from medlib.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def _recipe(stage: int, *extra: str):
    from medlib.config import load_train

    return load_train("local", stage, [*FAST, *extra])


PROBE = "<|im_start|>user\nWhich vitamin deficiency causes scurvy?<|im_end|>\n<|im_start|>assistant\n"


def _probe_logits(model, tokenizer):
    import torch

    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**ids).logits.float().clone()
    model.train(was_training)
    return logits


def _q_proj_weight(model):
    """Layer 0's q_proj base weight (de-quantised from NF4 when quantised), under any peft wrapping."""
    import bitsandbytes.functional as bnbf

    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
    weight = getattr(layer, "base_layer", layer).weight
    if getattr(weight, "quant_state", None) is not None:
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float().clone()


class ProbeCallback:
    """Probe logits at train begin and end, and the labels of the first training batch."""

    def __new__(cls, tokenizer):
        from transformers import TrainerCallback

        class _Probe(TrainerCallback):
            def __init__(self):
                self.begin = self.end = self.first_labels = None

            def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
                self.begin = _probe_logits(model, tokenizer)
                self.q_proj_begin = _q_proj_weight(model)
                self.first_labels = next(iter(train_dataloader))["labels"]

            def on_train_end(self, args, state, control, model=None, **kw):
                self.end = _probe_logits(model, tokenizer)

        return _Probe()


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, stage1_mixture, tokenizer):
    from medlib.training import train

    probe = ProbeCallback(tokenizer)
    run_dir = train(_recipe(1), tmp_path_factory.mktemp("runs") / "med-mix", stage1_mixture, callbacks=[probe])
    return run_dir, probe


# ------------------------------------------------------------------------------------------ masking


def test_mcq_prompt_tokens_are_masked(tokenizer, mcq_records):
    from medlib.prompts import record_to_messages
    from medlib.training.tokenize import tokenize_messages

    record = mcq_records[0]
    row = tokenize_messages(tokenizer, record_to_messages(record))
    trained = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
    prompt = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if not m]
    assert tokenizer.decode(trained) == f"{record['answer']}<|im_end|>\n"  # the answer and the stop token only
    assert record["question"].strip()[:30] in tokenizer.decode(prompt)
    assert len(row["input_ids"]) == len(row["assistant_masks"]) > 20


def test_every_assistant_turn_of_a_dialogue_is_trained_and_nothing_else(tokenizer):
    from medlib.prompts import record_to_messages
    from medlib.training.tokenize import tokenize_messages

    record = {"id": "d1", "source": "test", "messages": [
        {"role": "user", "content": "I have had a headache for three days."},
        {"role": "assistant", "content": "Any fever or stiff neck?"},
        {"role": "user", "content": "No fever, but light hurts my eyes."},
        {"role": "assistant", "content": "That can be a migraine; see a doctor if it persists."},
    ]}
    row = tokenize_messages(tokenizer, record_to_messages(record))
    trained = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
    assert trained == ("Any fever or stiff neck?<|im_end|>\n"
                       "That can be a migraine; see a doctor if it persists.<|im_end|>\n")
    assert "headache" not in trained and "light hurts" not in trained


def test_truncation_that_cuts_the_answer_drops_and_reports(tokenizer, mcq_records):
    from medlib.training.tokenize import tokenize_records

    rows, report = tokenize_records(tokenizer, mcq_records[:3], max_seq_length=20)
    assert rows == [] and report.truncated == 3
    assert report.as_dict()["dropped_no_target_after_truncation"] == 3
    assert report.dropped_no_target == [r["id"] for r in mcq_records[:3]]


def test_long_mcq_records_lose_context_not_their_answer(tokenizer, data_dir):
    from medlib.data.loaders import load_source
    from medlib.prompts import TRUNCATION_MARK, record_to_messages
    from medlib.training.tokenize import tokenize_records

    records = load_source("pubmedqa", "pqa_labeled", data_dir).records[:12]  # abstracts of 250-600 tokens
    max_len = 192
    rows, report = tokenize_records(tokenizer, records, max_seq_length=max_len)
    assert report.dropped_no_target == [] and report.kept == len(records) == len(rows)  # nothing dropped
    assert report.cut_to_fit.get("context", 0) >= 6 and report.truncated == 0
    assert report.as_dict()["cut_to_fit"] == report.cut_to_fit
    for row, record in zip(rows, records):
        assert len(row["input_ids"]) <= max_len and sum(row["assistant_masks"]) >= 1
        text = tokenizer.decode(row["input_ids"])
        assert record["question"].strip() in text and "C. maybe" in text  # question and options kept
        answer = record_to_messages(record)[-1]["content"]
        assert tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]).startswith(answer)
        if TRUNCATION_MARK in text:  # the cut context keeps its end (the results)
            assert record["context"].strip()[-40:] in text


# ----------------------------------------------------------------------------------------- stage 1


@pytest.mark.slow
def test_stage1_run_lowers_loss_and_writes_its_outputs(stage1_run):
    run_dir, probe = stage1_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.resolved.yaml",
                 "log_history.json", "log_history.csv", "run_metadata.json"):
        assert (run_dir / name).exists(), name
    history = json.loads((run_dir / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 6
    # 8 rows, batch 4: steps 1-2 are the first pass, 5-6 the third one over the same rows
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) == 2
    header = (run_dir / "log_history.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss,eval_loss,learning_rate"
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["profile"] == "local" and "not the paper" in meta["profile_note"].lower()
    assert meta["backend"] == "hf" and meta["base_model"] == SMOLLM2_NF4 and meta["global_step"] == 6
    assert any("adamw_8bit -> adamw_torch" in f for f in meta["fallbacks"])
    assert meta["tokens_seen"] > 0 and meta["memory"]["peak_rss_mb"] > 0 and len(meta["data"]["manifest_sha256"]) == 64
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(meta["libraries"])
    # prompt tokens never reach the loss: an MCQ row trains on the letter and the end-of-turn tokens only
    labels = probe.first_labels  # one padding-free row holding the step's 4 samples (local recipe)
    assert (labels != -100).sum() <= 4 * 4 and (labels == -100).float().mean() > 0.9


@pytest.mark.slow
def test_adapter_reloads_with_the_logits_of_the_end_of_training(stage1_run):
    import torch

    from medlib.models import load_for_inference
    from medlib.models import keep_4bit_cpu_numerics

    run_dir, probe = stage1_run
    model, tokenizer = load_for_inference(SMOLLM2_NF4, adapter=run_dir, load_in_4bit=True)
    keep_4bit_cpu_numerics(model)  # the float32 NF4 path training used (see its docstring)
    reloaded = _probe_logits(model, tokenizer)
    torch.testing.assert_close(reloaded, probe.end, atol=1e-4, rtol=1e-4)
    assert (probe.end - probe.begin).abs().max() > 1e-2  # training did change the model


# ----------------------------------------------------------------------------------------- stage 2


class ModelAtEnd:
    """Keeps the model a run trained, as it is at the end of training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _End(TrainerCallback):
            model = None

            def on_train_end(self, args, state, control, model=None, **kw):
                self.model = model

        return _End()


def _nf4(weight):
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state).float()


@pytest.fixture(scope="module")
def stage2_mixture(tmp_path_factory, mcq_records, dialogue_records):
    return _write_mixture(tmp_path_factory.mktemp("mix2"), dialogue_records[:6] + mcq_records[8:10], dialogue_records[6:8])


@pytest.mark.slow
@pytest.mark.parametrize("handoff", ["requantized_merge", "stacked", "continue"])
def test_every_handoff_ships_the_model_its_stage_2_trained(handoff, tmp_path, stage1_run, stage2_mixture, tokenizer):
    """Evaluation, chat, serve and export load a run with medlib.runs.load_run: in float (weights de-quantised
    exactly, adapter merged) and in 4-bit, that is the model stage 2 ended with, whatever the handoff."""
    import torch

    from medlib.runs import load_run
    from medlib.training import train

    stage1_dir, _ = stage1_run
    probe, end = ProbeCallback(tokenizer), ModelAtEnd()
    run_dir = train(_recipe(2, "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2",
                            f"handoff={handoff}"), tmp_path / "med-nirvana", stage2_mixture, stage1_dir,
                    callbacks=[probe, end])
    trained = _probe_logits(end.model, tokenizer)
    for in_4bit in (False, True):
        model, _ = load_run("ignored: the run names its weights", run_dir, load_in_4bit=in_4bit, dtype="float32")
        torch.testing.assert_close(_probe_logits(model, tokenizer), trained, atol=5e-4, rtol=1e-4)

    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["handoff"] == handoff and meta["from_stage1"] == str(stage1_dir) and meta["global_step"] == 2
    assert meta["fidelity"]["stage1_handoff"] == handoff
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    from medlib.training.card import model_card

    card = model_card(run_dir)
    assert f"handoff: {handoff}" in card
    # stage 2 started from base + Med-Mix, not from the base
    base, _ = load_run(SMOLLM2_NF4, None, load_in_4bit=True)
    assert (probe.begin - _probe_logits(base, tokenizer)).abs().max() > 1e-2
    if handoff == "requantized_merge":
        # the authors': the frozen weights are exactly NF4(bf16(W' + ΔW1)), and the run ships its adapter on them
        merged = stage1_dir / "merged_16bit"
        against = meta["trained_against"]
        assert (run_dir / against["model"]).resolve() == merged.resolve() and against["in_4bit"]
        assert against["merged_from"] == json.loads((merged / "merged_from.json").read_text())
        assert against["merged_from"]["dtype"] == "bfloat16" and against["merged_from"]["base_in_4bit"]
        assert cfg["r"] == 16 and cfg["base_model_name_or_path"] == against["model"]
        stage1_float, _ = load_run(SMOLLM2_NF4, stage1_dir, load_in_4bit=False, dtype="float32")
        expected = _nf4(_q_proj_weight(stage1_float).to(torch.bfloat16).float())
        torch.testing.assert_close(probe.q_proj_begin, expected, atol=0, rtol=0)
        assert (probe.q_proj_begin != _q_proj_weight(base)).sum() > 0
    else:
        # stacked and continue sit on the original 4-bit base, its weights untouched
        assert meta["trained_against"] == {"model": SMOLLM2_NF4, "in_4bit": True}
        torch.testing.assert_close(probe.q_proj_begin, _q_proj_weight(base), atol=0, rtol=0)
        assert cfg["base_model_name_or_path"] == SMOLLM2_NF4
    if handoff == "stacked":
        # the frozen stage-1 LoRA and the fresh one ship as one adapter of rank 16 + 16 on the original base
        assert cfg["r"] == 32 and meta["adapter"]["combined_stages"] and meta["adapter"]["trained_r"] == 16
        assert "r = 32 (stage 1 r = 16 + stage 2 r = 16" in card
        from safetensors.torch import load_file

        shipped, stage1 = load_file(str(run_dir / "adapter_model.safetensors")), load_file(str(stage1_dir / "adapter_model.safetensors"))
        key = next(k for k in stage1 if "lora_A" in k)
        torch.testing.assert_close(shipped[key][:16], stage1[key], atol=0, rtol=0)  # stage 1 did not move


@pytest.mark.slow
def test_authors_prompt_and_target_train_and_are_what_evaluation_reads(tmp_path, stage1_mixture, tokenizer):
    """prompt.mcq_format / target_style = authors: the model learns "Answer: B) text" after their user turn,
    the run folder records both, and evaluation renders questions the way the run was trained."""
    from medlib.config import load_eval
    from medlib.evaluate.common import EvaluatedModel
    from medlib.evaluate.mcq import encode_prompt
    from medlib.training import train
    from medlib.training.tokenize import tokenize_records

    records = json.loads("[" + ",".join((stage1_mixture / "train.jsonl").read_text().split("\n")[:2]) + "]")
    rows, _ = tokenize_records(tokenizer, records, 400, target_style="authors", mcq_format="authors")
    trained = tokenizer.decode([t for t, m in zip(rows[0]["input_ids"], rows[0]["assistant_masks"]) if m])
    record = records[0]
    assert trained.startswith(f"Answer: {record['answer']}) {record['options'][record['answer']]}"), trained
    run_dir = train(_recipe(1, "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2",
                            "prompt.target_style=authors", "prompt.mcq_format=authors"), tmp_path / "authors", stage1_mixture)
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["target_style"] == "authors" and meta["mcq_format"] == "authors" and meta["global_step"] == 2
    evaluated = EvaluatedModel.of(load_eval("local"), run_dir)
    assert evaluated.mcq_format == "authors"
    text = tokenizer.decode(encode_prompt(tokenizer, record, evaluated.system_prompt, 512, "\nAnswer:", evaluated.mcq_format)[0])
    assert "Options:\nA) " in text and "Answer with the letter" not in text and "Answer:<|im_end|>" in text


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
class Killed(RuntimeError):
    pass


def kill_after_first_checkpoint():
    """A trainer callback that stops the run like a lost Colab session, right after the first checkpoint."""
    from transformers import TrainerCallback

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed(f"killed after saving step {state.global_step}")

    return KillAfterFirstCheckpoint()


def test_killed_run_resumes_from_its_checkpoint_to_the_same_step_count(tmp_path, stage1_mixture):
    from medlib.training import TrainError, train

    recipe = _recipe(1, "training.max_steps=4", "training.save_steps=2", "training.eval_steps=2")
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(recipe, out, stage1_mixture, callbacks=[kill_after_first_checkpoint()])
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    with pytest.raises(TrainError, match="--resume"):
        train(recipe, out, stage1_mixture)  # never silently overwrites a run

    train(recipe, out, stage1_mixture, resume=True)
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["global_step"] == 4 and meta["resumed_from"].endswith("checkpoint-2")
    steps = [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- errors


def test_errors_before_heavy_work(tmp_path, monkeypatch, stage1_mixture):
    import medlib.training.backends as backends
    from medlib.models import ModelNotFoundError
    from medlib.config import load_train
    from medlib.data.validate import DataError
    from medlib.runs import Layout
    from medlib.training.run import train_run
    from medlib.training import TrainError, train

    monkeypatch.setattr(backends, "load_for_training", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(RecipeError, match="lora.rank"):
        load_train("local", 1, ["lora.rank=8"])
    with pytest.raises(RecipeError, match=r"local/stage1.yaml: training.max_steps must be an integer, got 'ten'"):
        load_train("local", 1, ["training.max_steps=ten"])
    with pytest.raises(RecipeError, match=r"Literal|one of 'auto', 'unsloth', 'hf', got 'gpu'"):
        load_train("local", 1, ["model.backend=gpu"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_run(_recipe(1, f"data.data_dir={tmp_path / 'nodata'}"), Layout("local", tmp_path / "a"))
    empty = _write_mixture(tmp_path / "empty", [], [])
    with pytest.raises(DataError, match="empty"):
        train(_recipe(1), tmp_path / "b", empty)
    bad = _write_mixture(tmp_path / "bad", [{"id": "x1", "source": "t", "question": "q?", "context": "",
                                             "options": {"A": "a", "B": "b"}, "answer": "Z"}], [])
    with pytest.raises(DataError, match=r"train.jsonl: line 1 \(id 'x1'\)"):
        train(_recipe(1), tmp_path / "c", bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="could not be loaded"):
        train(_recipe(1, "model.name=nobody/no-such-model"), tmp_path / "d", stage1_mixture)
    with pytest.raises(TrainError, match="stage 2 needs a finished stage-1 run"):
        train(_recipe(2), tmp_path / "e", stage1_mixture, tmp_path / "no-stage1")


def test_cli_refuses_push_without_token_before_training(monkeypatch, capsys):
    from medlib.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["train", "--stage", "1", "--push-to-hub", "me/med-mix"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- model card


@pytest.mark.slow
def test_model_card_and_offline_push(stage1_run, monkeypatch):
    from medlib.training.card import PushError, model_card, push_to_hub

    run_dir, _ = stage1_run
    card = model_card(run_dir)
    for needle in (SMOLLM2_NF4, "learning_rate | 0.001", "lora_r | 16", "train: 8 records", "Intended use",
                   "Limitations", "Medical disclaimer", "not the paper's model, data or numbers", "No evaluation results"):
        assert needle in card, needle
    (run_dir / "eval_results.json").write_text(json.dumps({"medqa": {"accuracy": 0.31}}))
    assert '"accuracy": 0.31' in model_card(run_dir)
    (run_dir / "eval_results.json").unlink()

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PushError, match="HF_TOKEN"):
        push_to_hub(run_dir, "me/med-mix")
    secret = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="offline") as info:
        push_to_hub(run_dir, "me/med-mix")
    assert secret not in str(info.value)
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path


def _labelled_examples(tokenizer, records: list[dict]) -> list[dict]:
    """Records as the trainer's collator receives them: input ids, and labels -100 outside the answers."""
    from medlib.training.tokenize import tokenize_records

    rows, _ = tokenize_records(tokenizer, records, 160)
    return [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]}
            for r in rows]


def test_padding_free_batches_give_the_padded_loss(tokenizer, mcq_records, dialogue_records):
    """The padding-free collator (recipe `padding_free` / `packing`) must not let samples attend to each other."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medlib.models import load_hf_model

    examples = _labelled_examples(tokenizer, [*mcq_records[:2], *dialogue_records[:2]])
    model = load_hf_model(SMOLLM2, load_in_4bit=False)
    model.config.use_cache = False  # as medlib.training.backends sets it for training
    losses = []
    with torch.no_grad():
        for padding_free in (False, True):
            batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(examples)
            inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids") if k in batch}
            losses.append(model(**inputs).loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_lm_head_on_labelled_positions_gives_the_same_loss_and_gradients(tokenizer, mcq_records, monkeypatch):
    """On CPU TRL's fused LM head projects every position; medlib's switch projects only the labelled ones
    (an MCQ answer: a few tokens per sample). The loss, its gradients and the logged entropy must not move."""
    import contextlib

    import torch
    from trl.trainer import utils as trl_utils
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medlib.models import load_hf_model
    from medlib.training.backends import lm_head_on_labelled_positions

    examples = _labelled_examples(tokenizer, mcq_records[:3])
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    model = load_hf_model(SMOLLM2, load_in_4bit=False)
    model.config.use_cache = False
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    projected_rows = []
    project = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        staticmethod(lambda hidden, *rest: projected_rows.append(hidden.shape[0]) or project(hidden, *rest)))
    decides = trl_utils._use_triton
    results = {}
    for labelled_only in (False, True):
        model.zero_grad()
        with (lm_head_on_labelled_positions() if labelled_only else contextlib.nullcontext(False)) as applied:
            out = model(**inputs, fused_lm_head=True)
            out.loss.backward()
        assert applied is labelled_only
        results[labelled_only] = (out.loss.item(), out.entropy.sum().item(), model.model.norm.weight.grad.clone(),
                                  model.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert trl_utils._use_triton is decides  # restored on exit
    labelled = int((inputs["labels"][:, 1:] != -100).sum())
    assert projected_rows == [inputs["input_ids"].shape[1] - 1, labelled]
    assert labelled < inputs["input_ids"].shape[1] / 10  # an answer letter + end token per sample
    (loss_all, entropy_all, *grads_all), (loss_labelled, entropy_labelled, *grads_labelled) = results[False], results[True]
    assert loss_labelled == pytest.approx(loss_all, rel=1e-5)
    assert entropy_labelled == pytest.approx(entropy_all, rel=1e-4)
    for grad_all, grad_labelled in zip(grads_all, grads_labelled):
        assert torch.allclose(grad_labelled, grad_all, rtol=1e-3, atol=1e-6)


def test_one_sample_per_micro_batch_trains_as_the_batch_of_four(tmp_path, stage1_mixture):
    """The local recipes take their batch of 4 one sample at a time (1 x 4 accumulation) to cut peak memory;
    the loss, hence the training, must be the batch of 4's."""
    from medlib.training import train

    losses = {}
    for batch in ("4", "1"):
        run_dir = train(_recipe(1, "training.max_steps=3", f"training.per_device_train_batch_size={batch}",
                                f"training.gradient_accumulation_steps={4 // int(batch)}", "training.max_eval_samples=0"),
                        tmp_path / batch, stage1_mixture)
        history = json.loads((run_dir / "log_history.json").read_text())
        losses[batch] = [row["loss"] for row in history if "loss" in row]
    assert len(losses["1"]) == 3
    assert losses["1"] == pytest.approx(losses["4"], rel=1e-4)


def test_a_4bit_load_on_cpu_lets_go_of_the_checkpoint_file(smollm2_dir):
    """The NF4 model keeps ~290 MB of tensors, but views onto the mapped safetensors file kept all 538 MB of it
    resident; medlib copies those views. Same logits, file no longer mapped (own process: other tests' float
    models may map it)."""
    import subprocess
    import sys

    script = f"""
import torch
from transformers import AutoModelForCausalLM
from medlib.models import SMOLLM2, bnb_config, load_hf_model
checkpoint = {str(smollm2_dir / "model.safetensors")!r}
ids = torch.tensor([[1, 504, 3458, 282, 4018, 30]])
kept = load_hf_model(SMOLLM2, load_in_4bit=True, dtype=torch.float32)
mapped = checkpoint in open("/proc/self/maps").read()
with torch.no_grad():
    ours = kept(ids).logits
    del kept
    plain_model = AutoModelForCausalLM.from_pretrained({str(smollm2_dir)!r}, dtype=torch.float32,
                                                       quantization_config=bnb_config(torch.float32))
    plain = plain_model(ids).logits
print(mapped, checkpoint in open("/proc/self/maps").read(), torch.equal(ours, plain))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["False", "True", "True"]


# ------------------------------------------------------------------------------- notebooks' re-runs


def test_notebook_reruns_resume_keep_refuse_and_overwrite_as_they_say(tmp_path, stage1_mixture):
    from medlib.training import TrainError, plan_run, train, train_or_resume

    out = tmp_path / "med-mix"
    recipe = _recipe(1, "training.max_steps=4", "training.save_steps=2", "training.eval_steps=2")
    said: list[str] = []
    assert plan_run(recipe, out, stage1_mixture)[0] == "train"
    with pytest.raises(Killed):  # a Colab disconnect after the first checkpoint
        train(recipe, out, stage1_mixture, callbacks=[kill_after_first_checkpoint()])
    with pytest.raises(TrainError, match="resume=True .* overwrite=True"):
        plan_run(recipe, out, stage1_mixture, resume=False)
    train_or_resume(recipe, out, stage1_mixture, say=said.append)  # the default: continue from the checkpoint
    assert "resuming from" in said[-1] and said[-1].endswith("checkpoint-2")
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["status"] == "finished" and meta["global_step"] == 4 and meta["resumed_from"].endswith("checkpoint-2")
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())

    train_or_resume(recipe, out, stage1_mixture, say=said.append)  # the same settings again: kept, nothing trained
    assert "kept" in said[-1] and sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    changed = _recipe(1, "training.max_steps=5", "training.save_steps=2", "training.eval_steps=2")
    with pytest.raises(TrainError, match=r"other settings or inputs \(differs in: training\).*overwrite=True"):
        train_or_resume(changed, out, stage1_mixture, say=said.append)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints  # still nothing deleted
    saved = out / "recipe.resolved.yaml"
    written = saved.read_text()
    saved.write_text(written.replace("_from:", "_meta:"))  # as an older medlib wrote it
    with pytest.raises(TrainError, match=r"differs in: its recipe \(.*unknown key '_meta'.*another medlib version"):
        train_or_resume(recipe, out, stage1_mixture, say=said.append)
    saved.write_text(written)

    train_or_resume(changed, out, stage1_mixture, overwrite=True, say=said.append)
    assert "deleting the run" in said[-1]
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["global_step"] == 5 and meta["resumed_from"] is None


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("capability,name,expected", [((7, 5), "Tesla T4", "fp16"), ((7, 0), "Tesla V100", "fp16"),
                                                      ((8, 0), "A100", "bf16"), ((9, 0), "H100", "bf16")])
def test_precision_follows_the_gpus_real_capability(monkeypatch, capability, name, expected):
    import torch

    from medlib import models
    from medlib.training import arguments

    monkeypatch.setattr(models, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports (emulated)
    mode, why = models.training_precision("auto")
    assert mode == expected and name in why and f"{capability[0]}.{capability[1]}" in why
    monkeypatch.setattr(arguments, "cuda_available", lambda: True)
    settings, precision = arguments.trainer_settings(_recipe(1), "hf", [])
    assert (settings["fp16"], settings["bf16"]) == (expected == "fp16", expected == "bf16")
    assert precision["mode"] == expected
    assert models.training_precision("fp16")[0] == "fp16"  # forcing fp16 works anywhere (the H100 check)
    if capability < (8, 0):
        with pytest.raises(ValueError, match="bf16 needs compute capability 8.0"):
            models.training_precision("bf16")
    from medlib.models import resolve_dtype

    assert resolve_dtype("auto") == {"fp16": "float16", "bf16": "bfloat16"}[expected]


def test_precision_on_cpu_is_fp32_and_gpu_modes_are_refused():
    from medlib.models import training_precision

    assert training_precision("auto")[0] == "fp32"
    for mode in ("bf16", "fp16"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            training_precision(mode)
    with pytest.raises(ValueError, match="must be one of"):
        training_precision("half")


def test_run_metadata_records_the_precision(stage1_run):
    run_dir, _ = stage1_run
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["precision"]["mode"] == "fp32" and "no CUDA" in meta["precision"]["reason"]
    assert meta["training_args"]["fp16"] is False and meta["training_args"]["bf16"] is False


def test_unsloths_refusal_of_an_nf4_base_falls_back_to_the_exact_merge(stage1_run, tmp_path, monkeypatch):
    """Unsloth 2026.10.9 merges into the 16-bit original of a Hub -bnb-4bit name and refuses a local NF4 checkpoint
    (seen on an H200, 2026-11-26); the merge then runs as the hf backend's, and the record says which ran."""
    import sys
    import types

    import torch
    from safetensors.torch import load_file

    from medlib.runs import MERGED_RECORD, RunRecord, write_merged

    class Refusing:
        def save_pretrained_merged(self, *args, **kwargs):
            raise RuntimeError("Unsloth: base model should be a 16bit or mxfp4 base model for a 16bit merge, but it is nf4.")

    fake = types.SimpleNamespace(FastLanguageModel=types.SimpleNamespace(from_pretrained=lambda **kw: (Refusing(), None)))
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    record = RunRecord.read(stage1_run[0])
    args = (record.weights_base, record.folder)
    by_unsloth = write_merged(*args, tmp_path / "unsloth", "unsloth", torch.bfloat16, True, tokenizer_dir=record.folder)
    by_hf = write_merged(*args, tmp_path / "hf", "hf", torch.bfloat16, True, tokenizer_dir=record.folder)
    assert json.loads((by_unsloth / MERGED_RECORD).read_text())["backend"].startswith("hf (unsloth refused")
    assert json.loads((by_hf / MERGED_RECORD).read_text())["backend"] == "hf"
    a, b = load_file(str(by_unsloth / "model.safetensors")), load_file(str(by_hf / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    class Broken:
        def save_pretrained_merged(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(fake.FastLanguageModel, "from_pretrained", lambda **kw: (Broken(), None))
    with pytest.raises(RuntimeError, match="out of memory"):   # any other failure is not papered over
        write_merged(*args, tmp_path / "broken", "unsloth", torch.bfloat16, True, tokenizer_dir=record.folder)
