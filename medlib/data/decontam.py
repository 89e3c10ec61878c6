"""Decontamination: exact and normalised-text duplicates between a training mixture and the
evaluation sets, and long word n-grams they share. MCQ rows match on question + options (MedMCQA repeats
generic stems such as "All of the following are true except" with different options); dialogues match on the
first user turn against evaluation questions and held-out conversations.

N-gram overlap (13 words, as GPT-3's and Llama's contamination checks use) catches what a duplicate check
cannot: a question pasted inside a longer text, reworded options, a PubMedQA abstract quoted in a dialogue.
A training row overlaps an evaluation item when it holds at least `threshold` of the item's 13-grams (all of
them for an item shorter than 13 words: its whole normalised text)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

NGRAM = 13

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalise_text(text: str) -> str:
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def exact_key(record: dict[str, Any]) -> str:
    if "options" in record:
        return record["question"].strip() + "\x1f" + "\x1f".join(sorted(v.strip() for v in record["options"].values()))
    return next(m["content"].strip() for m in record["messages"] if m["role"] == "user")


def normalised_key(record: dict[str, Any]) -> str:
    if "options" in record:
        return normalise_text(record["question"]) + "|" + "|".join(sorted(normalise_text(v) for v in record["options"].values()))
    return normalise_text(next(m["content"] for m in record["messages"] if m["role"] == "user"))


def record_words(record: dict[str, Any]) -> list[str]:
    """All of a record's text as normalised words: question, context and options, or every message."""
    if "messages" in record:
        parts = [m["content"] for m in record["messages"]]
    else:
        parts = [record.get("question", ""), record.get("context", ""), *record.get("options", {}).values()]
    return normalise_text(" ".join(p for p in parts if isinstance(p, str))).split()


def ngrams(words: list[str], n: int = NGRAM) -> set[int]:
    """Hashes of the word n-grams (the whole text when it is shorter than n words)."""
    if len(words) < n:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


@dataclass
class EvalIndex:
    """Keys of every evaluation item, remembering which set each came from, and its 13-grams."""

    exact: dict[str, str] = field(default_factory=dict)
    normalised: dict[str, str] = field(default_factory=dict)
    question_only: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    items: list[tuple[str, str, int]] = field(default_factory=list)            # (set, item id, its n-gram count)
    gram_items: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))   # n-gram -> items

    def add(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        n = 0
        for record in records:
            n += 1
            self.exact.setdefault(exact_key(record), name)
            self.normalised.setdefault(normalised_key(record), name)
            if "options" in record:
                self.question_only.setdefault(normalise_text(record["question"]), name)
            grams = ngrams(record_words(record))
            for gram in grams:
                self.gram_items[gram].append(len(self.items))
            self.items.append((name, str(record.get("id", n)), len(grams)))
        self.sizes[name] = self.sizes.get(name, 0) + n

    def overlaps(self, record: dict[str, Any], threshold: float) -> list[tuple[str, str, float]]:
        """(set, item id, share of the item's n-grams in the record) of each item the record overlaps."""
        shared: dict[int, int] = defaultdict(int)
        for gram in ngrams(record_words(record)):
            for item in self.gram_items.get(gram, ()):
                shared[item] += 1
        found = []
        for item, count in shared.items():
            name, item_id, total = self.items[item]
            if total and count / total >= threshold:
                found.append((name, item_id, round(count / total, 3)))
        return found

    def match(self, record: dict[str, Any]) -> tuple[str, str] | None:
        """(kind, eval set) for a contaminated training record, else None."""
        if "options" in record:
            hit = self.exact.get(exact_key(record))
            if hit:
                return "exact", hit
            hit = self.normalised.get(normalised_key(record))
            return ("normalised", hit) if hit else None
        key = normalised_key(record)
        hit = self.normalised.get(key) or self.question_only.get(key)
        if hit:
            return ("exact" if exact_key(record) in self.exact else "normalised"), hit
        return None


def decontaminate(records: list[dict[str, Any]], index: EvalIndex, drop: bool = True,
                  ngram_threshold: float | None = 0.5) -> tuple[list[dict], dict[str, Any]]:
    """Return (kept records, report). With drop=False the overlaps are reported and kept. A record is a
    match when it duplicates an evaluation item (exact, normalised) or holds at least `ngram_threshold` of one
    item's 13-grams (None: no n-gram check). The report counts, per evaluation set, the training rows that
    match and the evaluation items they touch, and lists every match."""
    kept, found = [], []
    touched: dict[str, set[str]] = defaultdict(set)
    for record in records:
        hit = index.match(record)
        grams = index.overlaps(record, ngram_threshold) if ngram_threshold is not None else []
        if hit or grams:
            match = {"id": record["id"], "source": record["source"],
                     "match": hit[0] if hit else f"{NGRAM}-gram", "eval_set": hit[1] if hit else grams[0][0]}
            if grams:
                match["ngram_items"] = [{"eval_set": name, "id": item_id, "share": share} for name, item_id, share in grams[:10]]
                for name, item_id, _ in grams:
                    touched[name].add(item_id)
            found.append(match)
            if drop:
                continue
        kept.append(record)
    report = {
        "checked": len(records),
        "exact": sum(f["match"] == "exact" for f in found),
        "normalised": sum(f["match"] == "normalised" for f in found),
        "ngram": {"n": NGRAM, "threshold": ngram_threshold,
                  "rows": sum("ngram_items" in f for f in found),
                  "rows_ngram_only": sum(f["match"] == f"{NGRAM}-gram" for f in found),
                  "eval_items_by_set": {name: len(ids) for name, ids in sorted(touched.items())}},
        "dropped": len(found) if drop else 0,
        "by_eval_set": {name: sum(f["eval_set"] == name for f in found) for name in sorted({f["eval_set"] for f in found})},
        "matches": found,
    }
    return kept, report
