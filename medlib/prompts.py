"""Prompt templates, the MCQ letter mapping and the single chat-template function.

The same `record_to_messages` + `render_chat` pair is used for training, evaluation and chat,
so the model always sees the prompt it was trained on.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

# Default system prompt: the instruction of the paper's Figure 2 ("The instruction used for supervised
# fine-tuning in both stages"), verbatim; tests/test_eval.py checks it against the paper's text.
SYSTEM_PROMPT = (
    "You are a highly knowledgeable medical assistant with expertise in various medical domains. Your primary "
    "role is to provide accurate, evidence-based medical information and advice. Your responses should be "
    "grounded in the latest clinical guidelines and research, ensuring reliability and precision. When answering "
    "questions, consider the context and complexity of the query, and aim to provide the most relevant and "
    "correct answers."
)
SYSTEM_PROMPT_SOURCE = "Figure 2 of Athukoralage & Atapattu (2024), verbatim"


def effective_system_prompt(configured: str | None) -> str:
    """The one rule for a recipe's `prompt.system_prompt`: null or empty means SYSTEM_PROMPT."""
    return configured or SYSTEM_PROMPT


LETTERS = ("A", "B", "C", "D", "E")

# PubMedQA's three labels as MCQ options, both ways.
PUBMEDQA_LABEL_TO_LETTER = {"yes": "A", "no": "B", "maybe": "C"}
PUBMEDQA_LETTER_TO_LABEL = {v: k for k, v in PUBMEDQA_LABEL_TO_LETTER.items()}
PUBMEDQA_OPTIONS = {letter: label for label, letter in PUBMEDQA_LABEL_TO_LETTER.items()}

TARGET_STYLES = ("letter", "letter_text", "authors")
MCQ_FORMATS = ("medlib", "authors")
ANSWER_INSTRUCTION = "Answer with the letter of the correct option."


def pubmedqa_label_to_letter(label: str) -> str:
    key = str(label).strip().lower()
    if key not in PUBMEDQA_LABEL_TO_LETTER:
        raise ValueError(f"PubMedQA label {label!r} is not one of yes/no/maybe")
    return PUBMEDQA_LABEL_TO_LETTER[key]


def pubmedqa_letter_to_label(letter: str) -> str:
    key = str(letter).strip().upper()
    if key not in PUBMEDQA_LETTER_TO_LABEL:
        raise ValueError(f"PubMedQA letter {letter!r} is not one of A/B/C")
    return PUBMEDQA_LETTER_TO_LABEL[key]


def index_to_letter(index: int) -> str:
    """MedMCQA's Hub `cop` is 0-3; letters everywhere else."""
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index!r} is not an integer in 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def is_mcq(record: Mapping[str, Any]) -> bool:
    return "options" in record


def format_mcq_prompt(record: Mapping[str, Any], mcq_format: str = "medlib") -> str:
    """User turn of an MCQ record. medlib: optional abstract context, the question, options "A. text" and
    an instruction to answer with the letter. authors (their notebooks): "Context: …" (PubMedQA),
    "Question: …", "Options:" and "A) text" lines, no instruction."""
    context = record.get("context") or ""
    if mcq_format == "authors":
        lines = [f"Context: {context}"] if context else []
        lines += [f"Question: {record['question'].strip()}", "Options:"]
        lines += [f"{letter}) {text}" for letter, text in record["options"].items()]
        return "\n".join(lines)
    if mcq_format != "medlib":
        raise ValueError(f"unknown MCQ format {mcq_format!r}; choose one of {', '.join(MCQ_FORMATS)}")
    parts = []
    if context:
        parts.append(f"Context:\n{context}")
    parts.append(f"Question: {record['question'].strip()}")
    options = "\n".join(f"{letter}. {text}" for letter, text in record["options"].items())
    parts.append(f"Options:\n{options}")
    parts.append(ANSWER_INSTRUCTION)
    return "\n\n".join(parts)


def mcq_target(record: Mapping[str, Any], style: str = "letter") -> str:
    """Training target: the answer letter only (the paper's "answer key"), letter + option text, or the
    authors' "Answer: B) option text"."""
    letter = record["answer"]
    if style == "letter":
        return letter
    if style == "letter_text":
        return f"{letter}. {record['options'][letter]}"
    if style == "authors":
        return f"Answer: {letter}) {record['options'][letter]}"
    raise ValueError(f"unknown target style {style!r}; choose one of {', '.join(TARGET_STYLES)}")


def record_to_messages(
    record: Mapping[str, Any],
    system_prompt: str | None = SYSTEM_PROMPT,
    target_style: str = "letter",
    with_answer: bool = True,
    mcq_format: str = "medlib",
) -> list[dict[str, str]]:
    """Chat messages for an MCQ or dialogue record, system prompt first.

    with_answer=False drops the answer (MCQ) or the final assistant turn (dialogue): that is
    the prompt used for evaluation and generation.
    """
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if is_mcq(record):
        messages.append({"role": "user", "content": format_mcq_prompt(record, mcq_format)})
        if with_answer:
            messages.append({"role": "assistant", "content": mcq_target(record, target_style)})
        return messages
    turns = [dict(role=m["role"], content=m["content"]) for m in record["messages"] if m["role"] != "system"]
    if not with_answer and turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    return messages + turns


TRUNCATION_MARK = "[...] "


def fit_mcq_record(tokenizer: Any, record: Mapping[str, Any], n_tokens: Callable[[Mapping[str, Any]], int],
                   max_length: int) -> tuple[Mapping[str, Any], str | None]:
    """The record cut to fit max_length tokens as `n_tokens` counts them, and what was cut (None,
    "context" or "question"). Used for training (the whole conversation) and evaluation (the prompt).

    The context (PubMedQA's abstract) loses its start, so the system prompt, the question, the options,
    the answer and the end of the abstract (its results) stay. A record without context that is still
    too long (a rare long MedQA vignette) loses the start of its question instead. ValueError when even
    that cannot make it fit.
    """
    total = n_tokens(record)
    if total <= max_length:
        return record, None
    field = "context" if record.get("context") else "question"
    text_ids = tokenizer(record[field], add_special_tokens=False)["input_ids"]
    overflow = total - max_length
    for margin in (8, 32, 128):  # re-tokenising at the cut can shift a few tokens
        keep = len(text_ids) - overflow - margin
        if keep <= 0:
            break
        cut = dict(record, **{field: TRUNCATION_MARK + tokenizer.decode(text_ids[len(text_ids) - keep:]).lstrip()})
        if n_tokens(cut) <= max_length:
            return cut, field
    raise ValueError(f"does not fit max_length {max_length} tokens even with its {field} cut")


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The one chat-template function: the tokenizer's own template, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
