"""Decontamination: exact and normalised-text duplicates between a training mixture and the
evaluation sets. MCQ rows match on question + options (MedMCQA repeats generic stems such as
"All of the following are true except" with different options); dialogues match on the first
user turn against evaluation questions and held-out conversations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

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


@dataclass
class EvalIndex:
    """Keys of every evaluation item, remembering which set each came from."""

    exact: dict[str, str] = field(default_factory=dict)
    normalised: dict[str, str] = field(default_factory=dict)
    question_only: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        n = 0
        for record in records:
            n += 1
            self.exact.setdefault(exact_key(record), name)
            self.normalised.setdefault(normalised_key(record), name)
            if "options" in record:
                self.question_only.setdefault(normalise_text(record["question"]), name)
        self.sizes[name] = self.sizes.get(name, 0) + n

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


def decontaminate(records: list[dict[str, Any]], index: EvalIndex, drop: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """Return (kept records, report). With drop=False the duplicates are reported and kept."""
    kept, found = [], []
    for record in records:
        hit = index.match(record)
        if hit:
            found.append({"id": record["id"], "source": record["source"], "match": hit[0], "eval_set": hit[1]})
            if drop:
                continue
        kept.append(record)
    report = {
        "checked": len(records),
        "exact": sum(f["match"] == "exact" for f in found),
        "normalised": sum(f["match"] == "normalised" for f in found),
        "dropped": len(found) if drop else 0,
        "by_eval_set": {name: sum(f["eval_set"] == name for f in found) for name in sorted({f["eval_set"] for f in found})},
        "matches": found,
    }
    return kept, report
