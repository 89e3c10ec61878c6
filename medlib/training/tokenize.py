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

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from medlib.prompts import SYSTEM_PROMPT, fit_mcq_record, is_mcq, record_to_messages, render_chat

# trl<0.9's ConstantLengthDataset defaults, which the authors' SFTTrainer(packing=True) used.
CONSTANT_LENGTH_CHARS_PER_TOKEN = 3.6
CONSTANT_LENGTH_SEQUENCES = 1024


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
    loss_on: str = "assistant",
) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenise MCQ / dialogue records to at most max_seq_length tokens.

    An MCQ record that is too long loses the start of its context (PubMedQA's abstract), or of its
    question when it has none, so the question, the options and the answer are kept
    (medlib.prompts.fit_mcq_record, the rule evaluation uses too); the report counts the cuts. Other
    records keep their start. A record that still has no assistant token within max_seq_length cannot
    train anything; it is dropped and counted (ids listed in the report), never silently.
    loss_on="all" trains on every token (no assistant mask in the rows).
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on {loss_on!r} must be assistant or all")
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
        report.target_tokens += sum(row["assistant_masks"]) if loss_on == "assistant" else len(row["input_ids"])
        rows.append(row if loss_on == "assistant" else {"input_ids": row["input_ids"]})
    return rows, report


@dataclass
class PackReport:
    """What constant-length packing did to one split (written to the run metadata)."""

    records: int = 0
    buffers: int = 0
    tokens: int = 0
    rows: int = 0
    tokens_dropped: int = 0          # each buffer's last partial row, as trl<0.9 dropped it

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": "constant_length", "records": self.records, "buffers": self.buffers,
                "tokens": self.tokens, "rows": self.rows, "tokens_dropped_partial_rows": self.tokens_dropped}


def pack_constant_length(tokenizer: Any, records: Iterable[Mapping[str, Any]], seq_length: int, seed: int,
                         system_prompt: str | None = SYSTEM_PROMPT, target_style: str = "letter",
                         mcq_format: str = "medlib") -> tuple[list[dict[str, list[int]]], PackReport]:
    """The authors' packing (trl<0.9 `SFTTrainer(packing=True)` -> ConstantLengthDataset), loss on every token.

    Each record is rendered whole through the chat template (nothing cut), texts are gathered into
    buffers of about seq_length x 3.6 x 1,024 characters, each buffer is tokenised with the tokenizer's
    special tokens (Llama adds its BOS) and joined with EOS after every text, then cut into rows of
    exactly seq_length tokens; a buffer's last partial row is dropped (counted). A record can span two
    rows and attention crosses record boundaries (no position-id reset), as it did for the authors.
    The rows of each buffer are shuffled, as ConstantLengthDataset did; the authors' shuffle drew from
    the global Python RNG, ours from Random(seed), so row order within a buffer is not theirs.
    """
    report = PackReport()
    rng = random.Random(seed)
    max_chars = seq_length * CONSTANT_LENGTH_CHARS_PER_TOKEN * CONSTANT_LENGTH_SEQUENCES
    rows: list[dict[str, list[int]]] = []

    def flush(buffer: list[str]) -> None:
        if not buffer:
            return
        report.buffers += 1
        ids: list[int] = []
        for tokens in tokenizer(buffer, add_special_tokens=True, truncation=False)["input_ids"]:
            ids.extend(tokens + [tokenizer.eos_token_id])
        report.tokens += len(ids)
        chunk = [ids[i:i + seq_length] for i in range(0, len(ids), seq_length)]
        full = [c for c in chunk if len(c) == seq_length]
        report.tokens_dropped += len(ids) - seq_length * len(full)
        rng.shuffle(full)
        rows.extend({"input_ids": c} for c in full)

    buffer: list[str] = []
    chars = 0
    for record in records:
        report.records += 1
        text = render_chat(tokenizer, record_to_messages(record, system_prompt=system_prompt, target_style=target_style,
                                                         mcq_format=mcq_format))
        buffer.append(text)
        chars += len(text)
        if chars >= max_chars:
            flush(buffer)
            buffer, chars = [], 0
    flush(buffer)
    report.rows = len(rows)
    return rows, report
