"""Cross-check of `loglik` against lm-evaluation-harness (dev dependency: lm-eval, requirements-dev.txt).

lm-eval's HFLM.loglikelihood scores (prompt text, option letter) pairs: the letter scoring of its
`medqa_4options` / `medmcqa` tasks, here on medlib's own prompt text (the training prompt) so the
two implementations see identical inputs and must pick the same letters.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence


def lm_eval_letter_predictions(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                               records: Sequence[Mapping[str, Any]], batch_size: int = 8) -> tuple[list[str], float]:
    """(letter lm-eval picks for each record, seconds lm-eval spent scoring)."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise ImportError("the cross-check needs lm-eval: pip install -r requirements-dev.txt") from exc

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=4096)
    requests, owners = [], []
    for i, (prompt_ids, record) in enumerate(zip(prompts, records)):
        context = tokenizer.decode(prompt_ids)  # the exact prompt medlib scored (after any context cut)
        for letter in record["options"]:
            requests.append(Instance(request_type="loglikelihood", doc={}, arguments=(context, letter), idx=len(requests)))
            owners.append((i, letter))
    started = time.perf_counter()
    results = lm.loglikelihood(requests)
    seconds = time.perf_counter() - started
    best: dict[int, tuple[float, str]] = {}
    for (i, letter), (loglik, _greedy) in zip(owners, results):
        if i not in best or loglik > best[i][0]:
            best[i] = (loglik, letter)
    return [best[i][1] for i in range(len(records))], seconds
