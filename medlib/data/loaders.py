"""Loaders: every registered source (medlib.data.sources), from the Hugging Face Hub or a local folder of
the published files, normalised to MCQ records {id, source, question, context, options, answer} or
dialogue records {id, source, messages}, validated, and cut into derived splits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medlib.data.io import iter_jsonl, read_json, stable_fraction
from medlib.data.sources import get_source, source_names
from medlib.data.validate import DataError, ValidationReport, validated
from medlib.paths import PACKAGE_DIR, cache_dir, default_data_dir, resolve
from medlib.prompts import pubmedqa_label_to_letter

log = logging.getLogger(__name__)

SAMPLES_DIR = PACKAGE_DIR / "samples"

# The local profile's stand-ins (see data_cards/local_standins.md). The parts are fixed by a hash
# of each row's id, so they never depend on file order, seeds or recipe settings.
MEDMCQA_STANDIN_FRACTION = 0.24  # of MedMCQA validation goes to training (1,076 of the 4,183 rows)
CHAT_EVAL_HOLDOUT = 50           # GenMedGPT-5k conversations kept for the BERTScore evaluation
PUBMEDQA_TEST_FILE = "pubmedqa/test_ground_truth.json"


def derived_split(source: str, split: str) -> tuple[str, str] | None:
    """(published split, rule) of a derived split, or None for a published one."""
    return get_source(source).derived_splits.get(split)


def published_split(source: str, split: str) -> str:
    derived = derived_split(source, split)
    return derived[0] if derived else split


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
    candidates = get_source(source).local_files.get(split) if source in source_names() else None
    if candidates is None:
        known = sorted(f"{s}/{sp}" for s in source_names() for sp in get_source(s).splits)
        raise DataError(data_dir, f"{source}/{split}", f"unknown source/split; known: {', '.join(known)}")
    for candidate in candidates:
        if (data_dir / candidate).exists():
            return data_dir / candidate
    raise FileNotFoundError(f"{source}/{split}: none of {candidates} exists under {data_dir}")


def _rows_from_file(path: Path, source: str) -> Iterator[tuple[Any, Any]]:
    """(row label, raw row). Dict files give (key, value) pairs; lists and JSONL give (index/line, obj)."""
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            yield (f"line {lineno}", (obj.get("id", lineno), obj) if get_source(source).keyed_rows else obj)
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
    spec = get_source(source)
    if spec.hub_id is None or split not in spec.hub_splits:
        raise DataError(f"hub:{source}", split, "no verified Hub dataset for this source/split; pass --data-dir")
    config, hub_split = spec.hub_splits[split]
    repo = str(resolve_data_dir(mirror) / spec.hub_id) if mirror else spec.hub_id
    where = f"the Hub mirror {mirror}" if mirror else "the Hugging Face Hub"
    try:
        from datasets import concatenate_datasets, load_dataset

        # A mirror's files are local and can change in place, and datasets' cache key for a local folder does
        # not follow their content: each state of the folder gets its own cache.
        fresh = {"cache_dir": str(_mirror_cache(Path(repo)))} if mirror else {}
        if spec.hub_subsets:
            parts = [load_dataset(repo, subset, split=hub_split, **fresh) for subset in spec.hub_subsets]
            dataset = concatenate_datasets(parts)
        else:
            dataset = load_dataset(repo, config, split=hub_split, **fresh)
    except Exception as exc:  # offline, gated, renamed: say what failed and how to work around it
        raise FileNotFoundError(
            f"could not load {spec.hub_id}{'/' + config if config else ''} split {hub_split} from {where} "
            f"({type(exc).__name__}: {exc}); offline, pass --data-dir with the published files"
        ) from exc
    origin = f"{'mirror' if mirror else 'hub'}:{spec.hub_id}{'/' + config if config else ''}:{hub_split}"

    def rows() -> Iterator[tuple[Any, Any]]:
        for i, row in enumerate(dataset):
            if spec.hub_subsets:  # one id space over the concatenated subsets
                yield i, (f"{row['subject']}-{i:04d}", row)
            elif spec.keyed_rows:
                yield i, (row.get("id") or row.get("pubid") or i, row)
            else:
                yield i, row

    return origin, rows()


def load_published(source: str, split: str, data_dir: str | Path | None = None, strict: bool = True,
                   hub: bool = False, hub_mirror: str | Path | None = None, turn_rule: str = "medlib") -> LoadResult:
    """Read one published source/split from a local folder (default) or the Hub (hub=True; from
    hub_mirror, a folder laid out like the Hub, when given). turn_rule: how NoteChat's text becomes turns
    (split_notechat_conversation)."""
    if source not in source_names():
        raise DataError("<sources>", source, f"unknown source; known: {', '.join(source_names())}")
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

    records = list(validated(counted(), origin, strict, report, get_source(source).normaliser(split, turn_rule)))
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
    if derived_split(source, split) is None:
        return load_published(source, split, data_dir, strict, hub, hub_mirror, turn_rule)
    base_split, rule = derived_split(source, split)
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
