"""GPU step time and peak memory of the unsloth and hf backends on a Llama-3.1-8B-shaped model.

Nothing can be downloaded on the benchmark GPU machine, so the model is Llama-3.1-8B's exact
architecture (32 layers, hidden 4096, MLP 14336, GQA 32/8 heads, vocab 128,256) with RANDOM weights;
step time and memory depend on the shapes, not on the weight values. Training goes through
`medlib.training.train` with the paper recipe (stage 1: batch 4, LoRA r=16 on all projections, NF4,
8-bit AdamW, max_seq_length 2048), on an MCQ mixture sampled from the published benchmark files in
the paper's source proportions (MedQA 2.5 %, MedMCQA 45.2 %, PubMedQA 52.3 %), so padded batch
lengths are realistic. The tokenizer is SmolLM2's (Llama-3's is not available offline); it writes
somewhat more tokens per text than Llama-3's, so the projection is conservative.

    # here (CPU): write the benchmark mixture (needs ../shared/data)
    python benchmarks/train_gpu_8b.py mixture --out .whl/gpu_mix --n 400
    # on the GPU machine
    python benchmarks/train_gpu_8b.py build --model-dir /tmp/llama8b --tokenizer .whl/tok
    python benchmarks/train_gpu_8b.py run --backend unsloth --model-dir /tmp/llama8b --mixture .whl/gpu_mix

Prints one JSON line per run: median seconds/step after warm-up, peak CUDA memory, and the projected
hours for one epoch of 404,269 samples at batch 4 (the paper reports about 8 h on one H100 NVL).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

PAPER_SAMPLES = 404_269
PAPER_MIX = {"medqa": 10_178, "medmcqa": 182_822, "pubmedqa": 211_269}


def make_mixture(out: Path, n: int, seed: int = 0) -> None:
    from medlib.data.io import write_jsonl
    from medlib.data.loaders import load_source

    rng = random.Random(seed)
    splits = {"medqa": "test", "medmcqa": "validation", "pubmedqa": "pqa_labeled"}
    records = []
    for source, count in PAPER_MIX.items():
        pool = load_source(source, splits[source]).records
        k = max(1, round(n * count / PAPER_SAMPLES))
        records += rng.sample(pool, min(k, len(pool)))
    rng.shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", records)
    write_jsonl(out / "validation.jsonl", records[:8])
    (out / "manifest.json").write_text(json.dumps({"note": "GPU throughput benchmark only (published test/validation "
                                                   "rows used for their lengths, never for training a model)",
                                                   "counts": {"train": len(records)}}))


def build_model(model_dir: Path, tokenizer_dir: Path, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    torch.manual_seed(0)
    t = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"built": str(model_dir), "params": n, "layers": layers, "seconds": round(time.time() - t, 1)}))


def run(backend: str, model_dir: Path, mixture: Path, steps: int, warmup: int, out: Path | None,
        overrides: list[str] = (), tag: str = "") -> dict:
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers, so it can patch it)
    from transformers import TrainerCallback

    from medlib.config import load_train
    from medlib.training import train

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            import torch

            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    recipe = load_train("paper", 1, [
        f"model.name={model_dir}", f"model.backend={backend}",
        f"training.max_steps={steps}", "training.logging_steps=1", f"training.eval_steps={10**6}",
        f"training.save_steps={10**6}", "training.max_eval_samples=8", *overrides,
    ])
    timer = StepTimer()
    run_dir = Path(f"/tmp/bench_{backend}")
    run_dir = train(recipe, run_dir, mixture, overwrite=True, callbacks=[timer])
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    timed = timer.times[warmup:]
    step_s = statistics.median(timed)
    tokens_per_step = meta["tokens_seen"] / meta["global_step"]  # non-pad tokens
    tokens_per_sample = meta["data"]["train"]["tokens"] / meta["data"]["train"]["kept"]
    result = {
        "backend": meta["backend"], "device": meta["device"], "fallbacks": meta["fallbacks"],
        "libraries": meta["libraries"], "steps_timed": len(timed), "median_s_per_step": round(step_s, 4),
        "mean_s_per_step": round(statistics.mean(timed), 4), "first_step_s": round(timer.times[0], 2),
        "overrides": list(overrides), "tokens_per_sample": round(tokens_per_sample, 1),
        "nonpad_tokens_per_step": round(tokens_per_step, 1), "nonpad_tokens_per_s": round(tokens_per_step / step_s),
        "memory": meta["memory"], "final_train_loss": meta["train_loss"],
        # hours for one epoch = all the epoch's tokens / measured non-pad tokens per second
        "projected_hours_404269": round(PAPER_SAMPLES * tokens_per_sample / (tokens_per_step / step_s) / 3600, 2),
    }
    print("RESULT " + json.dumps(result), flush=True)
    if out:
        (out / f"result_{backend}{tag}.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mixture")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--n", type=int, default=400)
    b = sub.add_parser("build")
    b.add_argument("--model-dir", type=Path, required=True)
    b.add_argument("--tokenizer", type=Path, required=True)
    b.add_argument("--layers", type=int, default=32)
    r = sub.add_parser("run")
    r.add_argument("--backend", choices=["unsloth", "hf"], required=True)
    r.add_argument("--model-dir", type=Path, required=True)
    r.add_argument("--mixture", type=Path, required=True)
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    r.add_argument("--tag", default="", help="suffix of the result file name")
    a = p.parse_args(argv)
    if a.cmd == "mixture":
        make_mixture(a.out, a.n)
    elif a.cmd == "build":
        shutil.rmtree(a.model_dir, ignore_errors=True)
        build_model(a.model_dir, a.tokenizer, a.layers)
    else:
        run(a.backend, a.model_dir, a.mixture, a.steps, a.warmup, a.out, a.overrides, a.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
