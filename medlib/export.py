"""`medlib export gguf`: the chatbot for offline use (llama.cpp, Ollama, LM Studio), on a CPU.

    medlib export gguf --profile local [--adapter DIR] [--outtype q8_0] [--out DIR]

Steps, each written to the output folder:
1. merge: base model + adapter (the profile's Med-Nirvana by default) merged into one float
   safetensors model (`merged/`): the adapter on exactly the weights it trained against;
2. convert: llama.cpp's own `convert_hf_to_gguf.py`, taken from the pinned llama-cpp-python
   source package (downloaded from PyPI once, never compiled) -> `<name>-<outtype>.gguf`;
3. verify: the GGUF loaded back with transformers (`gguf_file=`) against the merged model on fixed
   prompts: next-token logits (max |diff|, relative L2) and top-1 agreement -> `export_report.json`;
4. `Modelfile` for Ollama with the chat template the model was trained with and its system prompt.

On a GPU the unsloth backend's own GGUF path stays available at training time (`export_gguf` in
the stage recipes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Sequence

from medlib.chat.session import find_adapter, model_and_prompt
from medlib.config import load_chat
from medlib.models import ModelNotFoundError, load_tokenizer
from medlib.paths import cache_dir
from medlib.runs import layout, load_run

log = logging.getLogger(__name__)

# Its source package carries llama.cpp's converter (vendor/llama.cpp); we never build the package.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
VERIFY_PROMPTS = (
    "What are the common symptoms of type 2 diabetes?",
    "I have had a dry cough and a mild fever for three days.",
    "Which vitamin deficiency causes scurvy?",
    "The patient was given 500 mg of amoxicillin",
)


class ExportError(Exception):
    """An export step failed; the message names the step and the file."""


def llama_cpp_converter(cache: Path | None = None) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py, its conversion/ package and gguf-py/,
    extracted once from llama-cpp-python's pinned source package on PyPI."""
    target = (cache or cache_dir()) / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    if all((target / part).exists() for part in CONVERTER_PARTS):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               "-d", tmp, spec], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ExportError(f"could not download the {spec} source package from PyPI (it carries llama.cpp's "
                              f"GGUF converter): {done.stderr.strip()[-500:]}")
        prefix = f"{archives[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        missing = [part for part in CONVERTER_PARTS if not (staging / part).exists()]
        if missing:
            raise ExportError(f"{archives[0].name} has no vendor/llama.cpp/{', '.join(missing)}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return target


def merge(base: str, adapter_dir: Path | None, target: Path) -> Path:
    """The model that trained (the adapter on exactly the weights it trained against, NF4 de-quantised
    exactly) as one float32 safetensors folder; the base alone when adapter_dir is None."""
    model, tokenizer = load_run(base, adapter_dir, load_in_4bit=False, dtype="float32")
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    return target


def convert(merged_dir: Path, outfile: Path, outtype: str = "q8_0") -> Path:
    """Run llama.cpp's converter on a merged model folder."""
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    converter = llama_cpp_converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)])}
    done = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged_dir),
                           "--outfile", str(outfile), "--outtype", outtype],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0 or not outfile.exists():
        raise ExportError(f"llama.cpp's convert_hf_to_gguf.py failed on {merged_dir}:\n{done.stderr.strip()[-2000:]}")
    return outfile


def verify(merged_dir: Path, gguf_file: Path, prompts: Sequence[str] = VERIFY_PROMPTS) -> dict[str, Any]:
    """Next-token logits of the GGUF (loaded back by transformers) against the merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_tok = AutoTokenizer.from_pretrained(merged_dir)
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                      dtype=torch.float32).eval()
    rows = []
    for prompt in prompts:
        ids = reference_tok(prompt, return_tensors="pt")
        same_tokens = gguf_tok(prompt, return_tensors="pt").input_ids.tolist() == ids.input_ids.tolist()
        with torch.inference_mode():
            a = reference(**ids).logits[0, -1]
            b = gguf_model(**ids).logits[0, -1]
        rows.append({"prompt": prompt, "same_tokens": same_tokens,
                     "max_abs_logit_diff": round(float((a - b).abs().max()), 5),
                     "relative_l2": round(float((a - b).norm() / a.norm()), 6),
                     "top1_agrees": bool(a.argmax() == b.argmax()),
                     "top1": [reference_tok.decode(int(a.argmax())), reference_tok.decode(int(b.argmax()))]})
    return {"prompts": rows,
            "top1_agreement": f"{sum(r['top1_agrees'] for r in rows)}/{len(rows)}",
            "tokenizer_agreement": f"{sum(r['same_tokens'] for r in rows)}/{len(rows)}",
            "max_relative_l2": max(r["relative_l2"] for r in rows)}


# Ollama's Go templates for the two chat formats our models use.
OLLAMA_TEMPLATES = {
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ["<|im_end|>", "<|im_start|>"]),
    "llama3": ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
               '<|start_header_id|>assistant<|end_header_id|>\n\n', ["<|eot_id|>", "<|start_header_id|>"]),
}


def chat_format(tokenizer: Any) -> str:
    """Which of OLLAMA_TEMPLATES the tokenizer's chat template is."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    raise ExportError(f"no Ollama template for the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} "
                      f"(known: {', '.join(OLLAMA_TEMPLATES)})")


def write_modelfile(gguf_file: Path, tokenizer: Any, system_prompt: str, temperature: float, target: Path) -> Path:
    template, stops = OLLAMA_TEMPLATES[chat_format(tokenizer)]
    if '"""' in system_prompt:
        raise ExportError('the system prompt contains """, which an Ollama Modelfile cannot quote')
    lines = [f"# Ollama Modelfile written by medlib export gguf: `ollama create medlib -f {target.name}`",
             f"FROM ./{gguf_file.name}", f'TEMPLATE """{template}"""', f'SYSTEM """{system_prompt}"""',
             *[f'PARAMETER stop "{stop}"' for stop in stops], f"PARAMETER temperature {temperature}"]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def export_gguf(profile: str = "local", adapter: str | Path | None = None, out: str | Path | None = None,
                outtype: str = "q8_0", overrides: Sequence[str] = (), keep_merged: bool = False) -> dict[str, Any]:
    """Merge, convert, verify and write the Modelfile; returns (and writes) export_report.json."""
    recipe = load_chat(profile, overrides)
    lay = layout(profile)
    if adapter is None and recipe.run:
        adapter = lay.run(recipe.run)
    adapter_dir = find_adapter(adapter) if adapter is not None else None
    if adapter is not None and adapter_dir is None:
        raise ModelNotFoundError(f"adapter {adapter} has no adapter_config.json (nor adapter/ inside it); "
                                 f"train it first, or pass --set run=null to export the base model")
    base, system_prompt, notice = model_and_prompt(recipe, adapter_dir)
    if notice:
        print(f"[medlib export] {notice}", flush=True)
    name = (adapter_dir.parent.name if adapter_dir and adapter_dir.name in ("adapter", "final_adapter")
            else adapter_dir.name if adapter_dir else "base")
    out = Path(out) if out else lay.export(name)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[medlib export] merging {base} + {adapter_dir or 'no adapter'} -> {out / 'merged'}", flush=True)
    merged = merge(base, adapter_dir, out / "merged")
    gguf_file = out / f"medlib-{profile}-{name}-{outtype}.gguf"
    print(f"[medlib export] converting with llama.cpp's convert_hf_to_gguf.py ({outtype}) -> {gguf_file}", flush=True)
    convert(merged, gguf_file, outtype)
    print("[medlib export] verifying: the GGUF loaded back against the merged model", flush=True)
    agreement = verify(merged, gguf_file)
    tokenizer = load_tokenizer(base)
    modelfile = write_modelfile(gguf_file, tokenizer, system_prompt,
                                recipe.generation.temperature, out / "Modelfile")
    report = {"profile": profile, "base_model": base, "adapter": str(adapter_dir) if adapter_dir else None,
              "gguf": gguf_file.name, "outtype": outtype, "size_bytes": gguf_file.stat().st_size,
              "size_mib": round(gguf_file.stat().st_size / 2**20, 1),
              "converter": f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (source package)",
              "chat_format": chat_format(tokenizer), "modelfile": modelfile.name,
              "verification": agreement}
    if not keep_merged:
        shutil.rmtree(merged)
        report["merged"] = "removed after verification (--keep-merged keeps it)"
    (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"[medlib export] {gguf_file.name}: {report['size_mib']} MiB; top-1 agreement "
          f"{agreement['top1_agreement']}, max relative L2 {agreement['max_relative_l2']}; report "
          f"{out / 'export_report.json'}", flush=True)
    return report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export the chatbot for offline use (GGUF + Ollama Modelfile)")
    what = parser.add_subparsers(dest="export_kind", required=True)
    gguf = what.add_parser("gguf", help="merge the adapter, convert to GGUF with llama.cpp's converter, verify it",
                           description=__doc__.split("\n\n")[1] if __doc__ else None)
    gguf.add_argument("--profile", choices=["local", "paper"], default="local", help="recipe profile (default: %(default)s)")
    gguf.add_argument("--adapter", default=None, help="adapter folder (default: the chat recipe's, the profile's Med-Nirvana)")
    gguf.add_argument("--outtype", choices=OUTTYPES, default="q8_0", help="GGUF weight type (default: %(default)s)")
    gguf.add_argument("--out", default=None, help="output folder (default: outputs/<profile>/export/<run>)")
    gguf.add_argument("--keep-merged", action="store_true", help="keep the merged safetensors model")
    gguf.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a chat recipe key, e.g. --set run=null (repeatable)")
    gguf.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export_gguf(args.profile, args.adapter, args.out, args.outtype, args.overrides, args.keep_merged)
    return 0
