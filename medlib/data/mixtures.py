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
from medlib.config import DataSettings, EvalRecipe, SourceSpec, TrainRecipe
from medlib.data.decontam import EvalIndex, decontaminate
from medlib.data.eval_sets import load_eval_set
from medlib.data.io import file_sha256, read_jsonl, write_jsonl
from medlib.data.loaders import load_source
from medlib.data.sources import source_names
from medlib.data.validate import DataError, ValidationReport, record_problem
from medlib.paths import default_data_dir
from medlib.runs import Layout, stage1_of

MIXTURE_FILES = ("train.jsonl", "validation.jsonl", "manifest.json")

log = logging.getLogger(__name__)

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


def datasets_order(n: int, seed: int) -> list[int]:
    """The row order `datasets.Dataset.shuffle(seed=seed)` gives any n-row dataset (it depends on n and
    the seed only), from the library itself, so the authors' mixtures can be rebuilt row for row."""
    from datasets import Dataset

    return list(Dataset.from_dict({"i": list(range(n))}).shuffle(seed=seed)["i"])


def datasets_split(n: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) row indices of `Dataset.train_test_split(test_size=test_size, seed=seed)` on n rows."""
    from datasets import Dataset

    parts = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=test_size, seed=seed)
    return list(parts["train"]["i"]), list(parts["test"]["i"])


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    return [rows[i] for i in datasets_order(len(rows), seed)]


def eval_index(recipe: TrainRecipe, eval_recipe: EvalRecipe, with_chat: bool) -> EvalIndex:
    """Every evaluation set of the eval recipe, read from data.eval_data_dir or the training data folder
    when it has the file, else the shared data folder, else (a recipe with data.hub) the Hub."""
    data = recipe.data
    folders = [folder for folder in (data.eval_data_dir, data.data_dir) if folder] + [default_data_dir()]
    index = EvalIndex()
    for name in eval_recipe.mcq.sets:  # every MCQ set the eval recipe scores, whatever its name
        index.add(name, load_eval_set(eval_recipe.sets[name], folders, data.hub, name, hub_mirror=data.hub_mirror))
    if with_chat:
        for spec in eval_recipe.chat_sets:
            index.add("chat_eval", load_eval_set(spec, folders, data.hub, "chat_sets", strict=False,
                                                 hub_mirror=data.hub_mirror))
    return index


def _load_training_source(spec: SourceSpec, data: DataSettings, report: ValidationReport):
    result = load_source(spec.source, spec.split, data.data_dir, strict=data.strict,
                         hub=data.data_dir is None and (data.hub or data.hub_mirror is not None), hub_mirror=data.hub_mirror,
                         turn_rule=data.turn_rule)
    report.extend(result.report)
    return result


def _take(records: list[dict], n: Any, what: str, strict: bool, rng: random.Random, notes: list[str],
          decontaminated: int = 0) -> list[dict]:
    """n rows (a count, a ratio or all) drawn with the build's RNG. Asking for more than there are is an
    error in a strict build, unless the rows missing are ones decontamination dropped: a build never
    aborts for decontamination (the shortfall is noted in the manifest)."""
    want = resolve_count(n, len(records), what)
    if want > len(records):
        message = f"{what}: asked for {want} rows but only {len(records)} are available after validation and decontamination"
        if strict and want > len(records) + decontaminated:
            raise DataError(what, "size", message)
        if decontaminated:
            message += f" ({decontaminated} dropped as duplicates of evaluation questions)"
        notes.append(message + "; took all")
        return records
    if want == len(records):
        return records
    return rng.sample(records, want)


class _Build:
    """What one mixture build accumulates: the seeded RNG, skipped rows, notes, per-source summaries
    and decontamination totals."""

    def __init__(self, recipe: TrainRecipe, eval_recipe: EvalRecipe | None, with_chat: bool):
        self.data = recipe.data
        self.rng = random.Random(self.data.seed)
        self.strict = self.data.strict
        self.report, self.notes, self.sources = ValidationReport(), [], []
        if self.data.decontaminate != "off" and eval_recipe is None:
            raise config.RecipeError(f"{recipe.meta.recipe_file}: data.decontaminate needs the evaluation sets "
                                     "(the profile's eval recipe)")
        self.index = eval_index(recipe, eval_recipe, with_chat) if self.data.decontaminate != "off" else None
        self.decon: dict[str, Any] = {"checked": 0, "exact": 0, "normalised": 0, "dropped": 0, "by_eval_set": {},
                                      "ngram": {"n": 13, "threshold": self.data.ngram_threshold, "rows": 0,
                                                "rows_ngram_only": 0, "eval_items_by_set": {}}}

    def load(self, spec: SourceSpec):
        """A source's validated records, checked against the evaluation sets: overlaps dropped (decontaminate:
        drop) or only reported (report). Returns (load result, records, source summary, rows dropped)."""
        result = _load_training_source(spec, self.data, self.report)
        records, decon = result.records, None
        if self.index is not None:
            records, decon = decontaminate(records, self.index, drop=self.data.decontaminate == "drop",
                                           ngram_threshold=self.data.ngram_threshold)
            _merge_decon(self.decon, decon)
        dropped = decon["dropped"] if decon else 0
        return result, records, {**result.summary(), "decontamination": _brief(decon)}, dropped

    def info(self) -> dict[str, Any]:
        return {"sources": self.sources, "decontamination": self.decon, "validation": self.report, "notes": self.notes}


def build_stage1(recipe: TrainRecipe, eval_recipe: EvalRecipe | None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """medlib order: seeded draws, one shuffle, the first fraction held out. authors order (their notebook):
    the sources concatenated in recipe order, `shuffle(seed)`, then `train_test_split(fraction, seed)`."""
    b = _Build(recipe, eval_recipe, with_chat=False)
    authors = b.data.order == "authors"
    pool: list[dict] = []
    for spec in b.data.sources:
        _, records, summary, dropped = b.load(spec)
        what = f"{spec.source}/{spec.split}"
        if authors:  # the first n rows in the published order (the authors took every row: n = all)
            want = resolve_count(spec.n, len(records), what)
            taken = records[:want]
            if want > len(records):
                b.notes.append(f"{what}: asked for {want} rows, {len(records)} available; took all")
        else:
            taken = _take(records, spec.n, what, b.strict, b.rng, b.notes, dropped)
        b.sources.append({**summary, "taken": len(taken)})
        pool.extend(taken)
    if not pool:
        raise DataError("stage 1 mixture", "sources", "no rows left: the mixture would be empty")
    if b.data.validation_fraction is None:
        raise config.RecipeError(f"{recipe.meta.recipe_file}: a stage-1 recipe needs data.validation_fraction")
    if authors:
        pool = _shuffled(pool, b.data.seed)
        train_idx, val_idx = datasets_split(len(pool), b.data.validation_fraction, b.data.seed)
        return [pool[i] for i in train_idx], [pool[i] for i in val_idx], b.info()
    b.rng.shuffle(pool)
    n_val = round(len(pool) * b.data.validation_fraction)
    return pool[n_val:], pool[:n_val], b.info()


def build_stage2(recipe: TrainRecipe, eval_recipe: EvalRecipe | None,
                 stage1_mixture: Path | None = None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """medlib order: each source shuffled with the build's RNG, validation rows first, replay drawn at random,
    both splits shuffled. authors order (their notebook): each source `shuffle(seed)`, the first n_train rows
    train and the next n_validation validation; replay = the stage-1 split `shuffle(seed)`, its first k rows;
    each split (dialogue rows, then replay) `shuffle(seed)`."""
    b = _Build(recipe, eval_recipe, with_chat=True)
    data, rng, strict, notes, sources = b.data, b.rng, b.strict, b.notes, b.sources
    authors = data.order == "authors"
    train: list[dict] = []
    validation: list[dict] = []
    for spec in data.sources:
        result, records, summary, dropped = b.load(spec)
        what = f"{spec.source}/{spec.split}"
        if authors:
            records = _shuffled(records, data.seed)
            n_train = resolve_count(spec.n_train, len(records), what + " n_train")
            n_val = resolve_count(spec.n_validation, max(0, len(records) - n_train), what + " n_validation")
            if n_train + n_val > len(records):
                message = f"{what}: asked for {n_train} + {n_val} rows but only {len(records)} are available"
                if strict and n_train + n_val > len(records) + dropped:
                    raise DataError(what, "size", message)
                notes.append(message + "; took what there was")
            train.extend(records[:n_train])
            validation.extend(records[n_train:n_train + n_val])
            sources.append({**summary, "taken": {"train": len(records[:n_train]),
                                                 "validation": len(records[n_train:n_train + n_val])}})
            continue
        records = records[:]
        rng.shuffle(records)
        n_val = resolve_count(spec.n_validation, len(records), what + " n_validation")
        n_train = resolve_count(spec.n_train, len(records) - n_val, what + " n_train")
        if n_train + n_val > len(records):
            message = f"{what}: asked for {n_train} + {n_val} rows but only {len(records)} are available"
            if strict and n_train + n_val > len(records) + dropped:
                raise DataError(what, "size", message)
            if dropped:
                message += f" ({dropped} dropped as duplicates of evaluation items)"
            notes.append(message + "; took what there was")
        validation.extend(records[:n_val])
        train.extend(records[n_val:n_val + n_train])
        sources.append({**summary, "taken": {"train": len(records[n_val:n_val + n_train]), "validation": len(records[:n_val])}})
    replay = data.replay
    if replay:
        if stage1_mixture is None:
            raise config.RecipeError(f"{recipe.meta.recipe_file}: data.replay needs the stage-1 mixture to replay from")
        stage1_dir = Path(stage1_mixture)
        if not (stage1_dir / "manifest.json").exists():
            raise DataError(stage1_dir / "manifest.json", "replay",
                            f"the stage-1 mixture {stage1_dir} is not built; build stage 1 first "
                            "(medlib data build --stage 1)")
        manifest1 = json.loads((stage1_dir / "manifest.json").read_text())
        wanted = _data_origin(data)
        if str(manifest1.get("data_dir")) != str(wanted):
            raise DataError(stage1_dir / "manifest.json", "data_dir",
                            f"the stage-1 mixture was built from {manifest1.get('data_dir')!r} but stage 2 reads {wanted!r}; "
                            "rebuild stage 1 with the same --data-dir")
        for split, rows in (("train", train), ("validation", validation)):
            pool = read_jsonl(stage1_dir / f"{split}.jsonl")
            k = resolve_count(getattr(replay, f"n_{split}"), len(pool), f"replay n_{split}")
            if authors:
                if k > len(pool):
                    notes.append(f"replay from stage-1 {split}: asked for {k} rows, {len(pool)} available; took all")
                rows.extend(_shuffled(pool, data.seed)[:k])
            else:
                rows.extend(_take(pool, k, f"replay from stage-1 {split}", strict, rng, notes))
        mcq_sources = set(source_names("mcq"))
        sources.append({"source": "stage1_replay", "origin": str(stage1_dir),
                        "stage1_content_hash": manifest1.get("content_hash"),
                        "taken": {"train": sum(r.get("source") in mcq_sources for r in train),
                                  "validation": sum(r.get("source") in mcq_sources for r in validation)}})
    if not train:
        raise DataError("stage 2 mixture", "sources", "no rows left: the mixture would be empty")
    if authors:
        return _shuffled(train, data.seed), _shuffled(validation, data.seed), b.info()
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation, b.info()


def _data_origin(data: DataSettings) -> str:
    return data.data_dir or (f"hub mirror {data.hub_mirror}" if data.hub_mirror else "hub")


def _brief(decon: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if decon is None else {k: v for k, v in decon.items() if k != "matches"}


def _merge_decon(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("checked", "exact", "normalised", "dropped"):
        total[key] += part[key]
    for name, n in part["by_eval_set"].items():
        total["by_eval_set"][name] = total["by_eval_set"].get(name, 0) + n
    for key in ("rows", "rows_ngram_only"):
        total["ngram"][key] += part["ngram"][key]
    total.setdefault("matches", []).extend(part["matches"])
    touched: dict[str, set[str]] = {}   # an item two sources overlap counts once
    for match in total["matches"]:
        for item in match.get("ngram_items", ()):
            touched.setdefault(item["eval_set"], set()).add(item["id"])
    total["ngram"]["eval_items_by_set"] = {name: len(ids) for name, ids in sorted(touched.items())}


def build_mixture(recipe: TrainRecipe, out_dir: str | Path, eval_recipe: EvalRecipe | None = None,
                  stage1_mixture: str | Path | None = None, force: bool = True) -> Path:
    """Build the recipe's mixture in out_dir and return it. eval_recipe: the evaluation sets it is
    decontaminated against; stage1_mixture: the stage-1 mixture a stage-2 recipe replays (built first)."""
    out_dir = Path(out_dir)
    if not force and (out_dir / "manifest.json").exists():
        return out_dir
    started = time.time()
    if recipe.stage == 1:
        train, validation, info = build_stage1(recipe, eval_recipe)
    else:
        train, validation, info = build_stage2(recipe, eval_recipe, Path(stage1_mixture) if stage1_mixture else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "validation.jsonl", validation)
    counts = {split: dict(sorted(Counter(r["source"] for r in rows).items()))
              for split, rows in (("train", train), ("validation", validation))}
    skipped = info["validation"]
    manifest = {
        "profile": recipe.profile,
        "stage": recipe.stage,
        "recipe": recipe.meta.recipe_file,
        "standin": recipe.data.standin_note is not None,
        "note": recipe.data.standin_note or f"{recipe.profile} profile mixture ({recipe.meta.recipe_file})",
        "data_dir": _data_origin(recipe.data),
        "seed": recipe.data.seed,
        "order": recipe.data.order,
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


def read_mixture(mixture_dir: str | Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train records, validation records, what the run records about the mixture); every record is
    validated, and a bad one is an error naming the file, line and id."""
    mixture_dir = Path(mixture_dir)
    missing = [n for n in MIXTURE_FILES if not (mixture_dir / n).exists()]
    if missing:
        raise DataError(mixture_dir, "files", f"mixture {mixture_dir} lacks {', '.join(missing)} "
                        "(build it with medlib data build)")
    splits = {}
    for split in ("train", "validation"):
        path = mixture_dir / f"{split}.jsonl"
        records = read_jsonl(path)
        for row, record in enumerate(records, start=1):
            problem = record_problem(record)
            if problem:
                raise DataError(path, f"line {row} (id {record.get('id')!r})", problem)
        splits[split] = records
    if not splits["train"]:
        raise DataError(mixture_dir / "train.jsonl", "records", f"mixture {mixture_dir} is empty")
    manifest = {"mixture_dir": str(mixture_dir), "manifest_sha256": file_sha256(mixture_dir / "manifest.json")}
    try:
        content = json.loads((mixture_dir / "manifest.json").read_text())
        manifest["sources"] = content.get("counts") or content.get("sources")
        manifest["content_hash"] = content.get("content_hash")
    except (ValueError, AttributeError):
        pass
    return splits["train"], splits["validation"], manifest


def seeded_subset(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """A fixed, seeded subset of n records, kept in their order (None or n >= len: all). The same for
    every caller with the same seed: training's max_*_samples, and evaluation's questions per set."""
    if n is None or n < 0 or n >= len(records):
        return records
    rng = random.Random(seed)
    return [records[i] for i in sorted(rng.sample(range(len(records)), n))]


def ensure_mixture(recipe: TrainRecipe, lay: Layout, eval_recipe: EvalRecipe | None = None) -> Path:
    """The recipe's mixture folder in the layout, built when missing (a stage-2 replay mixture's
    stage-1 mixture first). Built mixtures are read as they are."""
    target = lay.mixture(recipe.mixture)
    if all((target / name).exists() for name in MIXTURE_FILES):
        return target
    eval_recipe = eval_recipe or config.load_eval(recipe.profile)
    stage1_mixture = None
    if recipe.data.replay is not None:
        stage1 = stage1_of(recipe)
        stage1_mixture = ensure_mixture(stage1, lay, eval_recipe)
    return build_mixture(recipe, target, eval_recipe, stage1_mixture)
