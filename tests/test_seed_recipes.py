"""The seeds' single-stage chatbots (../shared/reference/seed_*.txt) as recipes on medlib's one training
path: `handoff: from_base` (no stage 1, no replay), a real short CPU run each, served by the chat afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlib import config
from medlib.data.io import write_jsonl
from medlib.models import SMOLLM2_NF4
from test_train import FAST  # the CI-sized training overrides

CHATDOCTOR_INSTRUCTION = "If you are a doctor, please answer the medical questions based on the patient's description."


def test_paper_recipes_name_the_seeds_models_and_data():
    chatdoctor = config.load_train("paper", "chatdoctor")
    assert chatdoctor.model.name == "meta-llama/Llama-2-7b-chat-hf"
    assert chatdoctor.data.sources[0].source == "healthcaremagic"
    assert chatdoctor.handoff == "from_base" and chatdoctor.data.replay is None and not chatdoctor.uses_stage1
    from medlib.data.sources import get_source

    assert get_source("healthcaremagic").hub_id == "lavita/ChatDoctor-HealthCareMagic-100k"
    llama3 = config.load_train("paper", "llama3_chatbot")
    assert llama3.model.name == "meta-llama/Meta-Llama-3-8B-Instruct" and llama3.model.load_in_4bit
    assert llama3.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")   # attention projections
    assert llama3.training.gradient_accumulation_steps > 1


def test_chatdoctor_instruction_is_the_one_its_data_carries(data_dir):
    rows = json.loads((data_dir / "chatdoctor" / "genmedgpt_5k.json").read_text())
    assert {r["instruction"] for r in rows} == {CHATDOCTOR_INSTRUCTION}
    assert config.load_train("local", "chatdoctor").prompt.system_prompt == CHATDOCTOR_INSTRUCTION


@pytest.fixture(scope="module")
def dialogue_mixture(tmp_path_factory, data_dir):
    from medlib.data.loaders import load_source

    records = load_source("genmedgpt", "train_standin", data_dir).records
    records = sorted(records, key=lambda r: sum(len(m["content"]) for m in r["messages"]))[:12]
    folder = tmp_path_factory.mktemp("seedmix")
    write_jsonl(folder / "train.jsonl", records[:8])
    write_jsonl(folder / "validation.jsonl", records[8:12])
    (folder / "manifest.json").write_text(json.dumps({"counts": {"train": 8, "validation": 4}}))
    return folder


def _run(name: str, mixture: Path, out: Path, *extra: str) -> Path:
    from medlib.training import train

    return train(config.load_train("local", name, [*FAST, *extra]), out, mixture)


def test_chatdoctor_trains_from_the_base_model_and_chats_with_its_own_prompt(tmp_path, dialogue_mixture):
    run_dir = _run("chatdoctor", dialogue_mixture, tmp_path / "chatdoctor")
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["handoff"] == "from_base" and meta["from_stage1"] is None and meta["base_model"] == SMOLLM2_NF4
    assert meta["system_prompt"] == CHATDOCTOR_INSTRUCTION and "<|im_start|>" in meta["chat_template"]
    losses = [e["loss"] for e in json.loads((run_dir / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) == 6 and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["base_model_name_or_path"] == SMOLLM2_NF4   # one stage: no combined r = 32

    from medlib.training.card import model_card

    card = model_card(run_dir)
    assert "# ChatDoctor (single stage, profile `local`)" in card and "LoRA adapter, r = 16" in card and "ChatDoctor-style" in card
    assert "stage-1 adapter" not in card

    from medlib.chat.session import ChatSession

    session = ChatSession.from_profile("local", adapter=run_dir, overrides=["generation.max_new_tokens=4"])
    assert session.system_prompt == CHATDOCTOR_INSTRUCTION       # read from the run folder
    assert session.reply("I have had a sore throat for two days").kind == "medical"
    assert session.reply("crushing chest pain and I cannot breathe").kind == "urgent"


def test_llama3_chatbot_accumulates_gradients_on_attention_projections(tmp_path, dialogue_mixture):
    run_dir = _run("llama3_chatbot", dialogue_mixture, tmp_path / "llama3", "training.max_steps=2",
                   "training.eval_steps=2", "training.save_steps=2")
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    assert meta["handoff"] == "from_base" and meta["global_step"] == 2
    resolved = config.load_yaml(run_dir / "recipe.resolved.yaml")
    assert resolved["training"]["gradient_accumulation_steps"] == 4
    assert resolved["training"]["per_device_train_batch_size"] == 1
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
