"""Statistics beside the tables: answer-letter diagnostics, paired comparisons between models on the
same questions (McNemar's exact test and a paired bootstrap) and on the same queries (BERTScore)."""

from __future__ import annotations

import math
import random
from collections import Counter
from math import comb
from typing import Any, Mapping, Sequence

CONSTANT_SHARE = 0.8  # one letter taking more than this share of the predictions is flagged


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: b = only the first model right,
    c = only the second right. Under the null each discordant pair is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(differences: Sequence[float], samples: int = 1000, seed: int = 3407) -> tuple[float, float, float]:
    """(mean difference, 95% CI low, high), resampling the paired items."""
    n = len(differences)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return sum(differences) / n, means[int(0.025 * samples)], means[min(samples - 1, int(0.975 * samples))]


def letter_diagnostics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Predicted vs gold letters of the scored questions, the majority-class baseline, and a flag when
    one letter takes more than CONSTANT_SHARE of the predictions (a collapsed, near-constant answerer)."""
    predicted = Counter(str(r.get("prediction")) if r.get("prediction") is not None else "none" for r in rows)
    gold = Counter(str(r.get("answer")) for r in rows)
    n = len(rows)
    top, top_n = predicted.most_common(1)[0] if predicted else ("none", 0)
    majority, majority_n = gold.most_common(1)[0] if gold else ("none", 0)
    return {"n": n, "predicted": dict(sorted(predicted.items())), "gold": dict(sorted(gold.items())),
            "top_prediction": top, "top_prediction_share": top_n / n if n else float("nan"),
            "constant": bool(n) and top_n / n > CONSTANT_SHARE,
            "majority_letter": majority, "majority_baseline": majority_n / n if n else float("nan")}


def compare_mcq(first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]],
                samples: int = 1000, seed: int = 3407) -> dict[str, Any]:
    """Two models' per-question rows of one set, paired by question id (scored by both):
    accuracies, second minus first with a paired-bootstrap CI, and McNemar's exact p."""
    scored = lambda rows: {r["id"]: bool(r["correct"]) for r in rows if not str(r.get("status", "ok")).startswith("bad")}  # noqa: E731
    a, b = scored(first), scored(second)
    ids = sorted(set(a) & set(b))
    only_first = sum(1 for i in ids if a[i] and not b[i])
    only_second = sum(1 for i in ids if b[i] and not a[i])
    diff, lo, hi = paired_bootstrap([float(b[i]) - float(a[i]) for i in ids], samples, seed)
    return {"n_paired": len(ids), "accuracy_first": sum(a[i] for i in ids) / len(ids) if ids else float("nan"),
            "accuracy_second": sum(b[i] for i in ids) / len(ids) if ids else float("nan"),
            "difference": diff, "ci95": [lo, hi], "only_first_right": only_first, "only_second_right": only_second,
            "p_mcnemar": mcnemar_exact(only_first, only_second)}


def compare_values(first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]], value: str,
                   samples: int = 1000, seed: int = 3407) -> dict[str, Any]:
    """Two models' per-item values (BERTScore F1, a validation loss), paired by item id: second minus first,
    paired-bootstrap CI and a two-sided sign-flip permutation p-value (exact over the bootstrap's resolution)."""
    key = lambda r: str(r.get("id", r.get("query")))  # noqa: E731
    a = {key(r): float(r[value]) for r in first}
    b = {key(r): float(r[value]) for r in second}
    ids = sorted(set(a) & set(b))
    d = [b[i] - a[i] for i in ids]
    diff, lo, hi = paired_bootstrap(d, samples, seed)
    rng = random.Random(seed)
    observed = abs(sum(d))
    extreme = sum(1 for _ in range(samples) if abs(sum(x if rng.random() < 0.5 else -x for x in d)) >= observed - 1e-12)
    return {"n_paired": len(ids), f"{value}_first": sum(a[i] for i in ids) / len(ids) if ids else float("nan"),
            f"{value}_second": sum(b[i] for i in ids) / len(ids) if ids else float("nan"),
            "difference": diff, "ci95": [lo, hi], "p_permutation": (extreme + 1) / (samples + 1) if ids else 1.0}


def compare_bertscore(first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]],
                      samples: int = 1000, seed: int = 3407) -> dict[str, Any]:
    """Two models' per-query BERTScore F1, paired by query id (compare_values on "f1")."""
    return compare_values(first, second, "f1", samples, seed)


def share_of_gain(base: Sequence[float], model: Sequence[float], reference: Sequence[float], samples: int = 1000,
                  seed: int = 3407) -> tuple[float, float, float]:
    """(share, 95% CI low, high) of the reference's gain over the base that a model keeps, on paired items:
    (mean base - mean model) / (mean base - mean reference), with losses (lower is better); 1 keeps all of
    it, 0 none. The CI resamples the items, the three values of an item together."""
    n = len(base)
    if not n or len(model) != n or len(reference) != n:
        return float("nan"), float("nan"), float("nan")

    def share(idx: Sequence[int]) -> float:
        gain = sum(base[i] - reference[i] for i in idx)
        return sum(base[i] - model[i] for i in idx) / gain if gain else float("nan")

    rng = random.Random(seed)
    draws = sorted(x for x in (share([rng.randrange(n) for _ in range(n)]) for _ in range(samples)) if x == x)
    if not draws:
        return share(range(n)), float("nan"), float("nan")
    return share(range(n)), draws[int(0.025 * len(draws))], draws[min(len(draws) - 1, int(0.975 * len(draws)))]


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with `dof` degrees of freedom (exact closed forms, no SciPy)."""
    if x <= 0:
        return 1.0
    half = x / 2
    if dof % 2 == 0:
        return math.exp(-half) * sum(half ** i / math.factorial(i) for i in range(dof // 2))
    return math.erfc(math.sqrt(half)) + math.exp(-half) * sum(half ** (i - 0.5) / math.gamma(i + 0.5)
                                                               for i in range(1, dof // 2 + 1))


def uniformity(counts: Sequence[int]) -> tuple[float, float]:
    """Pearson's chi-square statistic of counts against equal shares, and its p-value."""
    total, k = sum(counts), len(counts)
    if total == 0 or k < 2:
        return 0.0, 1.0
    expected = total / k
    statistic = sum((c - expected) ** 2 / expected for c in counts)
    return statistic, chi2_sf(statistic, k - 1)
