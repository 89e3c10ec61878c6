"""Evaluation throughput and the lm-evaluation-harness cross-check, on SmolLM2-135M on CPU.

Over the same questions (a fixed random slice of each set) this times
  - medlib loglik   (one forward per question, letter log-probs at the answer position; with and
                     without the shared-prefix key/value cache),
  - medlib generate (greedy decoding + answer parsing),
  - medlib loglik + greedy in one pass (both protocols from one forward per question, then the decode;
                     the local Table 3's two rows), with its replies checked against generate's,
  - position bias   (a question under every cyclic order of its options, one batch per question),
  - lm-eval         (lm-evaluation-harness 0.4.x HFLM.loglikelihood on the same prompt text and the
                     option letters as continuations: its `medqa_4options`/`medmcqa`-style letter scoring),
and prints questions/s, the ratios measured within this run, each method's accuracy, and the
per-question agreement of medlib loglik with lm-eval. The issue's targets: loglik >= 2x lm-eval,
>= 5x generate; loglik and lm-eval accuracies within 1 point.

    .venv/bin/python benchmarks/eval_throughput.py --per-set 25 --batch-size 8 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="medqa,medmcqa,pubmedqa,mmlu_med")
    parser.add_argument("--per-set", type=int, default=25, help="questions per set (a fixed random slice)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="medlib's dtype (auto: bfloat16 on a CPU with native bf16)")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--position-bias", type=int, default=5,
                        help="time the permutation check on this many of each set's questions (0: skip)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from medlib.config import load_eval
    from medlib.data.eval_sets import load_eval_set
    from medlib.data.mixtures import seeded_subset
    from medlib.data.validate import mcq_problem
    from medlib.evaluate import common
    from medlib.evaluate.crosscheck import lm_eval_letter_predictions
    from medlib.evaluate.mcq import (encode_prompt, evaluate_loglik_and_greedy, evaluate_records, loglik_scorer,
                                     position_bias)
    from medlib.models import SMOLLM2, load_for_inference, resolve_dtype
    from medlib.prompts import SYSTEM_PROMPT

    torch.manual_seed(0)
    fast_dtype = resolve_dtype(args.dtype)
    model, tokenizer = load_for_inference(SMOLLM2, None, load_in_4bit=False, dtype="float32")
    common.prepare_tokenizer(tokenizer)
    models = {"float32": model}
    if fast_dtype != "float32":
        models[fast_dtype] = load_for_inference(SMOLLM2, None, load_in_4bit=False, dtype=fast_dtype)[0]
    sets = [s for s in args.sets.split(",") if s]
    eval_recipe = load_eval("local")
    records = {s: [r for r in seeded_subset(load_eval_set(eval_recipe.sets[s], [eval_recipe.data.data_dir], hub=False, name=s),
                                                  args.per_set, 3407) if mcq_problem(r) is None] for s in sets}
    n_total = sum(len(v) for v in records.values())
    print(f"SmolLM2-135M-Instruct (medlib default dtype here: {fast_dtype}; lm-eval: float32), torch threads {torch.get_num_threads()}, {n_total} questions "
          f"({', '.join(f'{s} {len(v)}' for s, v in records.items())}), batch {args.batch_size}, max_length {args.max_length}")

    out: dict = {"questions": n_total, "per_set": args.per_set, "batch_size": args.batch_size, "methods": {}}
    ours_pred: dict[str, dict] = {}
    replies_alone: dict[str, list] = {}
    runs = [("loglik", fast_dtype, True)] + ([("loglik", "float32", True)] if fast_dtype != "float32" else []) \
        + [("loglik", fast_dtype, False)] + ([] if args.skip_generate else [("generate", fast_dtype, True)])
    for method, dtype, prefix_cache in runs:
        name = f"medlib {method} {dtype}" + ("" if prefix_cache else " no prefix cache")
        settings = eval_recipe.mcq.replace(method=method, batch_size=args.batch_size, max_length=args.max_length,
                                           bootstrap_samples=200, prefix_cache=prefix_cache, generation=eval_recipe.mcq.generation
                                           .replace(max_new_tokens=args.max_new_tokens))
        seconds, correct, scored, unparse = 0.0, 0, 0, 0
        for s, recs in records.items():
            started = time.perf_counter()
            summary, predictions = evaluate_records(models[dtype], tokenizer, recs, settings, SYSTEM_PROMPT, set_name=s)
            seconds += time.perf_counter() - started
            correct += summary["n_correct"]
            scored += summary["n_scored"]
            unparse += summary.get("n_unparseable", 0)
            if method == "loglik" and prefix_cache:
                ours_pred.setdefault(dtype, {})[s] = [p["prediction"] for p in predictions]
            if method == "generate":
                replies_alone[s] = [p["reply"] for p in predictions]
        out["methods"][name] = {"seconds": seconds, "qps": scored / seconds, "accuracy": correct / scored,
                                              "unparseable": unparse if method == "generate" else None}

    if not args.skip_generate:  # both protocols from one forward pass per question (the local reproduce's Table 3)
        loglik = eval_recipe.mcq.replace(method="loglik", batch_size=args.batch_size, max_length=args.max_length,
                                         bootstrap_samples=200)
        greedy = loglik.replace(method="generate", generation=loglik.generation.replace(max_new_tokens=args.max_new_tokens))
        seconds, same_replies, same_letters = 0.0, 0, 0
        for s, recs in records.items():
            started = time.perf_counter()
            (_, by_loglik), (_, by_reply) = evaluate_loglik_and_greedy(models[fast_dtype], tokenizer, recs, loglik, greedy,
                                                                       SYSTEM_PROMPT, set_name=s)
            seconds += time.perf_counter() - started
            same_replies += sum(a["reply"] == b for a, b in zip(by_reply, replies_alone[s]))
            same_letters += sum(a["prediction"] == b for a, b in zip(by_loglik, ours_pred[fast_dtype][s]))
        out["methods"][f"medlib loglik + greedy, one pass {fast_dtype}"] = {
            "seconds": seconds, "qps": n_total / seconds, "accuracy": None, "unparseable": None,
            "same_reply_as_generate": same_replies, "same_letter_as_loglik": same_letters}
    if args.position_bias:  # every cyclic permutation of a question's options in one batch
        subsets = {s: recs[:args.position_bias] for s, recs in records.items()}
        score = loglik_scorer(models[fast_dtype], tokenizer, eval_recipe.mcq.replace(max_length=args.max_length),
                              SYSTEM_PROMPT, "medlib")
        started = time.perf_counter()
        bias = {s: position_bias(recs, score) for s, recs in subsets.items()}
        seconds = time.perf_counter() - started
        n_questions = sum(b["questions"] for b in bias.values())
        out["methods"][f"position bias, all cyclic orders {fast_dtype}"] = {
            "seconds": seconds, "qps": n_questions / seconds, "accuracy": None, "unparseable": None,
            "orders_scored": sum(b["answers"] for b in bias.values())}

    lm_seconds, lm_correct, mismatched_prompts = 0.0, 0, 0
    agree = {dtype: 0 for dtype in ours_pred}
    for s, recs in records.items():
        prompts = [encode_prompt(tokenizer, r, SYSTEM_PROMPT, args.max_length)[0] for r in recs]
        mismatched_prompts += sum(tokenizer(tokenizer.decode(p), add_special_tokens=False)["input_ids"] != p for p in prompts)
        preds, seconds = lm_eval_letter_predictions(model, tokenizer, prompts, recs, args.batch_size)
        lm_seconds += seconds
        lm_correct += sum(p == r["answer"] for p, r in zip(preds, recs))
        for dtype in ours_pred:
            agree[dtype] += sum(p == q for p, q in zip(preds, ours_pred[dtype][s]))
    out["methods"]["lm-eval loglikelihood float32"] = {"seconds": lm_seconds, "qps": n_total / lm_seconds,
                                               "accuracy": lm_correct / n_total, "unparseable": None}
    out["agreement_with_lm_eval"] = {f"medlib loglik {d}": a / n_total for d, a in agree.items()}
    out["prompts_not_round_tripping"] = mismatched_prompts

    print(f"\n{'method':44s} {'q/s':>8s} {'seconds':>8s} {'accuracy':>9s}")
    for name, m in out["methods"].items():
        extra = f"  unparseable {m['unparseable']}/{n_total}" if m["unparseable"] is not None else ""
        accuracy = f"{100 * m['accuracy']:8.1f}%" if m["accuracy"] is not None else f"{'':9s}"
        print(f"{name:44s} {m['qps']:8.2f} {m['seconds']:8.1f} {accuracy}{extra}")
    lm = out["methods"]["lm-eval loglikelihood float32"]
    worst = 0.0
    for dtype in ours_pred:
        ours = out["methods"][f"medlib loglik {dtype}"]
        ratio = ours["qps"] / lm["qps"]
        diff = 100 * (ours["accuracy"] - lm["accuracy"])
        worst = max(worst, abs(diff))
        out[f"ratio_loglik_{dtype}_vs_lm_eval"] = ratio
        out[f"accuracy_diff_points_loglik_{dtype}_vs_lm_eval"] = diff
        print(f"medlib loglik {dtype} / lm-eval float32: {ratio:.2f}x (target >= 2x); accuracy {diff:+.2f} points "
              f"(must be within 1); same prediction on {100 * out['agreement_with_lm_eval'][f'medlib loglik {dtype}']:.1f}% of questions")
    uncached = out["methods"][f"medlib loglik {fast_dtype} no prefix cache"]
    out["ratio_prefix_cache"] = out["methods"][f"medlib loglik {fast_dtype}"]["qps"] / uncached["qps"]
    print(f"prefix cache: {out['ratio_prefix_cache']:.2f}x the uncached loglik; uncached / lm-eval: "
          f"{uncached['qps'] / lm['qps']:.2f}x")
    if not args.skip_generate:
        gen = out["methods"][f"medlib generate {fast_dtype}"]
        out["ratio_loglik_vs_generate"] = out["methods"][f"medlib loglik {fast_dtype}"]["qps"] / gen["qps"]
        print(f"medlib loglik / medlib generate ({fast_dtype}): {out['ratio_loglik_vs_generate']:.2f}x (target >= 5x); "
              f"generate accuracy {100 * gen['accuracy']:.1f}%, unparseable {gen['unparseable']}")
        shared = out["methods"][f"medlib loglik + greedy, one pass {fast_dtype}"]
        loglik_alone = out["methods"][f"medlib loglik {fast_dtype}"]
        out["ratio_both_protocols_separately_vs_one_pass"] = (loglik_alone["seconds"] + gen["seconds"]) / shared["seconds"]
        out["ratio_one_pass_vs_loglik_alone"] = shared["seconds"] / loglik_alone["seconds"]
        print(f"both protocols: one pass takes {out['ratio_one_pass_vs_loglik_alone']:.2f}x loglik alone; loglik then "
              f"generate take {out['ratio_both_protocols_separately_vs_one_pass']:.2f}x the one pass; same reply as "
              f"generate on {shared['same_reply_as_generate']}/{n_total}, same letter as loglik on {shared['same_letter_as_loglik']}/{n_total}")
    if args.position_bias:
        bias = out["methods"][f"position bias, all cyclic orders {fast_dtype}"]
        out["ratio_position_bias_question_vs_loglik_question"] = out["methods"][f"medlib loglik {fast_dtype}"]["qps"] / bias["qps"]
        print(f"position bias: a question under all its cyclic orders ({bias['orders_scored']} orders in all) costs "
              f"{out['ratio_position_bias_question_vs_loglik_question']:.2f}x a loglik question")
    print(f"{mismatched_prompts} prompts did not round-trip through decode/encode (lm-eval gets text)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
