"""Evaluation sets, located as the eval recipe says (`sets:` and `chat_sets:` in
medlib/recipes/<profile>/eval.yaml). MCQ evaluation, BERTScore and the training mixtures'
decontamination all read them through here, so a set lives in one place per profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medlib.config import EvalSetSpec
from medlib.data.loaders import chat_holdout_ids, derived_split, load_source, published_split, resolve_data_dir
from medlib.data.sources import get_source


def locate(spec: EvalSetSpec, folders: Sequence[str | Path | None]) -> Path | None:
    """The first folder holding the set's file, or None (then only the Hub has it)."""
    files = get_source(spec.source).local_files.get(published_split(spec.source, spec.split), ())
    for folder in folders:
        path = resolve_data_dir(folder)
        if any((path / f).exists() for f in files):
            return path
    return None


def load_eval_set(spec: EvalSetSpec, folders: Sequence[str | Path | None], hub: bool, name: str = "",
                  strict: bool = True, n: int | None = None, hub_mirror: str | Path | None = None) -> list[dict[str, Any]]:
    """The set's records from `hub_mirror` when given (a folder laid out like the Hub), else the first
    folder that has it, else from the Hub when `hub`, else an error naming the folders searched. A set
    with `holdout` keeps its fixed hold-out of n (default: holdout) conversations
    (medlib.data.loaders.chat_holdout_ids)."""
    folder = None if hub_mirror else locate(spec, folders)
    if folder is None and not hub and not hub_mirror:
        raise FileNotFoundError(f"evaluation set {name or spec.source} ({spec.source}/{spec.split}) not found in "
                                f"{[str(resolve_data_dir(f)) for f in folders]}, and this recipe does not read the Hub")
    n = n or spec.holdout
    records = load_source(spec.source, spec.split, folder, strict=strict, hub=folder is None, hub_mirror=hub_mirror,
                          **({"chat_holdout": n} if n else {})).records
    if n and derived_split(spec.source, spec.split) is None:
        held = chat_holdout_ids(records, n)
        records = [r for r in records if r["id"] in held]
    return records


def eval_set_origin(spec: EvalSetSpec, folders: Sequence[str | Path | None], hub_mirror: str | Path | None = None) -> str:
    """Where load_eval_set reads the set: the file (in the first folder that has it), or the Hub id
    (`mirror:` for a folder laid out like the Hub), with the derived split it takes when it takes one."""
    base_split = published_split(spec.source, spec.split)
    derived = f" [{spec.split}]" if derived_split(spec.source, spec.split) else ""
    folder = None if hub_mirror else locate(spec, folders)
    if folder is not None:
        path = next(folder / f for f in get_source(spec.source).local_files[base_split] if (folder / f).exists())
        return f"{path}{derived}"
    hub_id = get_source(spec.source).hub_id or spec.source
    return f"{'mirror' if hub_mirror else 'hub'}:{hub_id}:{base_split}{derived}"
