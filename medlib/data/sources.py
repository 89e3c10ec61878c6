"""The source registry: every data source medlib reads, each in one entry, in the manner of
lm-evaluation-harness's task folders. An entry holds its Hub id, configs and splits; its local files and
derived splits; its normaliser (raw row -> MCQ record {id, source, question, context, options, answer} or
dialogue record {id, source, messages}); its kind; its display title; and the Table 3 column of the paper
it matches, if any. Loaders, evaluation sets, decontamination, Table 3, its figure and the CLI's choices all
read this registry; nothing else lists the sources.

Adding a source (an evaluation set, say): one `register(Source(...))` here, and one line under `sets:` in
the profile's eval.yaml (plus its name in `mcq.sets` to score it).

Local folder layout (the published file names; ../shared/data follows it):
  medqa/{train,test}.jsonl            MedQA US 4-option (jind11/MedQA phrases_no_exclude_*.jsonl)
  medmcqa/{train,validation}.json     dict id -> {question, options{A..D}, answer letter} (MIRAGE layout)
  medmcqa/{train,validation}.jsonl    or the Hub layout: {id, question, opa..opd, cop 0-3}
  pubmedqa/ori_pqal.json              PQA-L, dict PMID -> {QUESTION, CONTEXTS, LABELS, final_decision, ...}
  pubmedqa/ori_pqaa.json              PQA-A (artificial), same layout
  pubmedqa/test_ground_truth.json     the official 500-question test split, PMID -> yes/no/maybe
  mmlu_med/mmlu_med.json              MMLU medical subsets, MedMCQA layout
  notechat/notechat.jsonl             {data: clinical note, conversation: "Doctor: ...\\nPatient: ..."}
  chatdoctor/genmedgpt_5k.json        list of {instruction, input, output}
  chatdoctor/HealthCareMagic-100k.json, chatdoctor/iCliniq.json   same layout
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from medlib.prompts import LETTERS, PUBMEDQA_OPTIONS, index_to_letter, pubmedqa_label_to_letter

Normaliser = Callable[[Any, Any], dict]


@dataclass(frozen=True)
class Source:
    """One data source. `normaliser(split, turn_rule)` returns the function that turns a raw row into a record."""
    name: str
    kind: Literal["mcq", "dialogue"]
    title: str                                      # its name in tables and figures
    normaliser: Callable[[str, str], Normaliser]
    hub_id: str | None = None
    hub_splits: dict[str, tuple[str | None, str]] = field(default_factory=dict)   # split -> (config, Hub split)
    hub_subsets: tuple[str, ...] = ()               # configs read one by one and concatenated (MMLU's subjects)
    local_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> candidate files, first found wins
    derived_splits: dict[str, tuple[str, str]] = field(default_factory=dict)  # split -> (published split, rule)
    keyed_rows: bool = False                        # rows come as (id, row): dict-layout files, Hub rows with an id
    paper_column: str | None = None                 # the paper's Table 3 column this source is scored in, if any
    lm_eval_tasks: tuple[str, ...] = ()             # lm-evaluation-harness's tasks for the same set (its multimedqa group)
    default_split: str = "train"                    # what `medlib data inspect` shows unless told

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.local_files) | set(self.hub_splits) | set(self.derived_splits))


REGISTRY: dict[str, Source] = {}


def register(source: Source) -> Source:
    if source.name in REGISTRY:
        raise ValueError(f"source {source.name!r} is registered twice")
    REGISTRY[source.name] = source
    return source


def get_source(name: str) -> Source:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(REGISTRY)}") from None


def source_names(kind: str | None = None) -> list[str]:
    return [name for name, s in REGISTRY.items() if kind is None or s.kind == kind]


def paper_columns() -> list[str]:
    """The paper's Table 3 columns, in the registry's order (their average is the paper's Average)."""
    return [s.paper_column for s in REGISTRY.values() if s.paper_column]


def set_title(set_name: str, source: str) -> str:
    """A Table 3 column's title: the source's, and "(extra)" where the paper has no such column."""
    if source not in REGISTRY:
        return set_name
    spec = get_source(source)
    if spec.paper_column == set_name:
        return spec.title
    return f"{spec.title} ({set_name}, extra)" if set_name != spec.name else f"{spec.title} (extra)"


# ---------------------------------------------------------------- normalisers

def _options_from_list(choices: list[Any]) -> dict[str, str]:
    if not isinstance(choices, list):
        raise TypeError(f"choices must be a list, got {type(choices).__name__}")
    return {LETTERS[i]: c for i, c in enumerate(choices)}


def normalise_medqa(raw: dict, row: Any, split: str) -> dict:
    if "sent1" in raw:  # GBaker/MedQA-USMLE-4-options-hf (SWAG layout)
        options = {letter: raw[f"ending{i}"] for i, letter in enumerate("ABCD")}
        return {"id": str(raw.get("id") or f"medqa-{split}-{row}"), "source": "medqa", "question": raw["sent1"],
                "context": "", "options": options, "answer": index_to_letter(raw["label"])}
    options = raw["options"]
    if isinstance(options, list):  # some mirrors store [{"key": "A", "value": ...}]
        options = {o["key"]: o["value"] for o in options}
    answer = raw.get("answer_idx")
    if answer is not None and "answer" in raw and isinstance(options, dict) and options.get(answer) != raw["answer"]:
        raise ValueError(f"answer_idx {answer!r} does not point at the answer text {raw['answer']!r}")
    return {"id": str(raw.get("id") or f"medqa-{split}-{row}"), "source": "medqa", "question": raw["question"],
            "context": "", "options": options, "answer": answer}


def normalise_mcq_dict_layout(source: str) -> Callable[[Any, Any], dict]:
    """MIRAGE layout (id -> {question, options, answer letter}) or MedMCQA's Hub layout (opa..opd, cop 0-3)."""

    def normalise(raw: Any, row: Any) -> dict:
        key, value = raw
        if "opa" in value:
            cop = value["cop"]
            if cop == -1:
                raise ValueError("no answer label (cop = -1; MedMCQA's test split is unlabelled)")
            options = {letter: value[f"op{letter.lower()}"] for letter in "ABCD"}
            return {"id": str(value.get("id", key)), "source": source, "question": value["question"], "context": "",
                    "options": options, "answer": index_to_letter(cop)}
        if "choices" in value:  # cais/mmlu Hub layout
            return {"id": str(key), "source": source, "question": value["question"], "context": "",
                    "options": _options_from_list(value["choices"]), "answer": index_to_letter(value["answer"])}
        return {"id": str(key), "source": source, "question": value["question"], "context": "",
                "options": value["options"], "answer": value["answer"]}

    return normalise


def normalise_pubmedqa(raw: Any, row: Any) -> dict:
    key, value = raw
    if "QUESTION" in value:  # published ori_pqal.json / ori_pqaa.json layout
        question, contexts, labels = value["QUESTION"], value["CONTEXTS"], value.get("LABELS") or []
    else:  # Hub layout
        question, contexts, labels = value["question"], value["context"]["contexts"], value["context"].get("labels") or []
    if not isinstance(contexts, list):
        raise TypeError(f"CONTEXTS must be a list, got {type(contexts).__name__}")
    labels = list(labels) + [""] * (len(contexts) - len(labels))
    context = "\n".join(f"{lab.title()}: {txt}" if lab else txt for lab, txt in zip(labels, contexts))
    # context_parts: the abstract's sections as published; the authors' prompt joins them with spaces.
    return {"id": str(value.get("pubid", key)), "source": "pubmedqa", "question": question, "context": context,
            "context_parts": list(contexts),
            "options": dict(PUBMEDQA_OPTIONS), "answer": pubmedqa_label_to_letter(value["final_decision"])}




TURN_RULES = ("medlib", "authors")


def split_notechat_conversation(text: str, rule: str = "medlib") -> list[dict[str, str]]:
    """NoteChat's dialogue text as turns, by the authors' convert_conversation (their second-stage notebook,
    commit ed892cf): lines are stripped; empty lines and lines starting with "[" are skipped; a line starting
    with "Doctor:" is an assistant turn; any other line with ": " is a user turn with the speaker dropped
    (Patient, Patient’s Family, Nurse, ...); a line without ": " is a user turn as it is. Every line is its
    own turn: consecutive turns of one role are not merged.

    rule "authors" is theirs exactly: every "Doctor:" in a doctor's line is removed (`line.replace`), and an
    empty turn (a bare "Doctor:" line) is kept. rule "medlib" (medlib's correction) removes the "Doctor:"
    prefix only, so a doctor quoting "Doctor:" keeps the words, and drops empty turns, which teach nothing."""
    if not isinstance(text, str):
        raise TypeError(f"conversation must be a string, got {type(text).__name__}")
    if rule not in TURN_RULES:
        raise ValueError(f"unknown turn rule {rule!r}; choose one of {', '.join(TURN_RULES)}")
    turns: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("["):
            continue
        if line.startswith("Doctor:"):
            words = line.replace("Doctor:", "") if rule == "authors" else line[len("Doctor:"):]
            turns.append({"role": "assistant", "content": words.strip()})
        elif ": " in line:
            turns.append({"role": "user", "content": line.split(": ", 1)[1].strip()})
        else:
            turns.append({"role": "user", "content": line})
    return turns if rule == "authors" else [turn for turn in turns if turn["content"]]


def normalise_notechat(rule: str = "medlib") -> Callable[[Any, Any], dict]:
    def normalise(raw: dict, row: Any) -> dict:
        record = {"id": str(raw.get("id") or f"notechat-{row}"), "source": "notechat",
                  "messages": split_notechat_conversation(raw["conversation"], rule), "note": raw.get("data", "")}
        if rule == "authors":
            record["turn_rule"] = "authors"  # empty turns are kept, as the authors kept them
        return record

    return normalise


def normalise_chatdoctor(source: str) -> Callable[[Any, Any], dict]:
    """instruction/input/output (GenMedGPT, HealthCareMagic) or iCliniq's input/answer_icliniq.
    ChatDoctor's instruction line is replaced by our system prompt at training time."""

    def normalise(raw: dict, row: Any) -> dict:
        answer = raw["output"] if "output" in raw else raw["answer_icliniq"]
        return {"id": f"{source}-{row}", "source": source,
                "messages": [{"role": "user", "content": raw["input"]}, {"role": "assistant", "content": answer}]}

    return normalise



# --------------------------------------------------------------------------------------- the sources

MMLU_MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                         "medical_genetics", "professional_medicine")

# The authors' notebooks read MedQA's "-hf" variant (sent1, ending0..3, label); the other one (question,
# options, answer_idx) holds the same questions and normalises to the same records.
register(Source("medqa", "mcq", "MedQA", lambda split, rule: lambda raw, row: normalise_medqa(raw, row, split),
                hub_id="GBaker/MedQA-USMLE-4-options-hf", lm_eval_tasks=("medqa_4options",),
                hub_splits={"train": (None, "train"), "validation": (None, "validation"), "test": (None, "test")},
                local_files={"train": ("medqa/train.jsonl", "medqa/phrases_no_exclude_train.jsonl"),
                             "test": ("medqa/test.jsonl", "medqa/phrases_no_exclude_test.jsonl")},
                paper_column="medqa", default_split="test"))
register(Source("medmcqa", "mcq", "MedMCQA", lambda split, rule: normalise_mcq_dict_layout("medmcqa"),
                hub_id="openlifescienceai/medmcqa", lm_eval_tasks=("medmcqa",),
                hub_splits={"train": (None, "train"), "validation": (None, "validation"), "test": (None, "test")},
                local_files={"train": ("medmcqa/train.json", "medmcqa/train.jsonl"),
                             "validation": ("medmcqa/validation.json", "medmcqa/validation.jsonl", "medmcqa/dev.json")},
                derived_splits={"validation_train_standin": ("validation", "medmcqa_train_part"),
                                "validation_eval": ("validation", "medmcqa_eval_part")},
                keyed_rows=True, paper_column="medmcqa", default_split="validation"))
register(Source("pubmedqa", "mcq", "PubMedQA", lambda split, rule: normalise_pubmedqa,
                hub_id="qiaojin/PubMedQA", lm_eval_tasks=("pubmedqa",),
                hub_splits={"pqa_labeled": ("pqa_labeled", "train"), "pqa_artificial": ("pqa_artificial", "train")},
                local_files={"pqa_labeled": ("pubmedqa/ori_pqal.json",), "pqa_artificial": ("pubmedqa/ori_pqaa.json",)},
                derived_splits={"test": ("pqa_labeled", "in_test"), "pqal_train_standin": ("pqa_labeled", "not_in_test")},
                keyed_rows=True, paper_column="pubmedqa", default_split="pqa_labeled"))
register(Source("mmlu_med", "mcq", "MMLU-med", lambda split, rule: normalise_mcq_dict_layout("mmlu_med"),
                hub_id="cais/mmlu", hub_splits={"test": (None, "test")}, hub_subsets=MMLU_MEDICAL_SUBJECTS,
                lm_eval_tasks=tuple(f"mmlu_{subject}" for subject in MMLU_MEDICAL_SUBJECTS),
                local_files={"test": ("mmlu_med/mmlu_med.json",)}, keyed_rows=True, default_split="test"))
register(Source("notechat", "dialogue", "NoteChat", lambda split, rule: normalise_notechat(rule),
                hub_id="akemiH/NoteChat", hub_splits={"train": (None, "train")},
                local_files={"train": ("notechat/notechat.jsonl", "notechat/notechat.json")}))
register(Source("genmedgpt", "dialogue", "GenMedGPT-5k", lambda split, rule: normalise_chatdoctor("genmedgpt"),
                local_files={"train": ("chatdoctor/genmedgpt_5k.json",)},
                derived_splits={"train_standin": ("train", "not_chat_holdout"), "eval_holdout": ("train", "chat_holdout")}))
register(Source("healthcaremagic", "dialogue", "HealthCareMagic-100k",
                lambda split, rule: normalise_chatdoctor("healthcaremagic"),
                hub_id="lavita/ChatDoctor-HealthCareMagic-100k", hub_splits={"train": (None, "train")},
                local_files={"train": ("chatdoctor/HealthCareMagic-100k.json",)}))
register(Source("icliniq", "dialogue", "iCliniq", lambda split, rule: normalise_chatdoctor("icliniq"),
                hub_id="lavita/ChatDoctor-iCliniq", hub_splits={"train": (None, "train")},
                local_files={"train": ("chatdoctor/iCliniq.json",)}))
