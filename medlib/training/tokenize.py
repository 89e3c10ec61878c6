"""Records -> token ids + assistant masks, through the one chat-template function.

SmolLM2's (and Llama 3.1's) chat template has no `{% generation %}` markers, so the tokenizer
cannot return an assistant mask itself. We render the conversation with `medlib.prompts.render_chat`
and find each assistant turn's characters by rendering prefixes: the text of messages[:i] with the
generation prompt ends exactly where the assistant's reply starts, and messages[:i+1] ends where it
stops (end-of-turn token included, so the model learns to stop). Tokens whose characters fall in
those spans get mask 1; everything else (system prompt, user turns, role headers) gets 0, so the
loss is on assistant tokens only, for MCQ answers and for every assistant turn of a dialogue.
TRL's SFTTrainer accepts such a pre-tokenised dataset (`input_ids` + `assistant_masks`) and turns the
mask into -100 labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from medlib.prompts import SYSTEM_PROMPT, fit_mcq_record, is_mcq, record_to_messages, render_chat


class TemplateError(ValueError):
    """The chat template does not render conversations prefix-consistently."""


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) of each assistant reply in that text])."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not text.startswith(before) or not text.startswith(through) or len(through) <= len(before):
            raise TemplateError(
                f"chat template of {getattr(tokenizer, 'name_or_path', '?')!r} is not prefix-consistent at message {i}; "
                "assistant-only masks cannot be derived from it"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_messages(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """input_ids and assistant_masks (1 = trained on) of one conversation, untruncated."""
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template already writes any BOS token; add_special_tokens=False avoids a second one.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    masks = []
    for start, end in enc["offset_mapping"]:
        inside = any(s <= start < e for s, e in spans) if end > start else False
        masks.append(1 if inside else 0)
    return {"input_ids": list(enc["input_ids"]), "assistant_masks": masks}


@dataclass
class TokenizeReport:
    """What happened to each split's records; written to the run metadata, nothing dropped silently."""

    records: int = 0
    kept: int = 0
    cut_to_fit: dict[str, int] = field(default_factory=dict)  # MCQ records whose context (or question) start was cut
    truncated: int = 0
    dropped_no_target: list[str] = field(default_factory=list)  # ids whose answer was cut off by truncation
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "kept": self.kept, "cut_to_fit": dict(self.cut_to_fit),
            "truncated": self.truncated,
            "dropped_no_target_after_truncation": len(self.dropped_no_target),
            "dropped_ids_first_20": self.dropped_no_target[:20],
            "tokens": self.tokens, "target_tokens": self.target_tokens,
        }


def tokenize_records(
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]],
    max_seq_length: int,
    system_prompt: str | None = SYSTEM_PROMPT,
    target_style: str = "letter",
    mcq_format: str = "medlib",
) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenise MCQ / dialogue records to at most max_seq_length tokens.

    An MCQ record that is too long loses the start of its context (PubMedQA's abstract), or of its
    question when it has none, so the question, the options and the answer are kept
    (medlib.prompts.fit_mcq_record, the rule evaluation uses too); the report counts the cuts. Other
    records keep their start. A record that still has no assistant token within max_seq_length cannot
    train anything; it is dropped and counted (ids listed in the report), never silently.
    """
    rows: list[dict[str, list[int]]] = []
    report = TokenizeReport()
    encode = lambda r: tokenize_messages(tokenizer, record_to_messages(  # noqa: E731
        r, system_prompt=system_prompt, target_style=target_style, mcq_format=mcq_format))
    for record in records:
        report.records += 1
        if is_mcq(record):
            try:
                record, cut = fit_mcq_record(tokenizer, record, lambda r: len(encode(r)["input_ids"]), max_seq_length)
            except ValueError:
                cut = None  # cannot fit even cut: truncated below, and dropped if the answer is lost
            if cut:
                report.cut_to_fit[cut] = report.cut_to_fit.get(cut, 0) + 1
        row = encode(record)
        if len(row["input_ids"]) > max_seq_length:
            report.truncated += 1
            row = {k: v[:max_seq_length] for k, v in row.items()}
        if not any(row["assistant_masks"]):
            report.dropped_no_target.append(str(record.get("id", report.records - 1)))
            continue
        report.kept += 1
        report.tokens += len(row["input_ids"])
        report.target_tokens += sum(row["assistant_masks"])
        rows.append(row)
    return rows, report
