"""The paper profile on one GPU, measured by one prepared command (issue 25): as the recipes run today.

On a machine that can download nothing, the model is Llama-3.1-8B-shaped (32 layers, hidden 4096, MLP 14336,
32/8 heads, vocab 128,256) with RANDOM weights, saved pre-quantised to NF4 the way the Hub's
`unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit` is. Every phase goes through medlib with the paper recipes
(chatml, constant-length packing into 2,048-token rows, loss on all tokens, 4 x 4 batches, requantized-merge
handoff, the authors' sampled generation), on the local mixtures and 64 MedQA questions carried along:

  1. stage 1, bf16, ~20 steps: s/step, tokens/s, MFU against the GPU's dense peak, peak CUDA memory, and the
     projected epoch of the paper's 404,269 samples; then as 8 x 2 rows (the same 16 rows per step: the lever
     for a <= 3 h epoch that keeps the authors' samples per step);
  2. the same with training.precision=fp16 forced (the T4 path): it runs, its loss is finite, peak < 15 GB;
  3. kill and resume: a run killed (SIGKILL) after its first checkpoint resumes at that step and finishes;
  4. the handoff (requantized_merge): time and peak host RAM of the merged 16-bit save (against a free
     Colab's 12.7 GB), and the share of a planted ΔW of known size that survives at 8B shapes;
  5. stage 2, a few steps, from the merged Med-Mix in 4-bit;
  6. Table 3 by the authors' generation (128 new tokens, sampled) on 64 MedQA questions: questions/s.

    # here (CPU, once): what the GPU machine needs, in a folder that travels (git-ignored .whl/)
    .venv/bin/python benchmarks/gpu_paper_check.py prepare --carry .whl/check
    # on the GPU machine (requirements-gpu.txt installed), or `make gpu-check` on your own
    python benchmarks/gpu_paper_check.py run --carry .whl/check --work /tmp/check --out $OUT
    # CPU, tiny model, hf backend: the same script end to end (CI runs it: tests/test_gpu_check.py)
    python benchmarks/gpu_paper_check.py run --tiny --work /tmp/check-tiny --out /tmp/check-tiny
    # the README's GPU and Colab timings from a gpu_check.json
    python benchmarks/gpu_paper_check.py readme --json $OUT/gpu_check.json --readme README.md

Writes gpu_check.json and gpu_check.md to --out. A failing phase is recorded with its error and the next
phases still run (each GPU minute is scarce); the exit status is 1 if any phase failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PAPER_SAMPLES = 404_269        # Table 1: the stage-1 training rows of one epoch
COLAB_HOST_RAM_GB = 12.7       # a free Colab's host memory
T4_MEMORY_GB = 15.0
# Dense bf16 (fp16 on a T4) tensor peak in TFLOP/s and memory bandwidth in GB/s, from the vendors' data sheets.
GPUS = {"H100 80GB HBM3": (989.0, 3350.0), "H100 PCIe": (756.0, 2000.0), "H100 NVL": (835.0, 3900.0),
        "H200": (989.0, 4800.0), "A100": (312.0, 2039.0), "L4": (121.0, 300.0), "T4": (65.0, 320.0)}
README_BEGIN, README_END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
PLANTED = (0.005, 0.02, 0.05, 0.1)   # |ΔW| / |W'| of the planted updates


def gpu_peak(name: str) -> tuple[str, float, float] | None:
    """(the table's name, peak TFLOP/s, GB/s) of a GPU by the name torch reports, or None."""
    for key, (tflops, bandwidth) in sorted(GPUS.items(), key=lambda kv: -len(kv[0])):
        if all(part in name for part in key.split()):
            return key, tflops, bandwidth
    return None


def emit(**fields: Any) -> None:
    print(json.dumps(fields, default=str), flush=True)


# ------------------------------------------------------------------------------------------- prepare


def prepare(carry: Path, questions: int = 64) -> Path:
    """The local stage-1 and stage-2 mixtures, SmolLM2's tokenizer and `questions` MedQA test questions (the
    local data layout), into `carry`. Needs ../shared/data; nothing of it is committed."""
    from medlib import config
    from medlib.data.io import write_jsonl
    from medlib.data.loaders import load_source
    from medlib.data.mixtures import build_mixture
    from medlib.models import ensure_smollm2_safetensors

    carry.mkdir(parents=True, exist_ok=True)
    eval_recipe = config.load_eval("local")
    stage1 = build_mixture(config.load_train("local", 1), carry / "mix" / "stage1", eval_recipe)
    build_mixture(config.load_train("local", 2), carry / "mix" / "stage2", eval_recipe, stage1_mixture=stage1)
    tokenizer = ensure_smollm2_safetensors()
    (carry / "tok").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy2(tokenizer / name, carry / "tok" / name)
    records = load_source("medqa", "test").records[:questions]
    raw = [{"id": r["id"], "question": r["question"], "options": r["options"], "answer_idx": r["answer"],
            "answer": r["options"][r["answer"]]} for r in records]
    write_jsonl(carry / "data" / "medqa" / "test.jsonl", raw)
    emit(prepared=str(carry), medqa_questions=len(raw))
    return carry


# -------------------------------------------------------------------------------------------- phases


class StepTimer:
    """Wall time of every optimizer step (CUDA synchronised), as a TrainerCallback."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self.t0 = [], None

            def on_step_begin(self, args, state, control, **kw):
                _sync()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                self.times.append(time.perf_counter() - self.t0)

        return _Timer()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def build_base(work: Path, tiny: bool, tokenizer: Path | None) -> dict[str, Any]:
    """The pre-quantised base: medlib:tiny-llama (tiny) or a random Llama-3.1-8B-shaped model, saved as
    -bnb-4bit checkpoints are."""
    from medlib.models import ensure_tiny_llama, save_prequantized

    started = time.time()
    target = work / "base-bnb-4bit"
    if tiny:
        save_prequantized(ensure_tiny_llama(), target)
    else:
        from train_gpu_8b import build_model

        float_dir = work / "base-bf16"
        shutil.rmtree(float_dir, ignore_errors=True)
        build_model(float_dir, tokenizer, layers=32)
        save_prequantized(float_dir, target)
        shutil.rmtree(float_dir)  # 16 GB: only the pre-quantised copy is used from here on
    from safetensors import safe_open

    params = 0
    for shard in target.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"model": str(target), "seconds": round(time.time() - started, 1),
            "stored_elements": params, "size_gb": round(sum(p.stat().st_size for p in target.iterdir()) / 1e9, 2)}


def _overrides(base: Path, backend: str, tiny: bool, steps: int, *extra: str) -> list[str]:
    sizes = ["model.max_seq_length=256", "training.per_device_eval_batch_size=2"] if tiny else []
    return [f"model.name={base}", f"model.backend={backend}", f"training.max_steps={steps}", "training.logging_steps=1",
            f"training.eval_steps={10**6}", f"training.save_steps={10**6}", "training.max_eval_samples=16",
            "training.warmup_steps=2", *sizes, *extra]


def train_phase(stage: int, work: Path, name: str, overrides: list[str], mixture: Path, stage1: Path | None,
                warmup: int) -> dict[str, Any]:
    from medlib.config import load_train
    from medlib.training import train

    _reset_cuda_peak()
    timer = StepTimer()
    run_dir = train(load_train("paper", stage, overrides), work / name, mixture, stage1, overwrite=True,
                    callbacks=[timer])
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    timed = timer.times[warmup:] or timer.times
    s_per_step = statistics.median(timed)
    losses = [e["loss"] for e in json.loads((run_dir / "log_history.json").read_text()) if "loss" in e]
    data = meta["data"]["train"]
    tokens_per_step = meta["tokens_seen"] / max(1, meta["global_step"])
    out = {"run": str(run_dir), "backend": meta["backend"], "precision": meta["precision"], "steps": meta["global_step"],
           "steps_timed": len(timed), "s_per_step": round(s_per_step, 4), "first_step_s": round(timer.times[0], 2),
           "tokens_per_step": round(tokens_per_step, 1), "tokens_per_s": round(tokens_per_step / s_per_step, 1),
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "loss_finite": all(math.isfinite(x) for x in losses), "memory": meta["memory"],
           "fallbacks": meta["fallbacks"], "handoff": meta.get("handoff"),
           "tokens_per_sample": round(data.get("tokens", 0) / max(1, data.get("records", 1)), 1)}
    if meta.get("handoff_measure"):
        out["handoff_measure"] = {k: meta["handoff_measure"][k] for k in ("all", "validation_loss", "merge_dtype")}
    return out


def flops_per_token(base: Path, seq_len: int) -> float:
    """Model FLOPs per trained token of QLoRA on a frozen base: forward 2N + backward to the activations 2N
    (no weight gradients but the LoRA's, negligible), plus attention's 4·L·d·seq (forward and backward of
    QKᵀ and AV, causal half counted in full). N: the linear layers' weights, embeddings excluded."""
    config = json.loads((base / "config.json").read_text())
    d, layers, mlp = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * mlp) + d * config["vocab_size"]
    return 4 * linear + 4 * layers * d * seq_len * 2


def kill_and_resume(work: Path, overrides: list[str], mixture: Path, save_every: int) -> dict[str, Any]:
    """A run killed with SIGKILL after its first checkpoint, then resumed to the end."""
    from medlib.config import load_train
    from medlib.training import train

    run_dir = work / "kill-resume"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = 2 * save_every
    overrides = [*overrides, f"training.max_steps={steps}", f"training.save_steps={save_every}"]
    child = subprocess.Popen([sys.executable, __file__, "_train", "--run", str(run_dir), "--mixture", str(mixture),
                              *[f"--set={o}" for o in overrides]], cwd=REPO)
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{save_every}"
    deadline = time.time() + 600
    while not (checkpoint / "trainer_state.json").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    killed = child.poll() is None
    if killed:
        time.sleep(0.5)  # let the checkpoint's files land; a half-written later one would be skipped by resume
        child.send_signal(signal.SIGKILL)
    child.wait()
    if not checkpoint.exists():
        raise RuntimeError(f"no {checkpoint.name} was written before the run ended (exit {child.returncode})")
    run_dir = train(load_train("paper", 1, overrides), run_dir, mixture, resume=True)
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    steps_logged = sorted({e["step"] for e in json.loads((run_dir / "log_history.json").read_text()) if "loss" in e})
    resumed_from = Path(str(meta["resumed_from"])).name
    return {"killed_by_sigkill": killed, "resumed_from": resumed_from, "final_step": meta["global_step"],
            "expected_final_step": steps, "steps_logged": steps_logged,
            "ok": killed and resumed_from == checkpoint.name and meta["global_step"] == steps
                  and steps_logged == list(range(1, steps + 1))}


def merge_in_child(run: Path, backend: str) -> dict[str, Any]:
    """The stage-1 run's merged 16-bit save in a child process: its wall time and peak resident memory."""
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "_merge", "--run", str(run), "--backend", backend], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"merge failed: {done.stderr[-2000:]}")
    peak_gb = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    merged = run / "merged_16bit"
    return {"seconds": round(time.time() - started, 1), "peak_host_ram_gb": round(peak_gb, 2),
            "fits_free_colab_12_7_gb": peak_gb < COLAB_HOST_RAM_GB,
            "merged_gb": round(sum(p.stat().st_size for p in merged.iterdir() if p.is_file()) / 1e9, 2),
            "note": "peak resident memory of the process that merged and saved, start-up included"}


def planted_survival(base: Path) -> dict[str, Any]:
    """ΔW of known relative size (rank 16) planted on real-shaped weights of the pre-quantised base, requantised."""
    import torch

    from medlib.training.handoff import _QuantizedCheckpoint, checkpoint_shards, requantization_of

    checkpoint = _QuantizedCheckpoint(checkpoint_shards(str(base)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [k for k in checkpoint.where if k.endswith((".0.self_attn.q_proj.weight", ".0.mlp.down_proj.weight"))]
    out = {}
    for ratio in PLANTED:
        def pairs():
            for i, key in enumerate(names):
                w = checkpoint.dequantized(key).to(device)
                g = torch.Generator(device=device).manual_seed(i)
                delta = torch.randn(w.shape[0], 16, generator=g, device=device) @ torch.randn(16, w.shape[1], generator=g, device=device)
                yield key[: -len(".weight")], w, delta * ratio * w.norm() / delta.norm()

        report = requantization_of(pairs(), torch.bfloat16)
        out[f"{ratio:g}"] = {m: round(r["kept_share"], 4) for m, r in report["by_module"].items()}
    return {"matrices": {k: list(checkpoint.tensor(k).shape) for k in names}, "kept_share_by_planted_size": out,
            "note": "quantised shapes as stored (packed 4-bit); each matrix de-quantised exactly, ΔW rank 16"}


def table3_phase(work: Path, base: Path, carry: Path, stage2: Path, tiny: bool, questions: int) -> dict[str, Any]:
    from medlib.config import load_eval
    from medlib.evaluate.mcq import run_mcq

    overrides = [f"model.name={base}", f"data.data_dir={carry / 'data'}", "data.hub=false", "mcq.sets=[medqa]",
                 f"mcq.limit={questions}", "mcq.runs=1"]
    if tiny:
        overrides += ["mcq.generation.max_new_tokens=16", "mcq.batch_size=4", "mcq.max_length=512"]
    results = run_mcq(load_eval("paper", overrides), work / "eval", stage2, label="med-nirvana", write_tables=False)
    medqa = results["sets"]["medqa"]
    return {"questions": medqa["n_scored"], "seconds": medqa["seconds"], "questions_per_s": medqa["questions_per_second"],
            "load_seconds": results["load_seconds"], "weights": results["weights"],
            "max_new_tokens": results["settings"]["max_new_tokens"], "sampling": results["settings"]["sampling"],
            "unparseable_share": medqa.get("unparseable_share"), "accuracy_meaningless": medqa["accuracy"]}


def run(work: Path, out: Path, carry: Path | None, tiny: bool, steps: int | None = None,
        skip: tuple[str, ...] = ()) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available() and not tiny:
        import unsloth  # noqa: F401  (before transformers, so it can patch it)
    from medlib.runs import ensure_merged  # noqa: F401  (imported here: after unsloth)
    from medlib.training.metadata import device_name, library_versions

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if carry is None:
        carry = prepare(work / "carry", questions=8)
    backend = "hf" if tiny else "unsloth"
    gpu = gpu_peak(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    report: dict[str, Any] = {"device": device_name(), "tiny": tiny, "backend": backend, "libraries": library_versions(),
                              "date": time.strftime("%Y-%m-%d"), "gpu_peak": gpu, "phases": {}}
    # --steps trims the whole check to a short lease: fp16, kill-and-resume and stage 2 scale with it
    steps = steps or (3 if tiny else 20)
    fp16_steps, warmup, save_every = max(2, steps // 2), min(3, max(1, steps // 4)), max(2, steps // 4)
    report["skipped"] = list(skip)
    report["steps"] = {"stage1": steps, "stage1_timed_after": warmup, "fp16": fp16_steps, "kill_resume_save_every": save_every}

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if name in skip:  # a rerun of the phases an earlier lease lost; --skip names the ones it has
            return None
        started = time.time()
        try:
            result = fn()
            result["ok"] = result.get("ok", True)
        except Exception as exc:  # a failing phase is recorded; the others still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000]}
        result["wall_s"] = round(time.time() - started, 1)
        report["phases"][name] = result
        emit(phase=name, **result)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # kept even if killed later
        return result if result["ok"] else None

    mix = carry / "mix"
    built = phase("build_base", lambda: build_base(work, tiny, carry / "tok"))
    if built is None:
        return finish(report, out)
    base = Path(built["model"])
    stage1 = phase("stage1_bf16", lambda: train_phase(1, work, "stage1", _overrides(base, backend, tiny, steps),
                                                      mix / "stage1", None, warmup))
    # the lever that keeps the authors' 16 rows per step: 8 x 2 instead of 4 x 4 (the same rows, larger matmuls)
    wider = phase("stage1_bf16_8x2", lambda: train_phase(1, work, "stage1-8x2", _overrides(
        base, backend, tiny, steps, "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=2"),
        mix / "stage1", None, warmup))
    for measured in (stage1, wider):
        if measured and gpu:
            per_token = flops_per_token(base, 2048 if not tiny else 256)
            measured["mfu"] = round(per_token * measured["tokens_per_s"] / (gpu[1] * 1e12), 4)
            measured["mfu_basis"] = (f"{per_token / 1e9:.1f} GFLOP per token (4 x linear weights + attention) against "
                                     f"{gpu[0]}'s dense bf16 peak, {gpu[1]:.0f} TFLOP/s")
            measured["projected_epoch_h"] = round(PAPER_SAMPLES * measured["tokens_per_sample"] / measured["tokens_per_s"] / 3600, 2)
    if tiny:
        phase("stage1_fp16", lambda: fp16_refused(base, backend, tiny))
    else:
        fp16 = phase("stage1_fp16", lambda: train_phase(1, work, "stage1-fp16", _overrides(
            base, backend, tiny, fp16_steps, "training.precision=fp16"), mix / "stage1", None, warmup))
        if fp16:
            peak = fp16["memory"].get("peak_cuda_reserved_mb", 0) / 1024
            fp16.update(peak_cuda_reserved_gb=round(peak, 2), under_15_gb=peak * 1.073741824 < T4_MEMORY_GB,
                        ok=fp16["loss_finite"] and peak * 1.073741824 < T4_MEMORY_GB)
    if stage1:
        phase("handoff", lambda: {**merge_in_child(Path(stage1["run"]), backend), **planted_survival(base)})
        stage2 = phase("stage2", lambda: train_phase(2, work, "stage2", _overrides(base, backend, tiny, min(steps, 6)),
                                                     mix / "stage2", Path(stage1["run"]), 1))
        if stage2:
            phase("table3_generate", lambda: table3_phase(work, base, carry, Path(stage2["run"]), tiny, 8 if tiny else 64))
    # last: it works the same at any size (the CPU test runs it), so a short lease loses it first
    phase("kill_resume", lambda: kill_and_resume(work, _overrides(base, backend, tiny, steps), mix / "stage1",
                                                 save_every=save_every))
    return finish(report, out)


def fp16_refused(base: Path, backend: str, tiny: bool) -> dict[str, Any]:
    """On a CPU the fp16 path cannot run; the check is that it is refused with a clear error, not half-run."""
    from medlib.config import load_train
    from medlib.training.arguments import trainer_settings

    try:  # what train() asks first about precision, before any model or data is loaded
        trainer_settings(load_train("paper", 1, _overrides(base, backend, tiny, 1, "training.precision=fp16")), backend, [])
    except Exception as exc:
        return {"skipped": "no CUDA device", "refused_with": str(exc)[:300], "ok": "needs a CUDA GPU" in str(exc)}
    return {"ok": False, "error": "fp16 on a CPU was not refused"}


# ------------------------------------------------------------------------------------ tables and README


def projections(report: dict[str, Any]) -> list[dict[str, Any]]:
    """T4 figures scaled from the measured ones: compute-bound steps by the ratio of dense tensor peaks, and
    bandwidth-bound ones by the ratio of memory bandwidths; the two bound the T4's time."""
    gpu = report.get("gpu_peak")
    stage1 = report["phases"].get("stage1_bf16") or {}
    if not gpu or not stage1.get("ok"):
        return []
    flop_ratio, bandwidth_ratio = gpu[1] / GPUS["T4"][0], gpu[2] / GPUS["T4"][1]
    rows = [{"what": "stage-1 step (4 x 4 packed rows of 2,048 tokens)", "measured": f"{stage1['s_per_step']:.3f} s",
             "t4": f"{stage1['s_per_step'] * bandwidth_ratio:.2f}-{stage1['s_per_step'] * flop_ratio:.2f} s",
             "basis": f"x {bandwidth_ratio:.1f} (bandwidth) to x {flop_ratio:.1f} (tensor FLOP/s), {gpu[0]} vs T4"}]
    if stage1.get("projected_epoch_h"):
        rows.append({"what": "stage-1 epoch, 404,269 samples", "measured": f"{stage1['projected_epoch_h']:.1f} h (projected from the measured tokens/s)",
                     "t4": f"{stage1['projected_epoch_h'] * bandwidth_ratio:.0f}-{stage1['projected_epoch_h'] * flop_ratio:.0f} h",
                     "basis": "the same ratios"})
    table3 = report["phases"].get("table3_generate") or {}
    if table3.get("ok"):
        rows.append({"what": "Table 3, authors' generation", "measured": f"{table3['questions_per_s']:.2f} questions/s",
                     "t4": f"{table3['questions_per_s'] / flop_ratio:.3f}-{table3['questions_per_s'] / bandwidth_ratio:.3f} questions/s",
                     "basis": "decoding is bandwidth-bound at batch 16: the bandwidth ratio is the likelier"})
    return rows


def finish(report: dict[str, Any], out: Path) -> dict[str, Any]:
    report["projections_t4"] = projections(report)
    report["ok"] = all(p.get("ok") for p in report["phases"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    emit(result="ok" if report["ok"] else "failed", json=str(out / "gpu_check.json"))
    return report


def _cell(phase: dict[str, Any] | None, text: Callable[[dict[str, Any]], str]) -> str:
    if phase is None:
        return "not run"
    if not phase.get("ok"):
        return f"FAILED: {phase.get('error', 'see gpu_check.json')}"[:200]
    return text(phase)


def markdown(report: dict[str, Any]) -> str:
    """The check as a table: every figure measured on the named device, then the T4 projections, marked so."""
    p = report["phases"]
    where = f"measured on {report['device']}, {report['date']}" + (" (--tiny: CPU, tiny model; times mean nothing)" if report["tiny"] else "")
    gb = lambda mb: f"{(mb or 0) / 1024:.1f} GiB"  # noqa: E731
    mem = lambda m: (f"peak CUDA {gb(m.get('peak_cuda_allocated_mb'))}" if "peak_cuda_allocated_mb" in m  # noqa: E731
                     else f"peak RSS {gb(m.get('peak_rss_mb'))}")
    rows = [
        ("stage 1, 4 x 4 (the recipe's precision: bf16 on a GPU)", _cell(p.get("stage1_bf16"), lambda r: (
            f"{r['precision']['mode']}: {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s"
            + (f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
            + f", {mem(r['memory'])}"
            + (f"; epoch of 404,269 samples {r['projected_epoch_h']:.1f} h" if "projected_epoch_h" in r else "")))),
        ("stage 1, 8 x 2 (the same 16 rows per step)", _cell(p.get("stage1_bf16_8x2"), lambda r: (
            f"{r['precision']['mode']}: {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s"
            + (f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
            + (f"; epoch {r['projected_epoch_h']:.1f} h" if "projected_epoch_h" in r else "")))),
        ("stage 1, fp16 forced (T4 path)", _cell(p.get("stage1_fp16"), lambda r: r.get("refused_with") and
            f"refused on CPU: {r['refused_with'][:80]}" or f"runs, loss finite {r['loss_finite']}, peak reserved "
            f"{r['peak_cuda_reserved_gb']:.1f} GB (under 15 GB: {r['under_15_gb']})")),
        ("kill and resume", _cell(p.get("kill_resume"), lambda r: f"SIGKILL {r['killed_by_sigkill']}, resumed from "
            f"{r['resumed_from']} to step {r['final_step']} of {r['expected_final_step']}")),
        ("handoff: merged 16-bit save", _cell(p.get("handoff"), lambda r: f"{r['seconds']:.0f} s, peak host RAM "
            f"{r['peak_host_ram_gb']:.1f} GB (fits a free Colab's 12.7 GB: {r['fits_free_colab_12_7_gb']})")),
        ("handoff: planted ΔW kept", _cell(p.get("handoff"), lambda r: "; ".join(
            f"‖ΔW‖/‖W'‖ {100 * float(k):g}%: " + ", ".join(f"{m} {100 * v:.0f}%" for m, v in kept.items())
            for k, kept in r["kept_share_by_planted_size"].items()))),
        ("stage 2", _cell(p.get("stage2"), lambda r: f"{r['s_per_step']:.3f} s/step, handoff {r['handoff']}, "
            f"{mem(r['memory'])}")),
        ("Table 3, authors' generation", _cell(p.get("table3_generate"), lambda r: f"{r['questions_per_s']:.2f} "
            f"questions/s on {r['questions']} MedQA questions ({r['max_new_tokens']} new tokens, sampled)")),
    ]
    lines = [f"# GPU check of the paper profile ({where})", "", "| phase | result |", "|---|---|"]
    lines += [f"| {name} | {text} |" for name, text in rows]
    if report.get("runs"):
        lines += ["", "Runs: " + "; ".join(f"{r['run']} ({r['date']}, {r['steps']['stage1']} stage-1 steps, timed after "
                                          f"{r['steps']['stage1_timed_after']}"
                                          + (f", skipped {', '.join(r['skipped'])}" if r["skipped"] else "") + ")"
                                          for r in report["runs"]) + "."]
        lines += [f"Failed in {s['run']}, made good by a later run: {s['phase']} ({s['error'].strip().splitlines()[-1][:240]})."
                  for s in report.get("superseded", [])]
    if report.get("projections_t4"):
        lines += ["", "Projected for a free Colab T4 (not measured):", "", "| what | measured | T4, projected | basis |",
                  "|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['measured']} | {r['t4']} | {r['basis']} |" for r in report["projections_t4"]]
    return "\n".join(lines) + "\n"


def combine(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One report from the runs of one check: each phase from the first run where it passed (else the last that
    ran it), named by its run; a failure a later run made good stays listed, with its error."""
    if len({(r["device"], r["tiny"], r["backend"]) for r in reports}) > 1:
        raise SystemExit("combine only runs on one device, backend and size: " + ", ".join(names))
    phases: dict[str, Any] = {}
    superseded = []
    for name, report in zip(names, reports):
        for phase, result in report["phases"].items():
            earlier = phases.get(phase)
            if earlier is None or not earlier.get("ok"):
                if earlier is not None:
                    superseded.append({"phase": phase, "run": earlier["from_run"], "error": earlier.get("error", "")[-600:]})
                phases[phase] = {**result, "from_run": name}
    return {**reports[-1], "phases": phases, "superseded": superseded,
            "runs": [{"run": n, "date": r["date"], "steps": r.get("steps"), "skipped": r.get("skipped", [])}
                     for n, r in zip(names, reports)]}


def render_readme(report: dict[str, Any], readme: Path) -> None:
    """Replace the README's block between the gpu_check markers with this check's table."""
    report = {**report, "projections_t4": projections(report)}  # from the figures, as they stand in the JSON
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = markdown(report).replace("# GPU check", "**GPU check", 1).replace(")\n", ")**\n", 1)
    readme.write_text(f"{head}{README_BEGIN}\n{block}{README_END}{tail}")


# ------------------------------------------------------------------------------------------ commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write what the GPU machine needs into --carry (CPU, needs ../shared/data)")
    p.add_argument("--carry", type=Path, required=True)
    r = sub.add_parser("run", help="run every phase; --tiny on a CPU")
    r.add_argument("--carry", type=Path, default=None, help="what prepare wrote (default with --tiny: prepared here)")
    r.add_argument("--work", type=Path, default=Path("/tmp/gpu_paper_check"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--tiny", action="store_true", help="medlib:tiny-llama on the hf backend, a few steps (CPU)")
    r.add_argument("--steps", type=int, default=None, help="stage-1 steps per timed phase (default 20; 3 with --tiny)")
    r.add_argument("--skip", default="", help="phases not to run, comma-separated (a rerun of what a lease lost)")
    m = sub.add_parser("readme", help="regenerate the README's GPU timings from a gpu_check.json")
    m.add_argument("--json", type=Path, action="append", required=True,
                   help="a run's gpu_check.json; several: the runs of one check, combined phase by phase")
    m.add_argument("--readme", type=Path, default=REPO / "README.md")
    t = sub.add_parser("_train")   # internal: the run that kill_and_resume kills
    t.add_argument("--run", type=Path, required=True)
    t.add_argument("--mixture", type=Path, required=True)
    t.add_argument("--set", dest="overrides", action="append", default=[])
    g = sub.add_parser("_merge")   # internal: the merge whose peak host RAM is measured
    g.add_argument("--run", type=Path, required=True)
    g.add_argument("--backend", default="hf")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.carry)
    elif args.command == "run":
        if not args.tiny:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("run needs a CUDA GPU (or --tiny for the CPU version)")
            if args.carry is None:
                raise SystemExit("run needs --carry (what `prepare` wrote on a machine with ../shared/data)")
        return 0 if run(args.work, args.out, args.carry, args.tiny, args.steps,
                        tuple(filter(None, args.skip.split(","))))["ok"] else 1
    elif args.command == "readme":
        reports = [json.loads(path.read_text()) for path in args.json]
        render_readme(reports[0] if len(reports) == 1 else combine(reports, [path.stem for path in args.json]), args.readme)
    elif args.command == "_train":
        if args.overrides and "model.backend=unsloth" in args.overrides:
            import unsloth  # noqa: F401
        from medlib.config import load_train
        from medlib.training import train

        train(load_train("paper", 1, args.overrides), args.run, args.mixture, overwrite=True)
    elif args.command == "_merge":
        if args.backend == "unsloth":
            import unsloth  # noqa: F401
        import resource

        from medlib.runs import ensure_merged

        ensure_merged(args.run, args.backend)
        print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
