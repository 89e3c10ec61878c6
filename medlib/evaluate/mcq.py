"""Multiple-choice accuracy (the paper's Table 3): `loglik` and `generate` scoring, answer parsing,
bootstrap confidence intervals.

The prompt is the training prompt: `record_to_messages(record, system_prompt, with_answer=False)`
rendered by `render_chat(..., add_generation_prompt=True)`; the model was trained to reply with
the answer letter right there.

- loglik: one forward pass per question (batched, sorted by length, left-padded); at the answer
  position compare the log-probabilities of the option letters' tokens; the highest wins. The tokens
  every prompt of a set starts with (chat template + system prompt) are run once and their key/value
  cache is reused by every batch (`prefix_cache`); the letter log-probs match the uncached ones to
  float rounding (tests/test_eval.py checks it).
- generate: greedy decoding and parsing of the reply (a letter, "answer is X", or an option's text,
  so PubMedQA's "maybe" counts as C). Unparseable replies score as wrong and are counted.
- both: a log-likelihood run whose other protocol (mcq.other_protocol) is greedy generation on every
  question reads the letters and the reply's first token from the same forward pass and only decodes
  the rest of the reply (`evaluate_loglik_and_greedy`); the replies are generate's.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medlib.config import EvalRecipe, McqSettings, RecipeError
from medlib.data.eval_sets import eval_set_origin, load_eval_set
from medlib.data.io import records_sha256, write_jsonl
from medlib.data.mixtures import seeded_subset
from medlib.data.sources import paper_columns
from medlib.data.validate import mcq_problem
from medlib.evaluate import common
from medlib.evaluate.stats import letter_diagnostics, uniformity
from medlib.evaluate.tables import write_table3
from medlib.prompts import LETTERS, fit_mcq_record, record_to_messages, render_chat

log = logging.getLogger(__name__)

METHODS = ("loglik", "generate")
PARSE_RULES = ("medlib", "authors")


def sampling_of(mcq: McqSettings) -> dict[str, Any]:
    """generate's decoding arguments: sampled as mcq.generation says, or {} (greedy)."""
    g = mcq.generation
    return {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p} if g.do_sample else {}


def settings_record(mcq: McqSettings, system_prompt: str | None, mcq_format: str) -> dict[str, Any]:
    """What results.json says about how questions were asked and scored (Table 3 prints it)."""
    return {**mcq.to_dict(), "system_prompt": system_prompt, "mcq_format": mcq_format,
            "max_new_tokens": mcq.generation.max_new_tokens, "sampling": sampling_of(mcq)}


# ---------------------------------------------------------------- items and prompts

def _render(tokenizer: Any, record: Mapping[str, Any], system_prompt: str | None, answer_cue: str = "",
            mcq_format: str = "medlib") -> str:
    messages = record_to_messages(record, system_prompt, with_answer=False, mcq_format=mcq_format)
    if answer_cue:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + answer_cue}
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, record: Mapping[str, Any], system_prompt: str | None,
                  max_length: int, answer_cue: str = "", mcq_format: str = "medlib") -> tuple[list[int], str | None]:
    """Prompt token ids and what was cut to fit max_length (None, "context" or "question"), by the
    same rule as training (medlib.prompts.fit_mcq_record)."""
    encode = lambda r: tokenizer(_render(tokenizer, r, system_prompt, answer_cue, mcq_format),  # noqa: E731
                                 add_special_tokens=False)["input_ids"]
    try:
        fitted, cut = fit_mcq_record(tokenizer, record, lambda r: len(encode(r)), max_length)
    except ValueError as exc:
        raise ValueError(f"prompt {exc}") from None
    return encode(fitted), cut


def letter_token_ids(tokenizer: Any, system_prompt: str | None = None) -> dict[str, int]:
    """Token id of each answer letter as it follows the generation prompt (as the training target does)."""
    probe = {"question": "?", "context": "", "options": {"A": "a", "B": "b"}, "answer": "A"}
    prompt = _render(tokenizer, probe, system_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out: dict[str, int] = {}
    for letter in LETTERS:
        ids = tokenizer(prompt + letter, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
            raise ValueError(f"the tokenizer merges the answer letter {letter!r} into the prompt's last token")
        out[letter] = ids[len(prompt_ids)]
    if len(set(out.values())) != len(out):
        raise ValueError(f"answer letters share first tokens: {out}")
    return out


# ---------------------------------------------------------------- answer parsing

_LEAD_LETTER = re.compile(r"^\W*(?:the\s+)?(?:correct\s+)?(?:answer|option)?\s*(?:is)?\s*[:\-]?\s*\(?([A-E])(?:\)|\.|:|,|\s|$)", re.I)
_ANSWER_IS = re.compile(r"(?:answer|option)\s*(?:is|:)\s*:?\s*\(?([A-E])\b")


def parse_answer(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a generated reply gives, or None when it cannot be read.

    Accepts a leading letter ("B", "(B)", "B. text", "Answer: B"), "the answer is B", or an option's
    text at the start of the reply or as the only option text in it (PubMedQA replies
    "yes"/"no"/"maybe" map to A/B/C, so a valid "maybe" is never scored as wrong).
    """
    reply = text.strip()
    if not reply:
        return None
    m = _LEAD_LETTER.match(reply)
    if m and m.group(1).upper() in options:
        # "A" alone is unambiguous; a lower-case "a" only when followed by the option text or punctuation.
        letter = m.group(1)
        if letter.isupper() or re.match(r"^\W*[a-e][\.\):]", reply):
            return letter.upper()
    m = _ANSWER_IS.search(reply)
    if m and m.group(1) in options:
        return m.group(1)
    norm_reply = " ".join(re.sub(r"[^a-z0-9]+", " ", reply.lower()).split())
    norm_opts = {k: " ".join(re.sub(r"[^a-z0-9]+", " ", v.lower()).split()) for k, v in options.items()}
    starts = [k for k, v in norm_opts.items() if v and (norm_reply == v or norm_reply.startswith(v + " "))]
    if len(starts) == 1:
        return starts[0]
    if len(starts) > 1:  # one option's text is a prefix of another's: the longest match
        return max(starts, key=lambda k: len(norm_opts[k]))
    inside = [k for k, v in norm_opts.items() if v and re.search(rf"\b{re.escape(v)}\b", norm_reply)]
    return inside[0] if len(inside) == 1 else None


def parse_answer_authors(text: str, letters: Iterable[str]) -> str | None:
    """The authors' evaluation rule, as their notebook cells run it (commit ed892cf): for each of the set's
    option letters in order, `if f"Answer: {letter}" in text: pred += letter`, over the decoded prompt and
    reply. So a letter counts once however often it appears ("Answer: B … Answer: B" is B), a letter outside
    the set is ignored, two different letters give a two-letter prediction that can never equal the gold
    letter (wrong), and no match is None (wrong, and counted as unparseable)."""
    found = "".join(letter for letter in letters if f"Answer: {letter}" in text)
    return found or None


# ---------------------------------------------------------------- statistics

def bootstrap_ci(correct: Sequence[bool] | Sequence[float], n_samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean."""
    import numpy as np

    values = np.asarray(correct, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_samples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_average_ci(per_set: Sequence[Sequence[bool]], n_samples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """CI of the unweighted average of several sets' accuracies, each set resampled on its own."""
    import numpy as np

    rng = np.random.default_rng(seed)
    reps = []
    for values in per_set:
        values = np.asarray(values, dtype=float)
        reps.append(values[rng.integers(0, values.size, size=(n_samples, values.size))].mean(axis=1))
    averages = np.mean(reps, axis=0)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(averages, tail)), float(np.percentile(averages, 100 - tail))


# ---------------------------------------------------------------- scoring

def _batches(order: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start:start + batch_size])


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return input_ids, mask


def _device(model: Any):
    return next(model.parameters()).device


MIN_SHARED_PREFIX = 16  # below this, a separate prefix forward costs about what it saves


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least its last token (the answer position)."""
    if len(prompts) < 2:
        return 0
    return min(len(os.path.commonprefix([list(p) for p in prompts])), min(len(p) for p in prompts) - 1)


def cached_prefix_length(prompts: Sequence[Sequence[int]], prefix_cache: bool = True) -> int:
    """The shared prefix loglik runs once: shared_prefix_length, or 0 when off or shorter than MIN_SHARED_PREFIX."""
    shared = shared_prefix_length(prompts) if prefix_cache else 0
    return shared if shared >= MIN_SHARED_PREFIX else 0


def loglik_letter_scores(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 8,
                         desc: str | None = "loglik", prefix_cache: bool = True) -> list[dict[str, float]]:
    """For each prompt, the log-probability of every answer letter's token at the answer position."""
    return [scores for scores, _ in letter_scores_and_replies(model, tokenizer, prompts, batch_size, desc, prefix_cache)]


def letter_scores_and_replies(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 8,
                              desc: str | None = "loglik", prefix_cache: bool = True,
                              max_new_tokens: int = 0) -> list[tuple[dict[str, float], str | None]]:
    """For each prompt, the answer letters' log-probabilities at the answer position and, with max_new_tokens,
    the greedy reply continued from the same forward pass (None without).

    The greedy reply's first token is the arg-max of the very logits the letters are read from, so both
    protocols share the prompt's forward pass and generation adds only its decode steps. The decode does what
    `model.generate(do_sample=False)` does with no logits processor: a finished row is fed the pad token and
    the attention mask grows by one per step (tests/test_eval.py checks the replies are generate's).

    With `prefix_cache`, the prefix all prompts share (at least MIN_SHARED_PREFIX tokens) is run once and
    each batch continues from a copy of its key/value cache; the rest of each prompt is left-padded
    after it, so pad tokens sit between prefix and suffix, masked out, with positions counted past them.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    letter_ids = letter_token_ids(tokenizer)
    ids_tensor = torch.tensor([letter_ids[L] for L in LETTERS])
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    out: list[tuple[dict[str, float], str | None] | None] = [None] * len(prompts)
    device = _device(model)
    shared = cached_prefix_length(prompts, prefix_cache)
    stop_ids = torch.tensor(end_token_ids(model, tokenizer), device=device)
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="q", disable=desc is None) as bar:
        prefix_kv = _prefix_key_values(model, prompts[0][:shared], device) if shared else None
        for batch in _batches(order, batch_size):
            input_ids, mask = _left_pad([prompts[i][shared:] for i in batch], tokenizer.pad_token_id)
            position_ids = shared + (mask.cumsum(-1) - 1).clamp(min=0)
            cache: Any = None
            if prefix_kv is not None:  # a fresh cache per batch: the forward appends to it
                mask = torch.cat([torch.ones(len(batch), shared, dtype=mask.dtype), mask], dim=1)
                cache = DynamicCache(ddp_cache_data=[(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1))
                                                     for k, v in prefix_kv])
            elif max_new_tokens:
                cache = DynamicCache()
            mask, position_ids = mask.to(device), position_ids.to(device)
            output = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids,
                           logits_to_keep=1, use_cache=cache is not None, past_key_values=cache)
            logits = output.logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)[:, ids_tensor.to(logits.device)].cpu()
            replies: list[str | None] = [None] * len(batch)
            if max_new_tokens:
                replies = _greedy_continue(model, tokenizer, logits, output.past_key_values, mask, position_ids[:, -1:],
                                           max_new_tokens, stop_ids)
            for row, i in enumerate(batch):
                out[i] = ({L: float(logprobs[row, j]) for j, L in enumerate(LETTERS)}, replies[row])
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a reply, as generate reads them (the model's generation config, else the tokenizer's)."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = tokenizer.eos_token_id if ids is None else ids
    return [ids] if isinstance(ids, int) else list(ids)


def greedy_needs_processors(model: Any) -> list[str]:
    """The model's generation-config settings that change a greedy reply (a repetition penalty, banned n-grams,
    a minimum length, suppressed tokens): the shared pass does not apply them, so generate must run instead."""
    config = getattr(model, "generation_config", None)
    checks = {"repetition_penalty": lambda v: v not in (None, 1.0), "no_repeat_ngram_size": lambda v: bool(v),
              "min_new_tokens": lambda v: bool(v), "min_length": lambda v: bool(v), "bad_words_ids": lambda v: bool(v),
              "suppress_tokens": lambda v: bool(v), "begin_suppress_tokens": lambda v: bool(v),
              "forced_bos_token_id": lambda v: v is not None, "forced_eos_token_id": lambda v: v is not None,
              "sequence_bias": lambda v: bool(v), "encoder_repetition_penalty": lambda v: v not in (None, 1.0)}
    return [name for name, changes in checks.items() if changes(getattr(config, name, None))]


def _greedy_continue(model: Any, tokenizer: Any, logits: Any, cache: Any, mask: Any, last_position: Any,
                     max_new_tokens: int, stop_ids: Any) -> list[str]:
    """Greedy decode from the prompt's last logits and key/value cache; the decoded replies, special tokens dropped."""
    import torch

    pad = tokenizer.pad_token_id
    token = logits.argmax(-1)
    tokens, done = [token], torch.isin(token, stop_ids)
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_position = last_position + 1
        output = model(input_ids=token[:, None], attention_mask=mask, position_ids=last_position, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        cache = output.past_key_values
        token = torch.where(done, torch.full_like(token, pad), output.logits[:, -1, :].argmax(-1))
        tokens.append(token)
        done = done | torch.isin(token, stop_ids)
    return tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True)


def _prefix_key_values(model: Any, prefix: Sequence[int], device: Any) -> list[tuple[Any, Any]]:
    """Per layer (keys, values) of one forward over `prefix`, batch dimension 1."""
    import torch

    cache = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, logits_to_keep=1).past_key_values
    return [(layer[0], layer[1]) for layer in cache]


def generate_replies(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 8,
                     max_new_tokens: int = 16, desc: str = "generate", **generate_kwargs: Any) -> list[str]:
    """Greedy (unless generate_kwargs say otherwise) replies to token-id prompts, batched and length-sorted."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    device = _device(model)
    kwargs = {"do_sample": False, **generate_kwargs}
    if not kwargs["do_sample"]:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="q") as bar:
        for batch in _batches(order, batch_size):
            input_ids, mask = _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id)
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
            new_tokens = generated[:, input_ids.shape[1]:]
            n_return = new_tokens.shape[0] // len(batch)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, i in enumerate(batch):
                out[i] = texts[row * n_return] if n_return == 1 else texts[row * n_return:(row + 1) * n_return]
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def evaluate_records(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], mcq: McqSettings,
                     system_prompt: str | None = None, mcq_format: str = "medlib", set_name: str = "set",
                     seed: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score one set as `mcq` says, each question asked with the evaluated model's system prompt and MCQ format;
    seed (default mcq.seed) seeds sampled replies and the bootstrap. Returns (summary, per-question predictions);
    every record appears in the predictions."""
    seed = mcq.seed if seed is None else seed
    started = time.perf_counter()
    encoded = _EncodedSet(tokenizer, records, mcq, system_prompt, mcq_format, set_name)
    if encoded.prompts and mcq.method == "loglik":
        scores = loglik_letter_scores(model, tokenizer, encoded.prompts, mcq.batch_size, desc=f"{set_name} loglik",
                                      prefix_cache=mcq.prefix_cache)
        encoded.read_letter_scores(scores)
    elif encoded.prompts:
        sampling = sampling_of(mcq)
        if sampling:
            import torch

            torch.manual_seed(seed)  # sampled replies repeat with the same seed
        replies = generate_replies(model, tokenizer, encoded.prompts, mcq.batch_size, mcq.generation.max_new_tokens,
                                   desc=f"{set_name} generate", **sampling)
        encoded.read_replies(replies, tokenizer, mcq.parse)
    return encoded.summary(mcq, seed, time.perf_counter() - started), encoded.predictions


def shares_one_pass(loglik: McqSettings, other: McqSettings | None, model: Any = None) -> bool:
    """Whether greedy generation can ride on log-likelihood's forward pass: the same prompts (one max_length and
    answer cue), greedy decoding, and no generation-config setting that changes a greedy reply."""
    return (other is not None and loglik.method == "loglik" and other.method == "generate" and not sampling_of(other)
            and (other.max_length, other.answer_cue) == (loglik.max_length, loglik.answer_cue)
            and not greedy_needs_processors(model))


def evaluate_loglik_and_greedy(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], loglik: McqSettings,
                               greedy: McqSettings, system_prompt: str | None = None, mcq_format: str = "medlib",
                               set_name: str = "set") -> tuple[tuple[dict[str, Any], list[dict[str, Any]]],
                                                               tuple[dict[str, Any], list[dict[str, Any]]]]:
    """One set by both protocols from one forward pass per question (letter_scores_and_replies): the
    (summary, predictions) of log-likelihood, then of greedy generation. Both summaries carry the shared
    pass's seconds and say so (`shared_pass`), so they are not to be added."""
    if not shares_one_pass(loglik, greedy, model):
        raise ValueError("log-likelihood and this generation protocol cannot share a forward pass (shares_one_pass)")
    started = time.perf_counter()
    by_loglik = _EncodedSet(tokenizer, records, loglik, system_prompt, mcq_format, set_name)
    by_reply = _EncodedSet(tokenizer, records, greedy, system_prompt, mcq_format, set_name)
    if by_loglik.prompts:
        scored = letter_scores_and_replies(model, tokenizer, by_loglik.prompts, loglik.batch_size,
                                           f"{set_name} loglik + greedy", loglik.prefix_cache, greedy.generation.max_new_tokens)
        by_loglik.read_letter_scores([scores for scores, _ in scored])
        by_reply.read_replies([reply for _, reply in scored], tokenizer, greedy.parse)
    seconds = time.perf_counter() - started
    return tuple((encoded.summary(settings, settings.seed, seconds) | {"shared_pass": "loglik + greedy generation"},
                  encoded.predictions) for encoded, settings in ((by_loglik, loglik), (by_reply, greedy)))  # type: ignore[return-value]


class _EncodedSet:
    """One set's questions as prompts: a prediction row per record (bad items named), the prompts of the scorable
    ones, then their scores or replies read into the rows, and the set's summary."""

    def __init__(self, tokenizer: Any, records: Sequence[Mapping[str, Any]], mcq: McqSettings, system_prompt: str | None,
                 mcq_format: str, set_name: str):
        self.records, self.method, self.set_name = records, mcq.method, set_name
        self.predictions: list[dict[str, Any]] = []
        self.prompts: list[list[int]] = []
        self.scorable: list[int] = []  # index into predictions
        self.bad: list[dict[str, str]] = []
        self.n_truncated = self.n_unparseable = 0
        for n, record in enumerate(records):
            rid = str(record.get("id", f"{set_name}-row{n}"))
            problem = mcq_problem(record)
            row: dict[str, Any] = {"id": rid, "set": set_name, "answer": record.get("answer"), "prediction": None,
                                   "correct": False, "status": "ok"}
            if problem is None:
                try:
                    ids, truncated = encode_prompt(tokenizer, record, system_prompt, mcq.max_length, mcq.answer_cue, mcq_format)
                except ValueError as exc:
                    problem = str(exc)
                else:
                    self.n_truncated += truncated is not None
                    row["truncated"] = truncated
                    row["prompt_tokens"] = len(ids)
                    self.prompts.append(ids)
                    self.scorable.append(len(self.predictions))
            if problem is not None:
                row["status"] = f"bad item: {problem}"
                self.bad.append({"id": rid, "reason": problem})
            self.predictions.append(row)

    def read_letter_scores(self, scores: Sequence[Mapping[str, float]]) -> None:
        for idx, letter_scores in zip(self.scorable, scores, strict=True):
            row = self.predictions[idx]
            allowed = {L: letter_scores[L] for L in self.records[idx]["options"]}
            row["prediction"] = max(allowed, key=allowed.get)
            row["logprobs"] = {L: round(v, 4) for L, v in allowed.items()}
            row["gold_logprob"] = letter_scores.get(row["answer"])
            row["correct"] = row["prediction"] == row["answer"]

    def read_replies(self, replies: Sequence[str], tokenizer: Any, parse: str) -> None:
        for idx, prompt, reply in zip(self.scorable, self.prompts, replies, strict=True):
            row = self.predictions[idx]
            row["reply"] = reply
            options = self.records[idx]["options"]
            if parse == "medlib":
                row["prediction"] = parse_answer(reply, options)
            else:  # theirs reads the decoded prompt and reply together, special tokens kept
                row["prediction"] = parse_answer_authors(tokenizer.decode(prompt) + reply, options)
            if row["prediction"] is None:
                row["status"] = "unparseable"
                self.n_unparseable += 1
            row["correct"] = row["prediction"] == row["answer"]

    def summary(self, mcq: McqSettings, seed: int, seconds: float) -> dict[str, Any]:
        rows = [self.predictions[i] for i in self.scorable]
        correct = [row["correct"] for row in rows]
        accuracy = sum(correct) / len(correct) if correct else float("nan")
        lo, hi = bootstrap_ci(correct, mcq.bootstrap_samples, seed) if correct else (float("nan"),) * 2
        summary = {
            "set": self.set_name, "method": mcq.method, "n_total": len(self.records), "n_scored": len(rows),
            "n_correct": sum(correct), "accuracy": accuracy, "ci95": [lo, hi],
            "n_bad": len(self.bad), "bad_items": self.bad,
            "n_truncated": self.n_truncated, "max_length": mcq.max_length,
            "cached_prefix_tokens": cached_prefix_length(self.prompts, mcq.prefix_cache) if mcq.method == "loglik" else 0,
            "seconds": round(seconds, 2), "diagnostics": letter_diagnostics(rows),
        }
        if mcq.method == "loglik" and rows:  # continuous: moves where accuracy at 135M parameters cannot
            summary["gold_logprob_mean"] = sum(row["gold_logprob"] for row in rows) / len(rows)
        if mcq.method == "generate":
            summary["n_unparseable"] = self.n_unparseable
            summary["unparseable_share"] = self.n_unparseable / len(rows) if rows else float("nan")
        summary["questions_per_second"] = round(len(rows) / summary["seconds"], 3) if summary["seconds"] else None
        return summary


# ---------------------------------------------------------------- position bias

def cyclic_permutations(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The question under each cyclic shift of its option texts over the same letters, the gold letter moved
    with its text: the first is the question as published. Over the shifts, the gold answer sits once at every
    position, so a model that knows the answer is right under all of them and a model that likes a position is not."""
    letters = list(record["options"])
    texts = [record["options"][letter] for letter in letters]
    gold = letters.index(record["answer"])
    return [{**record, "options": dict(zip(letters, texts[k:] + texts[:k])), "answer": letters[(gold - k) % len(letters)],
             "permutation": k} for k in range(len(letters))]


def position_bias(records: Sequence[Mapping[str, Any]], score: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Every question under every cyclic permutation of its options. score(permuted records of one question) ->
    one {letter: score} per permutation (one batched pass per question). Reports the accuracy averaged over the
    permutations, the share of questions right under all of them, the share of answers at each position against
    an equal share, and Pearson's chi-square test of that spread (each answer counted as one observation)."""
    answered: Counter = Counter()
    right, all_right, n_perm = 0, 0, 0
    for record in records:
        permuted = cyclic_permutations(record)
        scores = score(permuted)
        correct = []
        for row, letter_scores in zip(permuted, scores):
            allowed = {letter: letter_scores[letter] for letter in row["options"]}
            predicted = max(allowed, key=allowed.get)
            answered[predicted] += 1
            correct.append(predicted == row["answer"])
        right += sum(correct)
        all_right += all(correct)
        n_perm += len(permuted)
    letters = sorted({letter for r in records for letter in r["options"]})
    statistic, p = uniformity([answered[letter] for letter in letters])
    return {"questions": len(records), "answers": n_perm,
            "accuracy_over_permutations": right / n_perm if n_perm else float("nan"),
            "right_under_all": all_right / len(records) if records else float("nan"),
            "position_share": {letter: answered[letter] / n_perm for letter in letters} if n_perm else {},
            "equal_share": 1 / len(letters) if letters else float("nan"), "chi2": round(statistic, 3), "p": p,
            "position_biased": p < alpha}


def loglik_scorer(model: Any, tokenizer: Any, mcq: McqSettings, system_prompt: str | None, mcq_format: str):
    """score() for position_bias: the letters' log-probabilities of a question's permutations, one batch."""
    def score(permuted: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        prompts = [encode_prompt(tokenizer, r, system_prompt, mcq.max_length, mcq.answer_cue, mcq_format)[0]
                   for r in permuted]
        return loglik_letter_scores(model, tokenizer, prompts, len(prompts), desc=None, prefix_cache=mcq.prefix_cache)
    return score


# ---------------------------------------------------------------- a whole run

def run_mcq(recipe: EvalRecipe, out_dir: str | Path, adapter: Any = None, *, label: str | None = None,
            write_tables: bool = True, loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Evaluate the recipe's base model (+ an optional adapter or run folder) on its MCQ sets; write
    predictions and results.json in <out_dir>/mcq/<label>/, then table3. Returns the results dict.
    `loaded=(model, tokenizer)` reuses an already loaded model."""
    evaluated = common.EvaluatedModel.of(recipe, adapter, label)
    m = recipe.mcq
    if m.runs < 1 or (m.runs > 1 and not (m.method == "generate" and m.generation.do_sample)):
        raise RecipeError(f"{recipe.meta.recipe_file}: mcq.runs is {m.runs}; more than one run needs sampled generation "
                          "(mcq.method=generate, mcq.generation.do_sample=true), and at least one is needed")
    unknown = [name for name in m.sets if name not in recipe.sets]
    if unknown:
        raise RecipeError(f"{recipe.meta.recipe_file}: mcq.sets names {', '.join(unknown)}, which the recipe's sets: "
                          f"section does not define (known: {', '.join(recipe.sets)})")
    run_dir = evaluated.folder(out_dir, "mcq")
    folders = common.eval_folders(recipe)
    records_by_set = {name: seeded_subset(load_eval_set(recipe.sets[name], folders, recipe.data.hub, name,
                                                        hub_mirror=recipe.data.hub_mirror),
                                          m.limit or None, m.sample_seed)
                      for name in m.sets}  # load every set first: a bad set fails before the model loads
    set_identity = {name: {"origin": eval_set_origin(recipe.sets[name], folders, recipe.data.hub_mirror),
                           "content_sha256": records_sha256(records_by_set[name]), "n_questions": len(records_by_set[name])}
                    for name in m.sets}
    started = time.perf_counter()
    lm, tokenizer, chain = evaluated.load(loaded)
    load_seconds = time.perf_counter() - started

    results: dict[str, Any] = {
        "kind": "mcq", **evaluated.identity(lm, chain),
        "settings": settings_record(m, evaluated.system_prompt, evaluated.mcq_format),
        "limit_per_set": m.limit, "sample_seed": m.sample_seed,
        "sets_source": {name: {**recipe.sets[name].to_dict(), **set_identity[name]} for name in m.sets},
        "data_dir": str(folders[0]) if folders[0] else None,
        "environment": common.environment(), "load_seconds": round(load_seconds, 2), "sets": {},
    }
    correct_by_set: dict[str, list[float]] = {}
    other, other_correct = other_protocol_settings(m), {}
    if other is not None:
        results["other_protocol"] = {"settings": settings_record(other, evaluated.system_prompt, evaluated.mcq_format),
                                     "limit_per_set": m.other_protocol or m.limit, "sets": {}}
    for name, records in records_by_set.items():
        log.info("%s: %d questions (%s%s)", name, len(records), m.method, f", {m.runs} runs" if m.runs > 1 else "")
        runs, by_other = [], None
        one_pass = m.runs == 1 and shares_one_pass(m, other, lm) and len(seeded_subset(records, m.other_protocol or None,
                                                                                     m.sample_seed)) == len(records)
        for k in range(m.runs):  # sampled runs differ only by their seed
            if one_pass:  # greedy generation on every question rides on the log-likelihood pass
                (summary, predictions), by_other = evaluate_loglik_and_greedy(lm, tokenizer, records, m, other,
                                                                              evaluated.system_prompt, evaluated.mcq_format, name)
            else:
                summary, predictions = evaluate_records(lm, tokenizer, records, m, evaluated.system_prompt,
                                                        evaluated.mcq_format, name, seed=m.seed + k)
            predictions_file = run_dir / (f"predictions_{name}.jsonl" if k == 0 else f"predictions_{name}_run{k + 1}.jsonl")
            write_jsonl(predictions_file, predictions)
            summary["predictions_file"] = str(predictions_file)
            runs.append((summary, [row["correct"] for row in predictions if not row["status"].startswith("bad item")]))
        summary, correct = runs[0] if m.runs == 1 else mean_of_runs(runs, m)
        if m.position_bias is not None:  # log-likelihood under every cyclic permutation, whatever the method
            scorable = [r for r in records if mcq_problem(r) is None]
            subset = seeded_subset(scorable, m.position_bias or None, m.sample_seed)
            summary["position_bias"] = position_bias(subset, loglik_scorer(lm, tokenizer, m, evaluated.system_prompt,
                                                                           evaluated.mcq_format))
        results["sets"][name] = summary
        correct_by_set[name] = correct
        if other is not None:  # the same model by the other protocol, on a seeded subset of the same questions
            other_summary, other_predictions = by_other or evaluate_records(
                lm, tokenizer, seeded_subset(records, m.other_protocol or None, m.sample_seed), other,
                evaluated.system_prompt, evaluated.mcq_format, name)
            other_file = run_dir / f"predictions_{name}_{other.method}.jsonl"
            write_jsonl(other_file, other_predictions)
            results["other_protocol"]["sets"][name] = {**other_summary, "predictions_file": str(other_file)}
            other_correct[name] = [row["correct"] for row in other_predictions if not row["status"].startswith("bad item")]
        log.info("%s: accuracy %.3f [%.3f, %.3f] over %d (bad %d, truncated %d)", name, summary["accuracy"],
                 *summary["ci95"], summary["n_scored"], summary["n_bad"], summary["n_truncated"])
    if other is not None:
        results["other_protocol"]["average_paper_sets"] = average_of(other_correct, paper_columns(), m) \
            if all(name in m.sets for name in paper_columns()) else None
    results["average"] = average_of(correct_by_set, m.sets, m)
    results["average_paper_sets"] = average_of(correct_by_set, paper_columns(), m) \
        if all(s in m.sets for s in paper_columns()) else None
    results["seconds"] = round(time.perf_counter() - started, 2)
    common.write_json(run_dir / "results.json", results)
    if write_tables:
        results["table3"] = [str(p) for p in write_table3(out_dir=Path(out_dir))]
    return results


def other_protocol_settings(mcq: McqSettings) -> McqSettings | None:
    """The settings of the protocol a run is also scored by (mcq.other_protocol): log-likelihood beside a
    generation protocol, or generation (as mcq.generation says) beside log-likelihood; None when off."""
    if mcq.other_protocol is None:
        return None
    return mcq.replace(method="generate" if mcq.method == "loglik" else "loglik", runs=1, other_protocol=None,
                       position_bias=None)


def mean_of_runs(runs: Sequence[tuple[dict[str, Any], list[bool]]], mcq: McqSettings) -> tuple[dict[str, Any], list[float]]:
    """Several sampled runs of one set as one cell: the mean accuracy ± its SD over runs, and a bootstrap CI
    over questions of each question's share of runs answered right. The first run's predictions file stays
    the set's (paired comparisons read it); every run's file and accuracy are listed."""
    import statistics

    accuracies = [summary["accuracy"] for summary, _ in runs]
    per_question = [sum(c) / len(c) for c in zip(*(correct for _, correct in runs))]
    summary = dict(runs[0][0])
    summary.update({
        "accuracy": statistics.fmean(accuracies), "accuracy_sd": statistics.stdev(accuracies),
        "ci95": list(bootstrap_ci(per_question, mcq.bootstrap_samples, mcq.seed)),
        "n_correct": sum(s["n_correct"] for s, _ in runs) / len(runs),
        "runs": [{"seed": mcq.seed + k, "accuracy": s["accuracy"], "n_correct": s["n_correct"],
                  "unparseable_share": s.get("unparseable_share"), "predictions_file": s["predictions_file"]}
                 for k, (s, _) in enumerate(runs)],
        "seconds": round(sum(s["seconds"] for s, _ in runs), 2),
    })
    if "unparseable_share" in summary:
        summary["unparseable_share"] = statistics.fmean(s["unparseable_share"] for s, _ in runs)
    return summary, per_question


def average_of(correct_by_set: Mapping[str, Sequence[bool]], names: Sequence[str], mcq: McqSettings) -> dict[str, Any] | None:
    """Unweighted mean of the sets' accuracies, with a bootstrap CI that resamples each set."""
    names = [n for n in names if correct_by_set.get(n)]
    if not names:
        return None
    per_set = [correct_by_set[n] for n in names]
    lo, hi = bootstrap_average_ci(per_set, mcq.bootstrap_samples, mcq.seed)
    return {"sets": list(names), "accuracy": sum(sum(c) / len(c) for c in per_set) / len(per_set), "ci95": [lo, hi]}
