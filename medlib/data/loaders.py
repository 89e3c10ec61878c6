"""Loaders: every source, from the Hugging Face Hub or a local folder of the published files,
normalised to MCQ records {id, source, question, context, options, answer} or dialogue records
{id, source, messages}.

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

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from medlib.data.io import iter_jsonl, read_json, stable_fraction
from medlib.data.validate import DataError, ValidationReport, validated
from medlib.paths import PACKAGE_DIR, cache_dir, default_data_dir, resolve
from medlib.prompts import LETTERS, PUBMEDQA_OPTIONS, index_to_letter, pubmedqa_label_to_letter

log = logging.getLogger(__name__)

SAMPLES_DIR = PACKAGE_DIR / "samples"

# Hub ids and configs, with the split names each dataset publishes.
HUB = {
    # The authors' notebooks read the "-hf" variant (sent1, ending0..3, label); the other one
    # (question, options, answer_idx) holds the same questions and normalises to the same records.
    "medqa": {"id": "GBaker/MedQA-USMLE-4-options-hf",
              "splits": {"train": (None, "train"), "validation": (None, "validation"), "test": (None, "test")}},
    "medmcqa": {"id": "openlifescienceai/medmcqa",
                "splits": {"train": (None, "train"), "validation": (None, "validation"), "test": (None, "test")}},
    "pubmedqa": {"id": "qiaojin/PubMedQA",
                 "splits": {"pqa_labeled": ("pqa_labeled", "train"), "pqa_artificial": ("pqa_artificial", "train")}},
    "mmlu_med": {"id": "cais/mmlu", "splits": {"test": (None, "test")}},
    "notechat": {"id": "akemiH/NoteChat", "splits": {"train": (None, "train")}},
    "healthcaremagic": {"id": "lavita/ChatDoctor-HealthCareMagic-100k", "splits": {"train": (None, "train")}},
    "icliniq": {"id": "lavita/ChatDoctor-iCliniq", "splits": {"train": (None, "train")}},
}
MMLU_MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                         "medical_genetics", "professional_medicine")

LOCAL_FILES = {
    ("medqa", "train"): ["medqa/train.jsonl", "medqa/phrases_no_exclude_train.jsonl"],
    ("medqa", "test"): ["medqa/test.jsonl", "medqa/phrases_no_exclude_test.jsonl"],
    ("medmcqa", "train"): ["medmcqa/train.json", "medmcqa/train.jsonl"],
    ("medmcqa", "validation"): ["medmcqa/validation.json", "medmcqa/validation.jsonl", "medmcqa/dev.json"],
    ("pubmedqa", "pqa_labeled"): ["pubmedqa/ori_pqal.json"],
    ("pubmedqa", "pqa_artificial"): ["pubmedqa/ori_pqaa.json"],
    ("mmlu_med", "test"): ["mmlu_med/mmlu_med.json"],
    ("notechat", "train"): ["notechat/notechat.jsonl", "notechat/notechat.json"],
    ("genmedgpt", "train"): ["chatdoctor/genmedgpt_5k.json"],
    ("healthcaremagic", "train"): ["chatdoctor/HealthCareMagic-100k.json"],
    ("icliniq", "train"): ["chatdoctor/iCliniq.json"],
}
PUBMEDQA_TEST_FILE = "pubmedqa/test_ground_truth.json"

# The local profile's stand-ins (see data_cards/local_standins.md). The parts are fixed by a hash
# of each row's id, so they never depend on file order, seeds or recipe settings.
MEDMCQA_STANDIN_FRACTION = 0.24  # of MedMCQA validation goes to training (1,076 of the 4,183 rows)
CHAT_EVAL_HOLDOUT = 50           # GenMedGPT-5k conversations kept for the BERTScore evaluation

# Splits derived from published ones: name -> (source, base split, predicate(record, context)).
DERIVED_SPLITS = {
    ("pubmedqa", "test"): ("pqa_labeled", "in_test"),
    ("pubmedqa", "pqal_train_standin"): ("pqa_labeled", "not_in_test"),
    ("medmcqa", "validation_train_standin"): ("validation", "medmcqa_train_part"),
    ("medmcqa", "validation_eval"): ("validation", "medmcqa_eval_part"),
    ("genmedgpt", "train_standin"): ("train", "not_chat_holdout"),
    ("genmedgpt", "eval_holdout"): ("train", "chat_holdout"),
}

SOURCES = ("medqa", "medmcqa", "pubmedqa", "mmlu_med", "notechat", "genmedgpt", "healthcaremagic", "icliniq")
DIALOGUE_SOURCES = ("notechat", "genmedgpt", "healthcaremagic", "icliniq")


@dataclass
class LoadResult:
    source: str
    split: str
    origin: str  # the file read, or hub:<id>[/<config>]:<split>
    records: list[dict[str, Any]]
    report: ValidationReport = field(default_factory=ValidationReport)
    rows_read: int = 0

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "split": self.split, "origin": self.origin, "rows_read": self.rows_read,
                "rows_valid": len(self.records), "skipped": self.report.counts()}


# ---------------------------------------------------------------- normalisers (one per source)

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


# ---------------------------------------------------------------- raw rows: local files and the Hub

def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """None -> the default shared data folder; 'samples' (or 'samples/<sub>') -> the small sample files
    shipped in medlib (samples/hub: the Hub-shaped fixtures)."""
    if data_dir is None:
        return default_data_dir()
    if str(data_dir) == "samples":
        return SAMPLES_DIR
    if str(data_dir).startswith("samples/"):
        return SAMPLES_DIR / str(data_dir)[len("samples/"):]
    return resolve(data_dir)


def local_file(source: str, split: str, data_dir: str | Path) -> Path:
    data_dir = resolve_data_dir(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist (pass --data-dir, or --data-dir samples)")
    candidates = LOCAL_FILES.get((source, split))
    if candidates is None:
        known = sorted({f"{s}/{sp}" for s, sp in LOCAL_FILES} | {f"{s}/{sp}" for s, sp in DERIVED_SPLITS})
        raise DataError(data_dir, f"{source}/{split}", f"unknown source/split; known: {', '.join(known)}")
    for candidate in candidates:
        if (data_dir / candidate).exists():
            return data_dir / candidate
    raise FileNotFoundError(f"{source}/{split}: none of {candidates} exists under {data_dir}")


def _rows_from_file(path: Path, source: str) -> Iterator[tuple[Any, Any]]:
    """(row label, raw row). Dict files give (key, value) pairs; lists and JSONL give (index/line, obj)."""
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            yield (f"line {lineno}", (obj.get("id", lineno), obj) if source in ("medmcqa", "mmlu_med", "pubmedqa") else obj)
        return
    data = read_json(path)
    if isinstance(data, dict):
        for key, value in data.items():
            yield key, (key, value)
    elif isinstance(data, list):
        for i, obj in enumerate(data):
            yield i, obj
    else:
        raise DataError(path, "top level", f"expected a JSON object or list, got {type(data).__name__}")


def _mirror_cache(folder: Path) -> Path:
    """A datasets cache folder keyed by the mirror folder's files (path, size, modification time)."""
    import hashlib

    if not folder.is_dir():
        raise FileNotFoundError(f"no dataset folder {folder} in the Hub mirror")
    state = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file())
    return cache_dir() / "hub-mirror" / hashlib.sha256(repr((str(folder.resolve()), state)).encode()).hexdigest()[:16]


def _rows_from_hub(source: str, split: str, mirror: str | Path | None = None) -> tuple[str, Iterator[tuple[Any, Any]]]:
    """Rows of a Hub dataset through `datasets.load_dataset`: from the Hub, or from `mirror`, a folder
    laid out like the Hub (<mirror>/<owner>/<dataset>/ with its README's configs), on the same code path."""
    spec = HUB.get(source)
    if spec is None or split not in spec["splits"]:
        raise DataError(f"hub:{source}", split, "no verified Hub dataset for this source/split; pass --data-dir")
    config, hub_split = spec["splits"][split]
    repo = str(resolve_data_dir(mirror) / spec["id"]) if mirror else spec["id"]
    where = f"the Hub mirror {mirror}" if mirror else "the Hugging Face Hub"
    try:
        from datasets import concatenate_datasets, load_dataset

        # A mirror's files are local and can change in place, and datasets' cache key for a local folder does
        # not follow their content: each state of the folder gets its own cache.
        fresh = {"cache_dir": str(_mirror_cache(Path(repo)))} if mirror else {}
        if source == "mmlu_med":
            parts = [load_dataset(repo, subject, split=hub_split, **fresh) for subject in MMLU_MEDICAL_SUBJECTS]
            dataset = concatenate_datasets(parts)
        else:
            dataset = load_dataset(repo, config, split=hub_split, **fresh)
    except Exception as exc:  # offline, gated, renamed: say what failed and how to work around it
        raise FileNotFoundError(
            f"could not load {spec['id']}{'/' + config if config else ''} split {hub_split} from {where} "
            f"({type(exc).__name__}: {exc}); offline, pass --data-dir with the published files"
        ) from exc
    origin = f"{'mirror' if mirror else 'hub'}:{spec['id']}{'/' + config if config else ''}:{hub_split}"

    def rows() -> Iterator[tuple[Any, Any]]:
        for i, row in enumerate(dataset):
            if source == "mmlu_med":
                yield i, (f"{row['subject']}-{i:04d}", row)
            elif source in ("medmcqa", "pubmedqa"):
                yield i, (row.get("id") or row.get("pubid") or i, row)
            else:
                yield i, row

    return origin, rows()


def _normaliser(source: str, split: str, turn_rule: str = "medlib") -> Callable[[Any, Any], dict]:
    if source == "medqa":
        return lambda raw, row: normalise_medqa(raw, row, split)
    if source in ("medmcqa", "mmlu_med"):
        return normalise_mcq_dict_layout(source)
    if source == "pubmedqa":
        return normalise_pubmedqa
    if source == "notechat":
        return normalise_notechat(turn_rule)
    return normalise_chatdoctor(source)


def load_published(source: str, split: str, data_dir: str | Path | None = None, strict: bool = True,
                   hub: bool = False, hub_mirror: str | Path | None = None, turn_rule: str = "medlib") -> LoadResult:
    """Read one published source/split from a local folder (default) or the Hub (hub=True; from
    hub_mirror, a folder laid out like the Hub, when given). turn_rule: how NoteChat's text becomes turns
    (split_notechat_conversation)."""
    if source not in SOURCES:
        raise DataError("<sources>", source, f"unknown source; known: {', '.join(SOURCES)}")
    if hub:
        origin, rows = _rows_from_hub(source, split, hub_mirror)
    else:
        path = local_file(source, split, data_dir)
        origin, rows = str(path), _rows_from_file(path, source)
    report = ValidationReport()
    counter = {"n": 0}

    def counted() -> Iterator[tuple[Any, Any]]:
        for item in rows:
            counter["n"] += 1
            yield item

    records = list(validated(counted(), origin, strict, report, _normaliser(source, split, turn_rule)))
    return LoadResult(source, split, origin, records, report, counter["n"])


# ---------------------------------------------------------------- derived splits (test split, stand-ins)

def pubmedqa_test_ids(data_dir: str | Path | None) -> dict[str, str]:
    path = resolve_data_dir(data_dir) / PUBMEDQA_TEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"the official PubMedQA test split {path} is missing")
    truth = read_json(path)
    if not isinstance(truth, dict):
        raise DataError(path, "top level", "expected a dict PMID -> yes/no/maybe")
    return {str(k): v for k, v in truth.items()}


def chat_holdout_ids(records: list[dict], n: int = CHAT_EVAL_HOLDOUT) -> set[str]:
    """The n conversations with the smallest id hash: fixed, and the hold-out for a smaller n is a
    subset of the one for a larger n, so training and evaluation never overlap."""
    if len(records) <= n:
        raise DataError(records[0]["source"] if records else "chat", "hold-out",
                        f"needs more than {n} conversations to hold {n} out, found {len(records)}")
    ranked = sorted(records, key=lambda r: stable_fraction(f"{r['source']}:{r['id']}"))
    return {r["id"] for r in ranked[:n]}


def medmcqa_in_train_part(record_id: str) -> bool:
    return stable_fraction(f"medmcqa:{record_id}") < MEDMCQA_STANDIN_FRACTION


def load_source(source: str, split: str, data_dir: str | Path | None = None, strict: bool = True,
                hub: bool = False, chat_holdout: int = CHAT_EVAL_HOLDOUT, hub_mirror: str | Path | None = None,
                turn_rule: str = "medlib") -> LoadResult:
    """Any published or derived split, as validated records."""
    if (source, split) not in DERIVED_SPLITS:
        return load_published(source, split, data_dir, strict, hub, hub_mirror, turn_rule)
    base_split, rule = DERIVED_SPLITS[(source, split)]
    base = load_published(source, base_split, data_dir, strict, hub, hub_mirror, turn_rule)
    if rule in ("in_test", "not_in_test"):
        truth = pubmedqa_test_ids(data_dir)
        records = [r for r in base.records if (r["id"] in truth) == (rule == "in_test")]
        if rule == "in_test":
            missing = set(truth) - {r["id"] for r in records}
            if missing and strict:
                raise DataError(PUBMEDQA_TEST_FILE, sorted(missing)[0], f"{len(missing)} test PMIDs are not in PQA-L")
            for r in records:
                if pubmedqa_label_to_letter(truth[r["id"]]) != r["answer"]:
                    raise DataError(PUBMEDQA_TEST_FILE, r["id"], "label disagrees with ori_pqal.json")
    elif rule in ("medmcqa_train_part", "medmcqa_eval_part"):
        records = [r for r in base.records if medmcqa_in_train_part(r["id"]) == (rule == "medmcqa_train_part")]
    else:
        held = chat_holdout_ids(base.records, chat_holdout)
        records = [r for r in base.records if (r["id"] in held) == (rule == "chat_holdout")]
    return LoadResult(source, split, base.origin + f" [{split}]", records, base.report, base.rows_read)
