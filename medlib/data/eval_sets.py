"""Evaluation sets per profile. The local profile evaluates only what its training stand-ins
never saw: MedMCQA validation minus the training part, the official PubMedQA test split, and the
GenMedGPT-5k hold-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlib.data.loaders import CHAT_EVAL_HOLDOUT, load_source, resolve_data_dir

# name -> (source, split) per profile; the paper evaluates PubMedQA on all 1,000 PQA-L questions.
EVAL_SETS = {
    "paper": {"medqa": ("medqa", "test"), "medmcqa": ("medmcqa", "validation"),
              "pubmedqa": ("pubmedqa", "pqa_labeled"), "pubmedqa_test": ("pubmedqa", "test"),
              "mmlu_med": ("mmlu_med", "test")},
    "local": {"medqa": ("medqa", "test"), "medmcqa": ("medmcqa", "validation_eval"),
              "pubmedqa": ("pubmedqa", "test"), "pubmedqa_test": ("pubmedqa", "test"),
              "mmlu_med": ("mmlu_med", "test")},
}
DECONTAMINATION_SETS = ("medqa", "medmcqa", "pubmedqa", "mmlu_med")


def eval_set_spec(name: str, profile: str = "local") -> tuple[str, str]:
    sets = EVAL_SETS.get(profile)
    if sets is None:
        raise ValueError(f"unknown profile {profile!r}")
    if name not in sets:
        raise ValueError(f"unknown evaluation set {name!r}; known: {', '.join(sets)}")
    return sets[name]


def _use_hub(data_dir: str | Path | None, source: str, split: str) -> bool:
    """Read the local folder when it has the file, the Hub otherwise (paper profile on a real machine)."""
    from medlib.data.loaders import LOCAL_FILES, DERIVED_SPLITS

    base_split = DERIVED_SPLITS.get((source, split), (split,))[0]
    folder = resolve_data_dir(data_dir)
    return not any((folder / f).exists() for f in LOCAL_FILES.get((source, base_split), []))


def load_eval_set(name: str, data_dir: str | Path | None = None, profile: str = "local") -> list[dict[str, Any]]:
    source, split = eval_set_spec(name, profile)
    hub = profile == "paper" and _use_hub(data_dir, source, split)
    return load_source(source, split, data_dir, strict=True, hub=hub).records


def load_chat_eval(data_dir: str | Path | None = None, profile: str = "local", n: int = CHAT_EVAL_HOLDOUT) -> list[dict]:
    """Held-out consumer questions with physicians' answers, for BERTScore and side-by-side samples.
    local: the fixed GenMedGPT-5k hold-out. paper: n iCliniq conversations (the paper used 50 from
    iCliniq / HealthCareMagic), from the local folder when present, else the Hub."""
    if profile == "local":
        return load_source("genmedgpt", "eval_holdout", data_dir, chat_holdout=n).records
    hub = _use_hub(data_dir, "icliniq", "train")
    records = load_source("icliniq", "train", data_dir, strict=False, hub=hub).records
    from medlib.data.loaders import chat_holdout_ids

    held = chat_holdout_ids(records, n)
    return [r for r in records if r["id"] in held]
