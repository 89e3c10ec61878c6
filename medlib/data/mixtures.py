"""Mixture builders, deterministic from a seed. Each writes train.jsonl, validation.jsonl and
manifest.json (counts per source and split, seed, content hash, decontamination, skipped rows).

Stage 1 (Med-Mix): concatenate the MCQ sources, shuffle, hold out a validation fraction.
Stage 2 (Med-Nirvana, DMT): dialogue train/validation rows plus k rows replayed from the stage-1
mixture's train and validation splits (Table 2: 100,000 + 10,000 NoteChat, 33,333 + 3,333 replay).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from medlib import config
from medlib.data.decontam import EvalIndex, decontaminate
from medlib.data.io import file_sha256, read_jsonl, write_jsonl
from medlib.data.loaders import CHAT_EVAL_HOLDOUT, LOCAL_FILES, DERIVED_SPLITS, load_source, resolve_data_dir
from medlib.data.validate import DataError, ValidationReport
from medlib.paths import default_data_dir, resolve

log = logging.getLogger(__name__)

STANDIN_NOTE = (
    "LOCAL STAND-IN DATA: built only from the published evaluation files in the data folder, because "
    "the paper's training sets (MedQA/MedMCQA train, PubMedQA PQA-A, NoteChat) are Hub-only. Training "
    "and evaluation parts are disjoint. Results from this mixture are not the paper's."
)


def resolve_count(k: Any, total: int, what: str) -> int:
    """A size given as a count (int >= 0), a ratio (0 < float < 1) of `total`, or None (= all)."""
    if k is None:
        return total
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise config.RecipeError(f"{what}: {k!r} must be a count, a ratio in (0, 1) or null")
    if isinstance(k, float) and 0 < k < 1:
        return round(k * total)
    if k < 0 or k != int(k):
        raise config.RecipeError(f"{what}: {k!r} must be a non-negative integer count or a ratio in (0, 1)")
    return int(k)


def _locate_eval_dir(source: str, split: str, candidates: list[Path]) -> Path | None:
    base_split = DERIVED_SPLITS.get((source, split), (split,))[0]
    for folder in candidates:
        if any((folder / f).exists() for f in LOCAL_FILES.get((source, base_split), [])):
            return folder
    return None


def eval_index(recipe: dict[str, Any], with_chat: bool) -> EvalIndex:
    """Every evaluation set of the recipe's profile, read from data.eval_data_dir or the training data
    folder when it has the file, else the shared data folder, else (paper profile) the Hub."""
    from medlib.data.eval_sets import DECONTAMINATION_SETS, eval_set_spec

    profile = recipe["profile"]
    data = recipe["data"]
    candidates = [resolve_data_dir(data[k]) for k in ("eval_data_dir", "data_dir") if data.get(k)]
    candidates.append(default_data_dir())
    index = EvalIndex()
    for name in DECONTAMINATION_SETS:
        source, split = eval_set_spec(name, profile)
        folder = _locate_eval_dir(source, split, candidates)
        if folder is None and profile == "local":
            raise FileNotFoundError(f"evaluation set {name} ({source}/{split}) not found in {[str(c) for c in candidates]}")
        index.add(name, load_source(source, split, folder, strict=True, hub=folder is None).records)
    if with_chat:
        source, split = ("genmedgpt", "eval_holdout") if profile == "local" else ("icliniq", "train")
        folder = _locate_eval_dir(source, split, candidates)
        records = load_source(source, "train" if profile == "paper" else split, folder, strict=False,
                              hub=folder is None).records
        if profile == "paper":
            from medlib.data.loaders import chat_holdout_ids

            held = chat_holdout_ids(records, CHAT_EVAL_HOLDOUT)
            records = [r for r in records if r["id"] in held]
        index.add("chat_eval", records)
    return index


def _load_training_source(spec: dict[str, Any], data: dict[str, Any], profile: str, report: ValidationReport):
    hub = data.get("data_dir") is None and profile == "paper"
    result = load_source(spec["source"], spec["split"], data.get("data_dir"), strict=data.get("strict", True), hub=hub)
    report.extend(result.report)
    return result


def _take(records: list[dict], n: Any, what: str, strict: bool, rng: random.Random, notes: list[str]) -> list[dict]:
    want = resolve_count(n, len(records), what)
    if want > len(records):
        message = f"{what}: asked for {want} rows but only {len(records)} are available after validation and decontamination"
        if strict:
            raise DataError(what, "size", message)
        notes.append(message + "; took all")
        return records
    if want == len(records):
        return records
    return rng.sample(records, want)


class _Build:
    """What one mixture build accumulates: the seeded RNG, skipped rows, notes, per-source summaries
    and decontamination totals."""

    def __init__(self, recipe: dict[str, Any], with_chat: bool):
        self.recipe, self.data = recipe, recipe["data"]
        self.rng = random.Random(self.data["seed"])
        self.strict = self.data.get("strict", True)
        self.report, self.notes, self.sources = ValidationReport(), [], []
        self.index = eval_index(recipe, with_chat) if self.data.get("decontaminate", True) else None
        self.decon: dict[str, Any] = {"checked": 0, "exact": 0, "normalised": 0, "dropped": 0, "by_eval_set": {}}

    def load(self, spec: dict[str, Any]):
        """A source's validated records, decontaminated; returns (load result, records, source summary)."""
        result = _load_training_source(spec, self.data, self.recipe["profile"], self.report)
        records, decon = result.records, None
        if self.index is not None:
            records, decon = decontaminate(records, self.index)
            _merge_decon(self.decon, decon)
        return result, records, {**result.summary(), "decontamination": _brief(decon)}

    def info(self) -> dict[str, Any]:
        return {"sources": self.sources, "decontamination": self.decon, "validation": self.report, "notes": self.notes}


def build_stage1(recipe: dict[str, Any]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    b = _Build(recipe, with_chat=False)
    pool: list[dict] = []
    for spec in b.data["sources"]:
        _, records, summary = b.load(spec)
        taken = _take(records, spec.get("n"), f"{spec['source']}/{spec['split']}", b.strict, b.rng, b.notes)
        b.sources.append({**summary, "taken": len(taken)})
        pool.extend(taken)
    if not pool:
        raise DataError("stage 1 mixture", "sources", "no rows left: the mixture would be empty")
    b.rng.shuffle(pool)
    n_val = round(len(pool) * float(b.data["validation_fraction"]))
    return pool[n_val:], pool[:n_val], b.info()


def build_stage2(recipe: dict[str, Any]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    b = _Build(recipe, with_chat=True)
    data, rng, strict, notes, sources = b.data, b.rng, b.strict, b.notes, b.sources
    train: list[dict] = []
    validation: list[dict] = []
    for spec in data["sources"]:
        result, records, summary = b.load(spec)
        records = records[:]
        rng.shuffle(records)
        what = f"{spec['source']}/{spec['split']}"
        n_val = resolve_count(spec.get("n_validation"), len(records), what + " n_validation")
        n_train = resolve_count(spec.get("n_train"), len(records) - n_val, what + " n_train")
        if n_train + n_val > len(records):
            message = f"{what}: asked for {n_train} + {n_val} rows but only {len(records)} are available"
            if strict:
                raise DataError(what, "size", message)
            notes.append(message + "; took what there was")
        validation.extend(records[:n_val])
        train.extend(records[n_val:n_val + n_train])
        sources.append({**summary, "taken": {"train": len(records[n_val:n_val + n_train]), "validation": len(records[:n_val])}})
    replay = data.get("replay")
    if replay:
        stage1_dir = resolve(replay["mixture_dir"])
        if not (stage1_dir / "manifest.json").exists():
            log.info("stage-1 mixture %s not built yet: building it first", stage1_dir)
            stage1 = config.load_recipe(recipe["profile"], "stage1")
            stage1["data"].update({k: data[k] for k in ("data_dir", "strict") if k in data})
            stage1["data"]["mixture_dir"] = replay["mixture_dir"]
            build_mixture(stage1)
        manifest1 = json.loads((stage1_dir / "manifest.json").read_text())
        wanted = data.get("data_dir") or "hub"
        if str(manifest1.get("data_dir")) != str(wanted):
            raise DataError(stage1_dir / "manifest.json", "data_dir",
                            f"the stage-1 mixture was built from {manifest1.get('data_dir')!r} but stage 2 reads {wanted!r}; "
                            "rebuild stage 1 with the same --data-dir or point data.replay.mixture_dir elsewhere")
        for split, rows in (("train", train), ("validation", validation)):
            pool = read_jsonl(stage1_dir / f"{split}.jsonl")
            k = resolve_count(replay.get(f"n_{split}"), len(pool), f"replay n_{split}")
            rows.extend(_take(pool, k, f"replay from stage-1 {split}", strict, rng, notes))
        sources.append({"source": "stage1_replay", "origin": str(stage1_dir),
                        "stage1_content_hash": manifest1.get("content_hash"),
                        "taken": {"train": sum(r.get("source") in _mcq_sources() for r in train),
                                  "validation": sum(r.get("source") in _mcq_sources() for r in validation)}})
    if not train:
        raise DataError("stage 2 mixture", "sources", "no rows left: the mixture would be empty")
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation, b.info()


def _mcq_sources() -> set[str]:
    return {"medqa", "medmcqa", "pubmedqa", "mmlu_med"}


def _brief(decon: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if decon is None else {k: v for k, v in decon.items() if k != "matches"}


def _merge_decon(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("checked", "exact", "normalised", "dropped"):
        total[key] += part[key]
    for name, n in part["by_eval_set"].items():
        total["by_eval_set"][name] = total["by_eval_set"].get(name, 0) + n
    total.setdefault("matches", []).extend(part["matches"])


def build_mixture(recipe: dict[str, Any], data_dir: str | Path | None = None, out: str | Path | None = None,
                  force: bool = True) -> Path:
    """Build the recipe's stage-1 or stage-2 mixture; return its folder."""
    recipe = json.loads(json.dumps(recipe))  # never mutate the caller's recipe
    if data_dir is not None:
        recipe["data"]["data_dir"] = str(data_dir)
    out_dir = resolve(out or recipe["data"]["mixture_dir"])
    if not force and (out_dir / "manifest.json").exists():
        return out_dir
    started = time.time()
    builder = build_stage1 if int(recipe["stage"]) == 1 else build_stage2
    train, validation, info = builder(recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "validation.jsonl", validation)
    counts = {split: dict(sorted(Counter(r["source"] for r in rows).items()))
              for split, rows in (("train", train), ("validation", validation))}
    skipped = info["validation"]
    manifest = {
        "profile": recipe["profile"],
        "stage": int(recipe["stage"]),
        "recipe": recipe.get("_meta", {}).get("recipe_file"),
        "standin": recipe["profile"] == "local",
        "note": STANDIN_NOTE if recipe["profile"] == "local" else "paper mixture (Tables 1 and 2)",
        "data_dir": recipe["data"].get("data_dir") or "hub",
        "seed": recipe["data"]["seed"],
        "sizes": {"train": len(train), "validation": len(validation), "total": len(train) + len(validation)},
        "counts": counts,
        "sources": info["sources"],
        "decontamination": info["decontamination"],
        "skipped_rows": {"total": len(skipped.skipped), "by_reason": skipped.counts(), "rows": skipped.skipped},
        "notes": info["notes"],
        "content_hash": file_sha256(out_dir / "train.jsonl", out_dir / "validation.jsonl"),
        "build_seconds": round(time.time() - started, 2),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return out_dir


def summary_lines(mixture_dir: str | Path) -> list[str]:
    manifest = json.loads((Path(mixture_dir) / "manifest.json").read_text())
    lines = [f"{mixture_dir}  [{manifest['profile']} profile, stage {manifest['stage']}, seed {manifest['seed']}]"]
    if manifest["standin"]:
        lines.append("  " + manifest["note"])
    for split in ("train", "validation"):
        parts = ", ".join(f"{k} {v:,}" for k, v in manifest["counts"][split].items())
        lines.append(f"  {split:<10} {manifest['sizes'][split]:>8,}  ({parts})")
    d = manifest["decontamination"]
    lines.append(f"  decontamination: {d['exact']} exact + {d['normalised']} normalised duplicates of eval items, "
                 f"{d['dropped']} dropped {d['by_eval_set'] or ''}")
    lines.append(f"  skipped rows: {manifest['skipped_rows']['total']} {manifest['skipped_rows']['by_reason'] or ''}")
    lines.append(f"  content hash: {manifest['content_hash']}")
    return lines
