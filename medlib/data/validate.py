"""Record validation. Strict mode raises a DataError naming file, row/id and reason; lenient mode
skips the row and records it, so the manifest can say what was dropped and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from medlib.prompts import LETTERS

ROLES = ("user", "assistant")


class DataError(ValueError):
    def __init__(self, file: str | Path, row: Any, reason: str):
        self.file, self.row, self.reason = str(file), row, reason
        super().__init__(f"{file}: {row}: {reason}")


def mcq_problem(record: Mapping[str, Any]) -> str | None:
    """The reason an MCQ record is unusable, or None."""
    if not isinstance(record.get("id"), str) or not record["id"]:
        return "id must be a non-empty string"
    question = record.get("question")
    if not isinstance(question, str):
        return f"question must be a string, got {type(question).__name__}"
    if not question.strip():
        return "empty question"
    if not isinstance(record.get("context", ""), str):
        return "context must be a string"
    options = record.get("options")
    if not isinstance(options, Mapping):
        return f"options must be a mapping letter->text, got {type(options).__name__}"
    if len(options) < 2:
        return f"fewer than 2 options ({len(options)})"
    bad_keys = [k for k in options if k not in LETTERS]
    if bad_keys:
        return f"option keys {bad_keys} are not letters {'/'.join(LETTERS)}"
    for letter, text in options.items():
        if not isinstance(text, str) or not text.strip():
            return f"option {letter} is empty or not a string"
    answer = record.get("answer")
    if not isinstance(answer, str):
        return f"answer must be a letter string, got {type(answer).__name__}"
    if answer not in options:
        return f"answer {answer!r} is not among the options {list(options)}"
    return None


def dialogue_problem(record: Mapping[str, Any]) -> str | None:
    if not isinstance(record.get("id"), str) or not record["id"]:
        return "id must be a non-empty string"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"message {i} is not a mapping"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}, expected user or assistant"
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message.get('role')}) is not a string"
        if not message["content"].strip() and record.get("turn_rule") != "authors":  # the authors kept empty turns
            return f"message {i} ({message.get('role')}) is empty"
    roles = {m["role"] for m in messages}
    if roles != set(ROLES):
        return "a dialogue needs at least one user and one assistant turn"
    return None


def record_problem(record: Mapping[str, Any]) -> str | None:
    return mcq_problem(record) if "options" in record else dialogue_problem(record)


@dataclass
class ValidationReport:
    """Rows skipped in lenient mode, with their reasons (strict mode raises instead)."""

    skipped: list[dict[str, Any]] = field(default_factory=list)

    def add(self, file: str, row: Any, record_id: Any, reason: str) -> None:
        self.skipped.append({"file": file, "row": row, "id": record_id, "reason": reason})

    def counts(self) -> dict[str, int]:
        return dict(Counter(s["reason"].split(" (")[0] for s in self.skipped))

    def extend(self, other: "ValidationReport") -> None:
        self.skipped.extend(other.skipped)


def validated(
    rows: Iterable[tuple[Any, Any]],
    file: str | Path,
    strict: bool,
    report: ValidationReport,
    normalise,
) -> Iterator[dict[str, Any]]:
    """Normalise and check each (row label, raw row); unique ids per file. A normaliser raises
    ValueError/KeyError/TypeError for rows it cannot read; those are treated like invalid rows."""
    seen: set[str] = set()
    for row, raw in rows:
        try:
            record = normalise(raw, row)
            problem = record_problem(record)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            record, problem = None, f"unreadable row ({type(exc).__name__}: {exc})"
        record_id = record.get("id") if isinstance(record, dict) else None
        if problem is None and record_id in seen:
            problem = f"duplicate id {record_id!r}"
        if problem is not None:
            if strict:
                raise DataError(file, f"row {row}" + (f" (id {record_id})" if record_id else ""), problem)
            report.add(str(file), row, record_id, problem)
            continue
        seen.add(record_id)
        yield record
