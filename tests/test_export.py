"""`medlib export gguf` on CPU: a real adapter merged, converted by llama.cpp's own converter (from the
pinned llama-cpp-python source package), loaded back and compared with the merged model."""

from __future__ import annotations

import json
import re

import pytest

from medlib.export import OLLAMA_TEMPLATES, chat_format, export_gguf


def render_ollama(template: str, system: str, messages: list[tuple[str, str]]) -> str:
    """Our two templates' shape, rendered the way Ollama's Go template engine would."""
    found = re.fullmatch(r"\{\{- if \.System \}\}(.*?)\{\{ end \}\}\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)",
                         template, re.S)
    assert found, template
    head, each, tail = found.groups()
    body = "".join(each.replace("{{ .Role }}", role).replace("{{ .Content }}", text) for role, text in messages)
    return head.replace("{{ .System }}", system) + body + tail


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, smollm2_dir):
    """A LoRA adapter with non-zero weights (B is random, not zero), so merging it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    target = tmp_path_factory.mktemp("adapter") / "med-nirvana" / "adapter"
    model.save_pretrained(target)
    return target


def test_export_gguf_merges_converts_and_agrees_with_the_merged_model(trained_adapter, tmp_path, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    report = export_gguf("local", adapter=trained_adapter, out=out, outtype="q8_0", keep_merged=True)
    gguf = out / report["gguf"]
    assert report["gguf"] == "medlib-local-med-nirvana-q8_0.gguf" and gguf.stat().st_size == report["size_bytes"]
    assert 100 * 2**20 < report["size_bytes"] < 200 * 2**20        # 135M parameters at ~8.5 bits
    assert json.loads((out / "export_report.json").read_text()) == report
    v = report["verification"]
    assert v["top1_agreement"] == "4/4" and v["tokenizer_agreement"] == "4/4"
    assert v["max_relative_l2"] < 0.1                              # q8_0 rounding, not a different model

    # The adapter is in the GGUF: it is far from the base model, and close to base + adapter merged.
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("What are the common symptoms of type 2 diabetes?", return_tensors="pt")
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)(**ids).logits[0, -1]
        exported = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name,
                                                        dtype=torch.float32)(**ids).logits[0, -1]
    to_base = float((exported - base).norm() / base.norm())
    assert to_base > 3 * v["prompts"][0]["relative_l2"], (to_base, v["prompts"][0])

    # The Modelfile carries the training chat template and system prompt: rendered as Ollama would,
    # it gives exactly the prompt medlib's own template gives.
    from medlib.prompts import SYSTEM_PROMPT, render_chat

    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{gguf.name}" in modelfile
    system = SYSTEM_PROMPT  # the exported base model: the default training prompt
    assert f'SYSTEM """{system}"""' in modelfile
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    assert chat_format(tok) == "chatml" and template == OLLAMA_TEMPLATES["chatml"][0]
    question = "I have a rash on my arm."
    expected = render_chat(tok, [{"role": "system", "content": system}, {"role": "user", "content": question}],
                           add_generation_prompt=True)
    assert render_ollama(template, system, [("user", question)]) == expected


def test_export_refuses_a_missing_adapter(tmp_path):
    from medlib.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-run"):
        export_gguf("local", adapter=tmp_path / "no-such-run", out=tmp_path / "out")
