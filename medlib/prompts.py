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
        if record.get("context_parts"):  # PubMedQA: the abstract's sections joined with spaces, as they did
            context = " ".join(record["context_parts"])
        lines = [f"Context: {context}"] if context else []
        lines += [f"Question: {record['question']}", "Options:"]   # as is: they did not strip it
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
        cut.pop("context_parts", None)  # the cut context is what gets rendered
        if n_tokens(cut) <= max_length:
            return cut, field
    raise ValueError(f"does not fit max_length {max_length} tokens even with its {field} cut")


# Unsloth's "chatml" template (unsloth/chat_templates.py, CHAT_TEMPLATES["chatml"]), the one the authors'
# notebooks apply with get_chat_template(..., chat_template="chatml", map_eos_token=True). No BOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{'<|im_start|>user\n' + message['content'] + '<|im_end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>system\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CHATML_STOP = "<|im_end|>"
CHAT_TEMPLATES = ("native", "chatml")


def apply_chat_template_choice(tokenizer: Any, choice: str) -> Any:
    """The recipe's `prompt.chat_template` on a freshly loaded tokenizer (returns the tokenizer to use).

    native: the model's own template, unchanged. chatml: Unsloth's chatml template with `map_eos_token=True`,
    as the authors ran it: when "<|im_end|>" is not a token (Llama 3.1), the EOS token's text is renamed
    to "<|im_end|>" in the vocabulary, so "<|im_end|>" encodes to the EOS id and ends every turn;
    "<|im_start|>" stays plain text. A tokenizer that already has "<|im_end|>" (SmolLM2) only gets it as EOS.
    """
    if choice == "native":
        return tokenizer
    if choice != "chatml":
        raise ValueError(f"unknown chat template {choice!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    if CHATML_STOP not in tokenizer.get_vocab():
        old_eos = tokenizer.eos_token
        if not old_eos or not hasattr(tokenizer, "_tokenizer"):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token (or is not a fast "
                             "tokenizer) to map <|im_end|> onto")
        from tokenizers import Tokenizer

        renamed = Tokenizer.from_str(tokenizer._tokenizer.to_str().replace(f'"{old_eos}"', f'"{CHATML_STOP}"'))
        pad = CHATML_STOP if tokenizer.pad_token in (None, old_eos) else tokenizer.pad_token
        tokenizer = type(tokenizer)(tokenizer_object=renamed, eos_token=CHATML_STOP, pad_token=pad,
                                    bos_token=tokenizer.bos_token, name_or_path=tokenizer.name_or_path)
    else:
        tokenizer.eos_token = CHATML_STOP
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The one chat-template function: the tokenizer's own template, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
