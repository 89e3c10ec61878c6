"""Red-flag detection by meaning: a fine-tuned all-MiniLM-L6-v2 classifier, with regular expressions as a floor.

The classifier is all-MiniLM-L6-v2 with a LoRA adapter on its linear layers and a linear head
over the mean-pooled sentence embedding, trained on three quarters of the calibration split of
medlib/chat_data/red_flags.jsonl: urgent messages in ten categories, routine messages (many of
them naming alarming words harmlessly, or negated), and emotional-distress messages. A message
is urgent when the summed probability of the ten urgent categories reaches a threshold chosen
for recall first on the remaining quarter; the held-out split, never trained or tuned on,
measures recall and false alarms. The message is scored whole and sentence by
sentence, so an emergency inside a long message is not diluted. The patterns in
`guardrails.detect_red_flags` (with their clause negation) still flag whatever they match.

Rebuild the shipped model and its measurements with:

    python -m medlib.chat.red_flags            # writes medlib/chat_data/red_flag_model/
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib.chat import guardrails
from medlib.chat.router import CHAT_DATA_DIR, LABELLED_FILE, REFERENCE_FILE, labelled_rows, normalise, read_examples
from medlib.models import MINILM, name_adapter_base, resolve_model_path

RED_FLAG_FILE = CHAT_DATA_DIR / "red_flags.jsonl"
MODEL_DIR = CHAT_DATA_DIR / "red_flag_model"
CATEGORIES = ("cardiac", "stroke", "suicide_self_harm", "overdose_poisoning", "anaphylaxis", "severe_bleeding",
              "breathing_collapse", "thunderclap_headache", "seizure", "child_danger")
NON_URGENT = ("routine", "distress")
LABELS = CATEGORIES + NON_URGENT
SPLITS = ("calibration", "heldout")
RECALL_TARGET = 0.97   # the threshold is the highest whose recall on the calibration tuning part reaches this
TRAIN = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "epochs": 15, "lr": 1e-3, "batch_size": 16,
         "tune_fraction": 0.25, "seed": 0}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


class RedFlagError(RuntimeError):
    """The red-flag data or model is missing or malformed; the chat refuses to start without it."""


@dataclass
class Assessment:
    flags: list[guardrails.RedFlag]   # urgent categories found (empty: not urgent)
    distress: bool                    # emotional distress without an emergency: never a greeting or fallback
    urgent_probability: float         # the classifier's highest urgent probability over the message's segments
    distress_probability: float       # likewise for distress or self-harm (the support reply's score)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def urgent(self) -> bool:
        return bool(self.flags)

    @property
    def categories(self) -> list[str]:
        return [f.category for f in self.flags]


def read_red_flag_examples(path: str | Path = RED_FLAG_FILE) -> list[dict[str, str]]:
    """JSONL rows {"label", "group", "split", "text"}; a bad row is an error naming the line."""
    path = Path(path)
    if not path.exists():
        raise RedFlagError(f"red-flag examples {path} are missing")
    rows, seen = [], {}
    for n, row in labelled_rows(path, LABELS, RedFlagError):
        if row.get("split") not in SPLITS:
            raise RedFlagError(f"{path}:{n}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}")
        key = normalise(row["text"])
        if key in seen:
            raise RedFlagError(f"{path}:{n}: the same text as line {seen[key]} (a duplicate would leak across splits)")
        seen[key] = n
        rows.append(row)
    return rows


def router_examples() -> list[dict[str, str]]:
    """The router's own labelled messages (greetings, off-topic lines, everyday medical questions, none of
    them urgent), added to every training fold as routine so that "bye" or "tell me a joke" is not
    an emergency. Training only: the held-out measurement uses red_flags.jsonl alone."""
    rows = read_examples(REFERENCE_FILE) + read_examples(LABELLED_FILE)
    return [{"label": "routine", "group": f"router_{r['label']}", "split": "calibration", "text": r["text"]} for r in rows]


def segments(text: str) -> list[str]:
    """The whole message, then its sentences when it has more than one."""
    parts = [p.strip() for p in _SENTENCE_SPLIT.split(text) if p and p.strip()]
    return [text] + parts if len(parts) > 1 else [text]


class RedFlagClassifier:
    """all-MiniLM-L6-v2 + LoRA + a linear head: per-label probabilities for texts."""

    def __init__(self, encoder: Any, tokenizer: Any, head: Any, max_length: int = 128):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.head = head
        self.max_length = max_length

    @classmethod
    def new(cls, lora_r: int, lora_alpha: int, lora_dropout: float, seed: int) -> "RedFlagClassifier":
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        torch.manual_seed(seed)
        base = str(resolve_model_path(MINILM))
        encoder = get_peft_model(AutoModel.from_pretrained(base, dtype=torch.float32),
                                 LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            target_modules=["query", "key", "value", "dense"]))
        head = torch.nn.Linear(encoder.config.hidden_size, len(LABELS))
        return cls(encoder, AutoTokenizer.from_pretrained(base), head)

    @classmethod
    def load(cls, model_dir: str | Path = MODEL_DIR) -> "RedFlagClassifier":
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        head_file = model_dir / "head.safetensors"
        if not (model_dir / "adapter_config.json").exists() or not head_file.exists():
            raise RedFlagError(f"red-flag model {model_dir} is incomplete (needs adapter_config.json, "
                               f"adapter_model.safetensors and head.safetensors); run: python -m medlib.chat.red_flags")
        labels = json.loads((model_dir / "labels.json").read_text())
        if tuple(labels) != LABELS:
            raise RedFlagError(f"{model_dir}/labels.json lists {labels}, expected {list(LABELS)}; retrain the model")
        base = str(resolve_model_path(MINILM))
        encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(base, dtype=torch.float32), str(model_dir))
        state = load_file(str(head_file))
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        return cls(encoder.eval(), AutoTokenizer.from_pretrained(base), head.eval())

    def save(self, model_dir: str | Path) -> None:
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(str(model_dir), safe_serialization=True)
        name_adapter_base(model_dir, MINILM)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(model_dir / "head.safetensors"))
        (model_dir / "labels.json").write_text(json.dumps(list(LABELS)) + "\n")

    def logits(self, texts: Sequence[str]):
        import torch

        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return self.head(pooled * 10.0)  # a fixed scale, so the head starts with usable logits

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, float]]:
        import torch

        self.encoder.eval()
        out: list[dict[str, float]] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                probs = torch.softmax(self.logits(texts[i:i + batch_size]), -1).tolist()
                out += [dict(zip(LABELS, row)) for row in probs]
        return out

    def fit(self, rows: Sequence[dict[str, str]], epochs: int, lr: float, batch_size: int, seed: int) -> None:
        import torch

        params = [p for p in self.encoder.parameters() if p.requires_grad] + list(self.head.parameters())
        optimiser = torch.optim.AdamW(params, lr=lr)
        texts = [r["text"] for r in rows]
        targets = torch.tensor([LABELS.index(r["label"]) for r in rows])
        generator = torch.Generator().manual_seed(seed)
        self.encoder.train()
        for _ in range(epochs):
            order = torch.randperm(len(texts), generator=generator)
            for i in range(0, len(texts), batch_size):
                idx = order[i:i + batch_size]
                loss = torch.nn.functional.cross_entropy(self.logits([texts[j] for j in idx]), targets[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.encoder.eval()


def urgent_probability(probs: dict[str, float]) -> float:
    return sum(probs[c] for c in CATEGORIES)


class RedFlagDetector:
    """Patterns first (they never miss what they match), then the classifier on every segment."""

    def __init__(self, classifier: RedFlagClassifier, threshold: float, distress_threshold: float):
        self.classifier = classifier
        self.threshold = threshold
        self.distress_threshold = distress_threshold

    @classmethod
    def load(cls, model_dir: str | Path = MODEL_DIR) -> "RedFlagDetector":
        model_dir = Path(model_dir)
        calibration = model_dir / "calibration.json"
        if not calibration.exists():
            raise RedFlagError(f"{calibration} is missing; run: python -m medlib.chat.red_flags")
        try:
            t = json.loads(calibration.read_text())["thresholds"]
            threshold, distress = float(t["urgent"]), float(t["distress"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise RedFlagError(f"{calibration}: no valid 'thresholds' ({type(exc).__name__}: {exc})") from exc
        return cls(RedFlagClassifier.load(model_dir), threshold, distress)

    def assess_many(self, texts: Sequence[str]) -> list[Assessment]:
        pieces = [segments(t) for t in texts]
        flat = [s for p in pieces for s in p]
        probs = self.classifier.probabilities(flat) if flat else []
        out, i = [], 0
        for text, parts in zip(texts, pieces):
            seg_probs = probs[i:i + len(parts)]
            i += len(parts)
            out.append(self._decide(text, seg_probs))
        return out

    def assess(self, text: str) -> Assessment:
        return self.assess_many([text])[0]

    def _affirmed(self, text: str, seg_probs: list[dict[str, float]]) -> dict[str, float] | None:
        """The classifier's most urgent reading of what the message affirms, or None if nothing is urgent.

        The classifier reads "not suicidal" much like "suicidal", so when the message negates a known
        red-flag mention ("I am not suicidal", "no chest pain") it is scored again with those mentions
        taken out (guardrails.strip_negated), and only what is left can raise a flag."""
        affirmed = guardrails.strip_negated(text)
        if affirmed is not text:  # only a message with a negated mention is read again
            if not re.search(r"[^\W\d_]{3}", affirmed):
                return None
            seg_probs = self.classifier.probabilities(segments(affirmed))
        best = max(seg_probs, key=urgent_probability)
        return best if urgent_probability(best) >= self.threshold else None

    def _decide(self, text: str, seg_probs: list[dict[str, float]]) -> Assessment:
        flags = guardrails.detect_red_flags(text)
        p_urgent = max(urgent_probability(p) for p in seg_probs)
        affirmed = self._affirmed(text, seg_probs) if p_urgent >= self.threshold else None
        if affirmed is not None:
            category = max(CATEGORIES, key=lambda c: affirmed[c])
            if affirmed["distress"] > urgent_probability(affirmed):
                # flagged at a recall-first threshold, but mostly distress: the crisis line is the action that
                # fits (never, say, "signs of a stroke" for "I feel so lonely")
                category = "suicide_self_harm"
            if category not in [f.category for f in flags]:
                flags.append(guardrails.RedFlag(category, [f"classifier p={urgent_probability(affirmed):.2f}"]))
        best = affirmed or max(seg_probs, key=urgent_probability)
        p_distress = max(p["distress"] + p["suicide_self_harm"] for p in seg_probs)
        distress = not flags and p_distress >= self.distress_threshold
        return Assessment(flags, distress, p_urgent, p_distress, best)


# ------------------------------------------------------------------ training and measurement
def _metrics(rows: Sequence[dict[str, str]], flagged: Sequence[bool]) -> dict[str, Any]:
    urgent = [r["label"] in CATEGORIES for r in rows]
    n_urgent, n_routine = sum(urgent), len(rows) - sum(urgent)
    tp = sum(1 for u, f in zip(urgent, flagged) if u and f)
    fp = sum(1 for u, f in zip(urgent, flagged) if not u and f)
    out: dict[str, Any] = {"n": len(rows), "n_urgent": n_urgent, "n_non_urgent": n_routine,
                           "recall": tp / n_urgent if n_urgent else None,
                           "false_alarm_rate": fp / n_routine if n_routine else None, "tp": tp, "fp": fp}
    out["per_category_recall"] = {
        c: {"n": sum(r["label"] == c for r in rows),
            "recall": (sum(1 for r, f in zip(rows, flagged) if r["label"] == c and f) /
                       max(1, sum(r["label"] == c for r in rows)))} for c in CATEGORIES}
    groups = sorted({r.get("group", r["label"]) for r in rows if r["label"] in NON_URGENT})
    out["per_group_false_alarm"] = {
        g: {"n": sum(r.get("group") == g for r in rows),
            "false_alarm_rate": (sum(1 for r, f in zip(rows, flagged) if r.get("group") == g and f) /
                                 max(1, sum(r.get("group") == g for r in rows)))} for g in groups}
    return out


def choose_threshold(p_urgent: Sequence[float], is_urgent: Sequence[bool], recall_target: float) -> float:
    """The highest threshold whose recall on these (out-of-fold) scores reaches the target."""
    positives = sorted((p for p, u in zip(p_urgent, is_urgent) if u), reverse=True)
    if not positives:
        raise RedFlagError("no urgent examples to calibrate on")
    k = max(1, -(-int(round(recall_target * len(positives) * 1000)) // 1000))  # ceil, float-safe
    return round(min(positives[:k]) - 1e-6, 6)


def split_for_tuning(rows: Sequence[dict[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """(fit, tune): a seeded `fraction` of each label's calibration rows is kept aside to choose the
    thresholds on the very model that ships, so the thresholds fit that model's scores."""
    import random

    fit, tune = [], []
    for label in LABELS:
        group = [r for r in rows if r["label"] == label]
        random.Random(f"{seed}-{label}").shuffle(group)
        k = round(len(group) * fraction)
        tune += group[:k]
        fit += group[k:]
    return fit, tune


def heldout_report(detector: RedFlagDetector, held: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Recall and false alarms of the whole detector on the held-out rows, of the patterns alone, and
    the held-out messages it missed or flagged wrongly."""
    flags = [a.urgent for a in detector.assess_many([r["text"] for r in held])]
    return {"heldout": _metrics(held, flags),
            "heldout_patterns_only": _metrics(held, [bool(guardrails.detect_red_flags(r["text"])) for r in held]),
            "heldout_missed": [r["text"] for r, f in zip(held, flags) if r["label"] in CATEGORIES and not f],
            "heldout_false_alarms": [r["text"] for r, f in zip(held, flags) if r["label"] in NON_URGENT and f]}


def remeasure(model_dir: str | Path = MODEL_DIR, data_file: str | Path = RED_FLAG_FILE) -> dict[str, Any]:
    """Measure the shipped model again on the held-out split (after a change to the patterns, say)
    and rewrite those parts of calibration.json; the model and its thresholds stay as trained."""
    path = Path(model_dir) / "calibration.json"
    result = json.loads(path.read_text())
    held = [r for r in read_red_flag_examples(data_file) if r["split"] == "heldout"]
    result.update(heldout_report(RedFlagDetector.load(model_dir), held))
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_red_flag_model(out_dir: str | Path = MODEL_DIR, data_file: str | Path = RED_FLAG_FILE,
                         settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on most of the calibration split, choose the thresholds on the rest of it (recall first),
    measure the held-out split, and write the model and calibration.json."""
    s = {**TRAIN, **(settings or {})}
    rows = read_red_flag_examples(data_file)
    cal = [r for r in rows if r["split"] == "calibration"]
    held = [r for r in rows if r["split"] == "heldout"]
    ours = {normalise(r["text"]) for r in rows}
    extra = [r for r in router_examples() if normalise(r["text"]) not in ours]  # a shared text would leak
    fit, tune = split_for_tuning(cal, s["tune_fraction"], s["seed"])
    clf = RedFlagClassifier.new(s["lora_r"], s["lora_alpha"], s["lora_dropout"], s["seed"])
    clf.fit(fit + extra, s["epochs"], s["lr"], s["batch_size"], s["seed"])
    scored = RedFlagDetector(clf, 2.0, 2.0).assess_many([r["text"] for r in tune])  # scores only
    threshold = choose_threshold([a.urgent_probability for a in scored], [r["label"] in CATEGORIES for r in tune],
                                 RECALL_TARGET)
    # distress: low enough to catch nine in ten of the tuning part's distress messages
    distress = sorted(a.distress_probability for a, r in zip(scored, tune) if r["label"] == "distress")
    distress_threshold = round(distress[len(distress) // 10] - 1e-6, 6) if distress else 0.5
    detector = RedFlagDetector(clf, threshold, distress_threshold)
    result = {
        "what": "medlib red-flag detector: all-MiniLM-L6-v2 + LoRA classifier, regular expressions as a floor",
        "thresholds": {"urgent": threshold, "distress": distress_threshold,
                       "rule": f"highest threshold with recall >= {RECALL_TARGET} on the tuning part of the calibration split"},
        "training": s,
        "calibration_tune": _metrics(tune, [a.urgent_probability >= threshold for a in scored]),
        **heldout_report(detector, held),
        "data": {"file": "medlib/chat_data/red_flags.jsonl",
                 "training_only": f"{len(extra)} router examples (reference.jsonl + labelled.jsonl) as routine",
                 "calibration_parts": {"fit": len(fit), "tune": len(tune)},
                 "split_sizes": {sp: {lab: sum(1 for r in rows if r["split"] == sp and r["label"] == lab)
                                      for lab in LABELS} for sp in SPLITS}},
        "command": "python -m medlib.chat.red_flags",
    }
    out_dir = Path(out_dir)
    clf.save(out_dir)
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "README.md").write_text(  # replaces peft's generic model card
        "# medlib red-flag classifier\n\nall-MiniLM-L6-v2 + LoRA + a linear head over "
        f"{', '.join(LABELS)}; trained by `python -m medlib.chat.red_flags` on the calibration split of "
        "medlib/chat_data/red_flags.jsonl. Thresholds and held-out recall / false alarms: calibration.json.\n")
    return result


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlib.chat.red_flags", description=train_red_flag_model.__doc__)
    parser.add_argument("--out", default=str(MODEL_DIR), help="model folder to write (default: %(default)s)")
    parser.add_argument("--remeasure", action="store_true", help=remeasure.__doc__.split("\n")[0])
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = remeasure(args.out) if args.remeasure else train_red_flag_model(args.out)
    for name in ("calibration_tune", "heldout", "heldout_patterns_only"):
        m = result[name]
        print(f"{name:>28}: recall {m['recall']:.3f} ({m['tp']}/{m['n_urgent']}), "
              f"false alarms {m['false_alarm_rate']:.3f} ({m['fp']}/{m['n_non_urgent']})")
    print(f"thresholds {result['thresholds']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
