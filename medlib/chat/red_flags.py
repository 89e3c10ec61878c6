"""Red flags in four tiers, by meaning: a fine-tuned all-MiniLM-L6-v2 classifier, with regular expressions as a floor.

Every message gets one tier (the chat's routes, medlib.chat.routes, act on it):

    urgent      an emergency happening now, to someone     the urgent-care message; the model is not asked
    safety_net  an emergency topic that is not happening    the model answers, then the category's one-line
                now, or a borderline case                   safety net ("if ... call 999 / 112 now")
    support     distress without risk                       the support message
    routine     everything else                             the ordinary reply

and, for urgent and safety-net messages, a category (cardiac, stroke, ...). The classifier is the mean of two
members trained alike from different seeds, each all-MiniLM-L6-v2 with a LoRA adapter and two linear heads over
the mean-pooled embedding, one for the tier and one for the category, trained on the same three quarters of
medlib/chat_data/red_flags.jsonl (written by
`python -m medlib.chat.red_flag_set`); the thresholds are chosen on the remaining quarter, recall first, with a
lower urgent threshold where the classifier reads suicide, self-harm, overdose or poisoning. The held-out set, in
four parts (medlib/chat_data/red_flags_heldout.jsonl, _2, _3 and _4), was written separately (other authors'
wording, never trained or tuned on) and measures everything reported. The message is
scored whole and sentence by sentence, so an emergency inside a long message is not diluted; the patterns in
`guardrails.detect_red_flags` (with their clause negation) flag whatever they match.

Retrain and re-measure (writes medlib/chat_data/red_flag_model/, calibration.json holds every number):

    python -m medlib.chat.red_flags
    python -m medlib.chat.red_flags --recalibrate   # from the saved float members: runtime, thresholds, measures
    python -m medlib.chat.red_flags --remeasure     # the shipped runtime on the tuning quarter and held-out set again

The chat runs the classifier as int8 ONNX (medlib.chat.red_flag_runtime: no torch, ~150 MB resident); the
thresholds and every reported number are the runtime's, each rate with its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib.chat import guardrails
from medlib.chat.red_flag_runtime import RuntimeClassifier, export_runtime
from medlib.chat.router import (CHAT_DATA_DIR, LABELLED_FILE, REFERENCE_FILE, Router, labelled_rows, normalise,
                                read_examples)
from medlib.chat.routes import Signals, route_for
from medlib.models import MINILM, name_adapter_base, resolve_model_path

RED_FLAG_FILE = CHAT_DATA_DIR / "red_flags.jsonl"
# The held-out parts, each written separately (other authors, other wording; never trained or tuned on). The second
# and third were written on 2026-11-26 by authors who saw neither the training data nor an earlier part; nobody has
# read them. The third was committed before any detector was measured on it, and the choice between one member and
# the ensemble was made on the tuning quarter before it was. The fourth was written blind on 2026-11-26 too, and
# committed after the zero-miss threshold had been chosen and committed, before any detector was measured on it.
HELDOUT_FILES = tuple(CHAT_DATA_DIR / f"red_flags_heldout{suffix}.jsonl" for suffix in ("", "_2", "_3", "_4"))
# The parts whose errors calibration.json lists word for word: the first, whose errors have been read since it was
# written. The blind parts' errors are counted by group only, so no training data is ever written towards them.
ERRORS_LISTED_FOR = (HELDOUT_FILES[0].name,)
MODEL_DIR = CHAT_DATA_DIR / "red_flag_model"
TIERS = ("urgent", "safety_net", "support", "routine")
CATEGORIES = tuple(guardrails.URGENT_ACTIONS)
LANGUAGES = ("en", "es", "fr", "de", "pt")
NO_CATEGORY = "none"
# Targets on the held-out set (issue 27): what calibration.json's "targets" block checks.
TARGETS = {"urgent_recall": 0.98, "urgent_or_net_recall": 0.995, "routine_urgent_rate": 0.03,
           "routine_net_rate": 0.15, "support_rate": 0.9}
# The thresholds are chosen on the tuning quarter with these budgets, a little inside the targets: as many
# emergencies as possible flagged urgent while at most 2% of the other messages are; the safety net as wide as
# 10% of routine messages allows; support for nineteen in twenty distress messages.
AIMS = {"not_urgent_flagged_urgent": 0.02, "routine_net_rate": 0.10, "support_recall": 0.95}
# The categories whose recall target is 1.0: where the classifier reads one of them, the urgent threshold is lower
# (Thresholds.urgent_zero_miss), chosen on the tuning quarter weighing each emergency still missed as MISS_COST false
# alarms (zero_miss_threshold).
ZERO_MISS_CATEGORIES = ("suicide_self_harm", "overdose_poisoning")
MISS_COST = 3
TRAIN = {"lora_r": 64, "lora_alpha": 128, "lora_dropout": 0.1, "epochs": 8, "lr": 5e-4, "warmup_share": 0.06,
         "batch_size": 32, "tune_fraction": 0.25, "split_seed": 0, "seeds": [0, 1]}
# The classifier's P(urgent) from which a pattern match makes a message urgent; and the score (urgent, emergency
# topic or distress) under which a routine message is clearly routine, the only kind the greeting or fallback gets.
FLOOR_MIN = 0.05
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


class RedFlagError(RuntimeError):
    """The red-flag data or model is missing or malformed; the chat refuses to start without it."""


@dataclass
class Assessment:
    tier: str                         # urgent | safety_net | support | routine
    categories: list[str]             # urgent: every category found; safety_net: the topic; else empty
    lang: str                         # en | es | fr | de | pt (guardrails.language_of)
    probabilities: dict[str, float] = field(default_factory=dict)   # the deciding segment's tier probabilities
    evidence: list[str] = field(default_factory=list)
    # routine only: the category the classifier leans to when it is not clearly routine (some score >= FLOOR_MIN);
    # such a message never gets the greeting or the fallback (medlib.chat.routes)
    leaning: str | None = None

    @property
    def urgent(self) -> bool:
        return self.tier == "urgent"

    @property
    def category(self) -> str | None:
        return self.categories[0] if self.categories else None

    @property
    def flags(self) -> list[guardrails.RedFlag]:
        return [guardrails.RedFlag(c, self.evidence) for c in self.categories] if self.urgent else []


def read_red_flag_examples(path: str | Path = RED_FLAG_FILE) -> list[dict[str, str]]:
    """JSONL rows {"tier", "category", "group", "lang", "text"}; a bad row is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise RedFlagError(f"red-flag examples {path} are missing")
    rows, seen = [], {}
    for n, row in labelled_rows(path, TIERS, RedFlagError, key="tier"):
        where = f"{path}:{n}"
        category = row.get("category")
        if row["tier"] in ("urgent", "safety_net") and category not in CATEGORIES:
            raise RedFlagError(f"{where}: category {category!r} of a {row['tier']} row is not one of {', '.join(CATEGORIES)}")
        if row["tier"] in ("support", "routine") and category != NO_CATEGORY:
            raise RedFlagError(f"{where}: a {row['tier']} row has category {category!r}; it must be {NO_CATEGORY!r}")
        if row.get("lang") not in LANGUAGES:
            raise RedFlagError(f"{where}: lang {row.get('lang')!r} is not one of {', '.join(LANGUAGES)}")
        if not isinstance(row.get("group"), str) or not row["group"]:
            raise RedFlagError(f"{where}: 'group' must be a non-empty string")
        key = normalise(row["text"])
        if key in seen:
            raise RedFlagError(f"{where}: the same text as line {seen[key]} (a duplicate would leak between parts)")
        seen[key] = n
        rows.append(row)
    if not rows:
        raise RedFlagError(f"{path}: no examples")
    return rows


def read_heldout(paths: str | Path | Sequence[str | Path] = HELDOUT_FILES,
                 training: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
    """The held-out rows of every part, each with "part" (its file's name); a row that repeats a training text or
    another part's text is an error (it would be measured on what it learnt, or counted twice)."""
    trained = {normalise(r["text"]) for r in training}
    held: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        part = read_red_flag_examples(path)
        leaked = [r["text"] for r in part if normalise(r["text"]) in trained]
        if leaked:
            raise RedFlagError(f"{path}: {len(leaked)} held-out texts are also training texts, e.g. {leaked[0]!r}")
        for row in part:
            key = normalise(row["text"])
            if key in seen:
                raise RedFlagError(f"{path}: {row['text']!r} is also in {seen[key]}")
            seen[key] = path.name
            held.append({**row, "part": path.name})
    return held


def router_examples() -> list[dict[str, str]]:
    """The router's own labelled messages (greetings, off-topic lines, everyday medical questions, none of
    them urgent), added to every training fold as routine so that "bye" or "tell me a joke" is not
    an emergency. Training only: nothing is measured on them."""
    rows = read_examples(REFERENCE_FILE) + read_examples(LABELLED_FILE)
    return [{"tier": "routine", "category": NO_CATEGORY, "group": f"router_{r['label']}", "lang": "en", "text": r["text"]}
            for r in rows]


def segments(text: str) -> list[str]:
    """The whole message, then its sentences when it has more than one."""
    parts = [p.strip() for p in _SENTENCE_SPLIT.split(text) if p and p.strip()]
    return [text] + parts if len(parts) > 1 else [text]


class RedFlagClassifier:
    """all-MiniLM-L6-v2 + LoRA + two linear heads (tier, category): per-text probabilities of each."""

    def __init__(self, encoder: Any, tokenizer: Any, heads: Any, max_length: int = 128):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.heads = heads            # torch.nn.ModuleDict {"tier": Linear, "category": Linear}
        self.max_length = max_length

    @staticmethod
    def _heads(hidden: int):
        import torch

        return torch.nn.ModuleDict({"tier": torch.nn.Linear(hidden, len(TIERS)),
                                    "category": torch.nn.Linear(hidden, len(CATEGORIES))})

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
        return cls(encoder, AutoTokenizer.from_pretrained(base), cls._heads(encoder.config.hidden_size))

    @classmethod
    def load(cls, model_dir: str | Path = MODEL_DIR) -> "RedFlagClassifier":
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        head_file = model_dir / "heads.safetensors"
        if not (model_dir / "adapter_config.json").exists() or not head_file.exists():
            raise RedFlagError(f"red-flag model {model_dir} is incomplete (needs adapter_config.json, "
                               f"adapter_model.safetensors and heads.safetensors); run: python -m medlib.chat.red_flags")
        labels = json.loads((model_dir / "labels.json").read_text())
        if labels != {"tiers": list(TIERS), "categories": list(CATEGORIES)}:
            raise RedFlagError(f"{model_dir}/labels.json lists {labels}, expected tiers {list(TIERS)} and "
                               f"categories {list(CATEGORIES)}; retrain the model")
        base = str(resolve_model_path(MINILM))
        encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(base, dtype=torch.float32), str(model_dir))
        heads = cls._heads(encoder.config.hidden_size)
        heads.load_state_dict(load_file(str(head_file)))
        return cls(encoder.eval(), AutoTokenizer.from_pretrained(base), heads.eval())

    def save(self, model_dir: str | Path) -> None:
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(str(model_dir), safe_serialization=True)
        (model_dir / "README.md").unlink(missing_ok=True)  # peft's generic card; the model folder has its own
        name_adapter_base(model_dir, MINILM)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, str(model_dir / "heads.safetensors"))
        (model_dir / "labels.json").write_text(json.dumps({"tiers": list(TIERS), "categories": list(CATEGORIES)}) + "\n")

    def logits(self, texts: Sequence[str]):
        import torch

        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return {name: head(pooled * 10.0) for name, head in self.heads.items()}  # a fixed scale: usable logits at start

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, dict[str, float]]]:
        """Per text {"tier": {tier: p}, "category": {category: p}}."""
        import torch

        self.encoder.eval()
        out: list[dict[str, dict[str, float]]] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                logits = self.logits(texts[i:i + batch_size])
                tiers = torch.softmax(logits["tier"], -1).tolist()
                categories = torch.softmax(logits["category"], -1).tolist()
                out += [{"tier": dict(zip(TIERS, t)), "category": dict(zip(CATEGORIES, c))}
                        for t, c in zip(tiers, categories)]
        return out

    def fit(self, rows: Sequence[dict[str, str]], epochs: int, lr: float, batch_size: int, seed: int,
            warmup_share: float = 0.0) -> list[float]:
        """Cross-entropy on the tier, plus on the category where a row has one. Returns each epoch's mean loss."""
        import torch

        params = [p for p in self.encoder.parameters() if p.requires_grad] + list(self.heads.parameters())
        optimiser = torch.optim.AdamW(params, lr=lr)
        steps = epochs * -(-len(rows) // batch_size)
        warmup = max(1, int(warmup_share * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(   # linear warm-up, then linear decay to zero
            optimiser, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))
        texts = [r["text"] for r in rows]
        tiers = torch.tensor([TIERS.index(r["tier"]) for r in rows])
        categories = torch.tensor([CATEGORIES.index(r["category"]) if r["category"] in CATEGORIES else -100 for r in rows])
        generator = torch.Generator().manual_seed(seed)
        self.encoder.train()
        losses = []
        for _ in range(epochs):
            order, total = torch.randperm(len(texts), generator=generator), 0.0
            for i in range(0, len(texts), batch_size):
                idx = order[i:i + batch_size]
                logits = self.logits([texts[j] for j in idx])
                loss = torch.nn.functional.cross_entropy(logits["tier"], tiers[idx])
                if (categories[idx] >= 0).any():
                    loss = loss + torch.nn.functional.cross_entropy(logits["category"], categories[idx], ignore_index=-100)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(idx)
            losses.append(total / len(texts))
        self.encoder.eval()
        return losses


class RedFlagEnsemble:
    """Members trained alike on the same rows from different seeds (TRAIN["seeds"]), saved as member_0/,
    member_1/, ...; a text's probabilities are the members' mean."""

    def __init__(self, members: Sequence[RedFlagClassifier]):
        self.members = list(members)

    @staticmethod
    def member_dirs(model_dir: str | Path) -> list[Path]:
        dirs = [p for p in Path(model_dir).glob("member_*") if p.name.removeprefix("member_").isdigit()]
        return sorted(dirs, key=lambda p: int(p.name.removeprefix("member_")))

    @classmethod
    def load(cls, model_dir: str | Path = MODEL_DIR) -> "RedFlagEnsemble":
        dirs = cls.member_dirs(model_dir)
        if not dirs:
            raise RedFlagError(f"red-flag model {model_dir} has no member_0/ (the float members); "
                               "run: python -m medlib.chat.red_flags")
        return cls([RedFlagClassifier.load(d) for d in dirs])

    def save(self, model_dir: str | Path) -> None:
        stale = self.member_dirs(model_dir)[len(self.members):]
        if stale:  # loading would average them in
            raise RedFlagError(f"{stale[0]} is a member this ensemble does not have; remove it or save elsewhere")
        for i, member in enumerate(self.members):
            member.save(Path(model_dir) / f"member_{i}")

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, dict[str, float]]]:
        """Per text {"tier": {tier: p}, "category": {category: p}}: the members' mean."""
        each = [m.probabilities(texts, batch_size) for m in self.members]
        return [{head: {label: sum(probs[i][head][label] for probs in each) / len(each) for label in labels}
                 for head, labels in (("tier", TIERS), ("category", CATEGORIES))} for i in range(len(texts))]


def _p(probs: dict[str, dict[str, float]], tier: str) -> float:
    return probs["tier"][tier]


def _net(probs: dict[str, dict[str, float]]) -> float:
    """How much the classifier reads an emergency topic into a segment, now or not."""
    return probs["tier"]["urgent"] + probs["tier"]["safety_net"]


def _category(probs: dict[str, dict[str, float]]) -> str:
    return max(CATEGORIES, key=lambda c: probs["category"][c])


@dataclass(frozen=True)
class Thresholds:
    urgent: float        # the highest segment's P(urgent) that makes a message urgent
    safety_net: float    # the highest segment's P(urgent) + P(safety_net) that gives the safety net
    support: float       # the highest segment's P(support) that gives the support message
    urgent_zero_miss: float   # the same, where that segment's category is one of ZERO_MISS_CATEGORIES

    @classmethod
    def from_file(cls, path: Path) -> "Thresholds":
        if not path.exists():
            raise RedFlagError(f"{path} is missing; run: python -m medlib.chat.red_flags")
        try:
            t = json.loads(path.read_text())["thresholds"]
            return cls(*(float(t[name]) for name in ("urgent", "safety_net", "support", "urgent_zero_miss")))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise RedFlagError(f"{path}: no valid 'thresholds' ({type(exc).__name__}: {exc}); "
                               "run: python -m medlib.chat.red_flags --recalibrate") from exc


@dataclass(frozen=True)
class Scores:
    """A message's classifier scores, the maxima over its segments: what the thresholds are compared with."""
    urgent: float
    net: float
    support: float
    urgent_probs: dict[str, dict[str, float]]   # the most urgent segment's probabilities
    net_probs: dict[str, dict[str, float]]      # the segment most about an emergency topic


def scores_of(seg_probs: Sequence[dict[str, dict[str, float]]]) -> Scores:
    most_urgent = max(seg_probs, key=lambda p: _p(p, "urgent"))
    most_net = max(seg_probs, key=_net)
    return Scores(_p(most_urgent, "urgent"), _net(most_net), max(_p(p, "support") for p in seg_probs),
                  most_urgent, most_net)


def reads_zero_miss(scores: Scores, threshold: float) -> bool:
    """Whether the most urgent segment is read as suicide, self-harm, overdose or poisoning with P(urgent) at least
    `threshold` (the category head's own reading, before distress is given the crisis line)."""
    return scores.urgent >= threshold and _category(scores.urgent_probs) in ZERO_MISS_CATEGORIES


def category_leaned_to(scores: Scores) -> str | None:
    """The category a routine message leans to when some score reaches FLOOR_MIN (distress leans to the crisis
    line), else None: the message is clearly routine."""
    if max(scores.urgent, scores.net, scores.support) < FLOOR_MIN:
        return None
    if scores.support > scores.net:
        return "suicide_self_harm"
    return _category(scores.net_probs)


class RedFlagDetector:
    """The patterns first (they never miss what they match), then the classifier on every segment."""

    def __init__(self, classifier: RuntimeClassifier | RedFlagEnsemble, thresholds: Thresholds):
        self.classifier = classifier
        self.thresholds = thresholds

    @classmethod
    def load(cls, model_dir: str | Path = MODEL_DIR, threads: int | None = None) -> "RedFlagDetector":
        """The shipped detector as it was measured: the int8 ONNX runtime (medlib.chat.red_flag_runtime), no torch."""
        model_dir = Path(model_dir)
        thresholds = Thresholds.from_file(model_dir / "calibration.json")
        try:
            classifier = RuntimeClassifier.load(model_dir, threads)
        except FileNotFoundError as exc:
            raise RedFlagError(str(exc)) from None
        return cls(classifier, thresholds)

    def scores_many(self, texts: Sequence[str]) -> list[Scores]:
        """Each message's segments as one batch of their own, as the chat scores a message: the int8 runtime
        quantises activations over the whole batch, so a message batched with others could score otherwise."""
        return [scores_of(self.classifier.probabilities(segments(text))) for text in texts]

    def assess_many(self, texts: Sequence[str]) -> list[Assessment]:
        return [self._decide(text, scores) for text, scores in zip(texts, self.scores_many(texts))]

    def assess(self, text: str) -> Assessment:
        return self.assess_many([text])[0]

    def _affirmed(self, text: str, scores: Scores) -> Scores | None:
        """The scores of what the message affirms. The classifier can read "not suicidal" much like "suicidal",
        so a message that negates a known red-flag mention ("I am not suicidal", "no chest pain") is scored again
        with those mentions taken out (guardrails.strip_negated); None when nothing is left to score. Taking a
        negated mention out only ever lowers a score: what is left can be a fragment ("The baby is not floppy at
        all" -> "The baby is at all") the classifier reads as urgent though it reads the whole message as routine.
        On the tuning quarter this lowering changed 7 of 2,340 tiers: 2 fewer false alarms, no emergency lost."""
        affirmed = guardrails.strip_negated(text)
        if affirmed is text:  # nothing negated: the scores stand
            return scores
        if not re.search(r"[^\W\d_]{3}", affirmed):
            return None
        left = self.scores_many([affirmed])[0]
        return Scores(min(left.urgent, scores.urgent), min(left.net, scores.net), min(left.support, scores.support),
                      left.urgent_probs if left.urgent <= scores.urgent else scores.urgent_probs,
                      left.net_probs if left.net <= scores.net else scores.net_probs)

    def _decide(self, text: str, scores: Scores) -> Assessment:
        """The tier, from what the message affirms. The patterns flag only where the classifier gives at least
        FLOOR_MIN: alone, on the tuning quarter, they raised false alarms on 7% more of the messages that are not
        emergencies (knowledge questions name "suicide" or "heart attack"), for no emergency the classifier missed."""
        t = self.thresholds
        lang = guardrails.language_of(text)
        floor = guardrails.detect_red_flags(text)
        scores = self._affirmed(text, scores)
        if scores is not None and (scores.urgent >= t.urgent or (floor and scores.urgent >= FLOOR_MIN)
                                   or reads_zero_miss(scores, t.urgent_zero_miss)):
            p = scores.urgent_probs
            category = _category(p)
            if _p(p, "support") > _p(p, "urgent"):
                category = "suicide_self_harm"  # mostly distress: the crisis line fits, never "signs of a stroke"
            categories = list(dict.fromkeys([category, *(f.category for f in floor)]))
            return Assessment("urgent", categories, lang, p["tier"],
                              [f"classifier P(urgent)={scores.urgent:.2f}", *(e for f in floor for e in f.evidence)])
        if scores is None:
            return Assessment("routine", [], lang)
        distress = guardrails.distress_in_other_language(text) if lang != "en" else None
        if distress:  # in another language the classifier often misses distress; its words decide (issue 27)
            return Assessment("support", [], lang, {"support": scores.support}, [f"distress: {distress}"])
        if scores.net >= t.safety_net and not (scores.support >= t.support and scores.support > scores.net):
            return Assessment("safety_net", [_category(scores.net_probs)], lang, scores.net_probs["tier"])
        if scores.support >= t.support:
            return Assessment("support", [], lang, {"support": scores.support})
        return Assessment("routine", [], lang, {"safety_net": scores.net, "support": scores.support},
                          leaning=category_leaned_to(scores))


# ------------------------------------------------------------------ training and measurement
def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def wilson_ci95(hits: int, n: int) -> list[float] | None:
    """The 95% Wilson score interval of a share hits / n (scipy): how far a held-out rate can be trusted."""
    from scipy.stats import binomtest

    if not n:
        return None
    interval = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(interval.low), 4), round(float(interval.high), 4)]


def measure(rows: Sequence[dict[str, str]], assessed: Sequence[Assessment]) -> dict[str, Any]:
    """Every number the targets name, by tier, category, group and language, from labelled rows and assessments."""
    pairs = list(zip(rows, assessed))
    urgent = [(r, a) for r, a in pairs if r["tier"] == "urgent"]
    not_urgent = [(r, a) for r, a in pairs if r["tier"] != "urgent"]
    routine = [(r, a) for r, a in pairs if r["tier"] == "routine"]
    support = [(r, a) for r, a in pairs if r["tier"] == "support"]

    def counted(subset, hit) -> dict[str, Any]:
        flags = [hit(r, a) for r, a in subset]
        return {"n": len(flags), "hits": sum(flags), "rate": _share(flags), "ci95": wilson_ci95(sum(flags), len(flags))}

    out: dict[str, Any] = {
        "n": len(pairs), "by_tier": {t: sum(r["tier"] == t for r in rows) for t in TIERS},
        "urgent_recall": counted(urgent, lambda r, a: a.tier == "urgent"),
        "urgent_or_net_recall": counted(urgent, lambda r, a: a.tier in ("urgent", "safety_net")),
        "not_urgent_flagged_urgent": counted(not_urgent, lambda r, a: a.tier == "urgent"),
        "routine_urgent_rate": counted(routine, lambda r, a: a.tier == "urgent"),
        "routine_net_rate": counted(routine, lambda r, a: a.tier == "safety_net"),
        "support_rate": counted(support, lambda r, a: a.tier == "support"),
        "support_flagged_urgent": counted(support, lambda r, a: a.tier == "urgent"),
        "safety_net_rows": {t: sum(a.tier == t for r, a in pairs if r["tier"] == "safety_net") for t in TIERS},
        "urgent_category_right": counted([(r, a) for r, a in urgent if a.tier == "urgent"],
                                         lambda r, a: r["category"] in a.categories),
        "confusion": {t: {u: sum(1 for r, a in pairs if r["tier"] == t and a.tier == u) for u in TIERS} for t in TIERS},
    }
    out["per_category_recall"] = {c: counted([(r, a) for r, a in urgent if r["category"] == c],
                                             lambda r, a: a.tier == "urgent") for c in CATEGORIES}
    out["per_group"] = {f"{t}/{g}": counted([(r, a) for r, a in pairs if r["tier"] == t and r["group"] == g],
                                            lambda r, a: a.tier == r["tier"])
                        for t, g in sorted({(r["tier"], r["group"]) for r in rows})}
    out["per_language"] = {lang: {"urgent_recall": counted([(r, a) for r, a in urgent if r["lang"] == lang],
                                                           lambda r, a: a.tier == "urgent"),
                                  "not_urgent_flagged_urgent": counted([(r, a) for r, a in not_urgent if r["lang"] == lang],
                                                                       lambda r, a: a.tier == "urgent"),
                                  "language_read": counted([(r, a) for r, a in pairs if r["lang"] == lang],
                                                           lambda r, a: a.lang == r["lang"])}
                           for lang in LANGUAGES}
    return out


def targets_met(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target (TARGETS, and 1.0 for suicide and overdose recall) against a measure() report: the measured
    rate, its counts and 95% interval, and whether it is met (by the rate; the interval says how sure that is)."""
    counted = {**{name: report[name] for name in TARGETS},
               **{f"{c}_recall": report["per_category_recall"][c] for c in ZERO_MISS_CATEGORIES}}
    bounds = {**TARGETS, **{f"{c}_recall": 1.0 for c in ZERO_MISS_CATEGORIES}}
    out = {}
    for name, bound in bounds.items():
        rate = counted[name]["rate"]
        at_most = name in ("routine_urgent_rate", "routine_net_rate")
        out[name] = {"target": ("<= " if at_most else ">= ") + str(bound), "measured": rate,
                     "met": rate is not None and (rate <= bound if at_most else rate >= bound),
                     **{k: counted[name][k] for k in ("hits", "n", "ci95")}}
    return out


def highest_threshold(values: Sequence[float], aim: float) -> float:
    """The highest threshold t with share(values >= t) >= aim (values: the positives' scores)."""
    if not values:
        raise RedFlagError("no examples to calibrate on")
    ordered = sorted(values, reverse=True)
    k = max(1, -(-int(round(aim * len(ordered) * 1000)) // 1000))  # ceil, float-safe
    return round(ordered[min(k, len(ordered)) - 1] - 1e-6, 6)


def lowest_threshold(values: Sequence[float], budget: float) -> float:
    """The lowest threshold t with share(values >= t) <= budget (values: the negatives' scores)."""
    if not values:
        raise RedFlagError("no examples to calibrate on")
    ordered = sorted(values, reverse=True)
    k = int(budget * len(ordered) + 1e-9)          # at most k negatives may reach t
    return round(ordered[k] + 1e-6, 6) if k < len(ordered) else 0.0


def choose_thresholds(rows: Sequence[dict[str, str]], scores: Sequence[Scores],
                      classifier: RuntimeClassifier | RedFlagEnsemble) -> Thresholds:
    """On the tuning quarter: urgent as low as 2% false alarms among the other messages allows (so recall is as
    high as that budget lets it be), the safety net as wide as 10% of routine messages allows, support for
    nineteen in twenty distress messages; then the lower urgent threshold of ZERO_MISS_CATEGORIES."""
    of = lambda keep, attr: [getattr(s, attr) for r, s in zip(rows, scores) if keep(r["tier"])]  # noqa: E731
    urgent = lowest_threshold(of(lambda t: t != "urgent", "urgent"), AIMS["not_urgent_flagged_urgent"])
    base = Thresholds(urgent, lowest_threshold(of(lambda t: t == "routine", "net"), AIMS["routine_net_rate"]),
                      highest_threshold(of(lambda t: t == "support", "support"), AIMS["support_recall"]), urgent)
    return replace(base, urgent_zero_miss=zero_miss_threshold(rows, scores, RedFlagDetector(classifier, base)))


def zero_miss_threshold(rows: Sequence[dict[str, str]], scores: Sequence[Scores], detector: RedFlagDetector) -> float:
    """The urgent threshold where the classifier reads suicide, self-harm, overdose or poisoning (the categories
    whose recall target is 1.0), from the detector's own (its urgent_zero_miss equal to its urgent threshold). On the
    tuning quarter, each P(urgent) at which a message it does not flag urgent would become urgent is a candidate;
    the one kept has the least cost, MISS_COST for each emergency still missed and 1 for each other message flagged
    urgent, among those keeping routine messages flagged urgent and distress given support within TARGETS (the
    highest on a tie; the detector's urgent threshold when no candidate costs less)."""
    texts = [r["text"] for r in rows]
    tiers = [detector._decide(text, s).tier for text, s in zip(texts, scores)]
    affirmed = [detector._affirmed(text, s) for text, s in zip(texts, scores)]
    movable = sorted(((a.urgent, r["tier"], got) for r, a, got in zip(rows, affirmed, tiers)
                      if got != "urgent" and a is not None and reads_zero_miss(a, 0.0)), key=lambda m: -m[0])
    routine_n, support_n = sum(r["tier"] == "routine" for r in rows), sum(r["tier"] == "support" for r in rows)
    routine_urgent = sum(r["tier"] == "routine" and got == "urgent" for r, got in zip(rows, tiers))
    support_given = sum(r["tier"] == "support" and got == "support" for r, got in zip(rows, tiers))
    best, best_cost, cost = detector.thresholds.urgent, 0, 0
    for i, (p, tier, got) in enumerate(movable):
        cost += -MISS_COST if tier == "urgent" else 1
        routine_urgent += tier == "routine"
        support_given -= tier == "support" and got == "support"
        if i + 1 < len(movable) and movable[i + 1][0] == p:
            continue   # a threshold takes every message with this score
        within = (routine_urgent <= TARGETS["routine_urgent_rate"] * routine_n
                  and support_given >= TARGETS["support_rate"] * support_n)
        if within and cost < best_cost:
            best, best_cost = round(p - 1e-6, 6), cost
    return best


def split_for_tuning(rows: Sequence[dict[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """(fit, tune): a seeded `fraction` of each tier-and-category's rows is kept aside to choose the thresholds
    on the very model that ships, so the thresholds fit that model's scores."""
    import random

    fit, tune = [], []
    for key in sorted({(r["tier"], r["category"]) for r in rows}):
        group = [r for r in rows if (r["tier"], r["category"]) == key]
        random.Random(f"{seed}-{key}").shuffle(group)
        k = round(len(group) * fraction)
        tune += group[:k]
        fit += group[k:]
    return fit, tune


def heldout_report(detector: RedFlagDetector, held: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The detector on the held-out rows: every measure, the targets, the patterns alone, and what it got wrong."""
    assessed = detector.assess_many([r["text"] for r in held])
    report = measure(held, assessed)
    patterns = [bool(guardrails.detect_red_flags(r["text"])) for r in held]
    wrong = [(r, a) for r, a in zip(held, assessed)
             if (r["tier"] == "urgent") != (a.tier == "urgent") or (r["tier"] == "support") != (a.tier == "support")]
    listed = [{"text": r["text"], "tier": r["tier"], "category": r["category"], "got": a.tier, "got_categories": a.categories}
              for r, a in wrong if r["part"] in ERRORS_LISTED_FOR]
    blind = Counter(f"{r['part']}: {r['tier']}/{r['group']} ({r['category']}) -> {a.tier}"
                    for r, a in wrong if r["part"] not in ERRORS_LISTED_FOR)
    by_part = {}
    for part in dict.fromkeys(r["part"] for r in held):
        pairs = [(r, a) for r, a in zip(held, assessed) if r["part"] == part]
        part_report = measure([r for r, _ in pairs], [a for _, a in pairs])
        by_part[part] = {name: part_report[name] for name in (*TARGETS, "not_urgent_flagged_urgent")}
        by_part[part]["per_category_recall"] = part_report["per_category_recall"]
    unread = [(r, a) for r, a in zip(held, assessed) if r["part"] not in ERRORS_LISTED_FOR]
    return {"heldout": report, "targets": targets_met(report),
            "targets_unread_parts": targets_met(measure([r for r, _ in unread], [a for _, a in unread])),
            "heldout_by_part": by_part,
            "heldout_routes": routes_taken(held, assessed),
            "heldout_patterns_only": {"urgent_recall": _share([p for r, p in zip(held, patterns) if r["tier"] == "urgent"]),
                                      "not_urgent_flagged_urgent": _share([p for r, p in zip(held, patterns) if r["tier"] != "urgent"])},
            "heldout_errors": listed, "heldout_errors_blind_parts": dict(sorted(blind.items()))}


def routes_taken(held: Sequence[dict[str, str]], assessed: Sequence[Assessment]) -> dict[str, dict[str, int]]:
    """The chat route (medlib.chat.routes, with the router's label for each message) every held-out message takes,
    by its tier: the target is that no emergency or distress reaches the greeting or the fallback; the routine rows
    show what that costs."""
    labels = [d.label for d in Router.from_files().route_many([r["text"] for r in held])]
    taken: dict[str, dict[str, int]] = {t: {} for t in TIERS}
    for row, a, label in zip(held, assessed, labels):
        name = route_for(Signals.of(a, label)).name
        taken[row["tier"]][name] = taken[row["tier"]].get(name, 0) + 1
    return taken


def remeasure(model_dir: str | Path = MODEL_DIR, heldout_files: Sequence[str | Path] = HELDOUT_FILES) -> dict[str, Any]:
    """Measure the shipped model again on the tuning quarter and the held-out set (after a change to the patterns,
    say) and rewrite those parts of calibration.json; the model and its thresholds stay as trained."""
    path = Path(model_dir) / "calibration.json"
    result = json.loads(path.read_text())
    rows = read_red_flag_examples()
    held = read_heldout(heldout_files, rows)
    fit, tune = split_for_tuning(rows, result["training"]["tune_fraction"], result["training"]["split_seed"])
    detector = RedFlagDetector.load(model_dir)
    result["tuning_quarter"] = measure(tune, detector.assess_many([r["text"] for r in tune]))
    result.update(heldout_report(detector, held))
    result["data"] = data_summary(rows, fit, tune, held, heldout_files)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def train_red_flag_model(out_dir: str | Path = MODEL_DIR, data_file: str | Path = RED_FLAG_FILE,
                         heldout_files: Sequence[str | Path] = HELDOUT_FILES, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train each member on three quarters of the training set and save the float members; then `calibrate` (the
    runtime, the thresholds on the last quarter, the held-out measures, calibration.json)."""
    s = {**TRAIN, **(settings or {})}
    rows = read_red_flag_examples(data_file)
    held = read_heldout(heldout_files, rows)
    known = {normalise(r["text"]) for r in rows + held}
    extra = [r for r in router_examples() if normalise(r["text"]) not in known]  # a shared text would leak
    fit, _ = split_for_tuning(rows, s["tune_fraction"], s["split_seed"])
    members, losses = [], []
    for seed in s["seeds"]:  # the same rows, a different initialisation and order
        member = RedFlagClassifier.new(s["lora_r"], s["lora_alpha"], s["lora_dropout"], seed)
        losses.append([round(x, 4) for x in member.fit(fit + extra, s["epochs"], s["lr"], s["batch_size"], seed,
                                                        s["warmup_share"])])
        members.append(member)
    ensemble = RedFlagEnsemble(members)
    ensemble.save(out_dir)
    training = {**s, "epoch_losses": losses,
                "training_only": f"{len(extra)} router examples (reference.jsonl + labelled.jsonl) as routine"}
    return calibrate(out_dir, data_file, heldout_files, training, ensemble)


def calibrate(model_dir: str | Path = MODEL_DIR, data_file: str | Path = RED_FLAG_FILE,
              heldout_files: Sequence[str | Path] = HELDOUT_FILES, training: dict[str, Any] | None = None,
              ensemble: RedFlagEnsemble | None = None) -> dict[str, Any]:
    """From the saved float members: export the runtime the chat runs, choose its thresholds on the tuning quarter,
    measure the held-out set, and write calibration.json (training: the settings it was trained with; default
    what calibration.json already says)."""
    model_dir = Path(model_dir)
    calibration = model_dir / "calibration.json"
    if training is None:
        if not calibration.exists():
            raise RedFlagError(f"{calibration} is missing: train first (python -m medlib.chat.red_flags)")
        training = json.loads(calibration.read_text())["training"]
    rows = read_red_flag_examples(data_file)
    held = read_heldout(heldout_files, rows)
    fit, tune = split_for_tuning(rows, training["tune_fraction"], training["split_seed"])
    clf = ensemble or RedFlagEnsemble.load(model_dir)
    runtime_files = export_runtime(clf.members, model_dir, TIERS, CATEGORIES)
    runtime = RuntimeClassifier.load(model_dir)  # thresholds and every number come from what the chat runs
    unset = Thresholds(2.0, 2.0, 2.0, 2.0)
    tune_scores = RedFlagDetector(runtime, unset).scores_many([r["text"] for r in tune])
    float_scores = RedFlagDetector(clf, unset).scores_many([r["text"] for r in tune])
    thresholds = choose_thresholds(tune, tune_scores, runtime)
    detector = RedFlagDetector(runtime, thresholds)
    runtime_files["tuning_quarter_vs_float"] = {
        "max_abs_diff_p_urgent": round(max(abs(a.urgent - b.urgent) for a, b in zip(tune_scores, float_scores)), 4),
        "same_side_of_urgent_threshold": _share([(a.urgent >= thresholds.urgent) == (b.urgent >= thresholds.urgent)
                                                 for a, b in zip(tune_scores, float_scores)])}
    result = {
        "what": f"medlib red-flag detector: four tiers and eleven categories; the mean of {len(clf.members)} "
                "all-MiniLM-L6-v2 + LoRA members (two heads each), run as one int8 ONNX graph; regular expressions "
                "as a floor",
        "thresholds": {**asdict(thresholds),
                       "rule": f"the highest thresholds reaching {AIMS} on the tuning quarter of the training set; "
                               f"urgent_zero_miss, where the classifier reads {' or '.join(ZERO_MISS_CATEGORIES)}: "
                               f"the least {MISS_COST} per emergency missed + 1 per other message flagged urgent "
                               "there, within the targets for routine messages flagged urgent and for support"},
        "training": training,
        "runtime": runtime_files,
        "tuning_quarter": measure(tune, detector.assess_many([r["text"] for r in tune])),
        **heldout_report(detector, held),
        "data": data_summary(rows, fit, tune, held, heldout_files),
        "command": "python -m medlib.chat.red_flags",
    }
    calibration.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_model_card(model_dir, len(clf.members))
    return result


def data_summary(rows: Sequence[dict[str, str]], fit: Sequence, tune: Sequence, held: Sequence[dict[str, str]],
                 heldout_files: Sequence[str | Path]) -> dict[str, Any]:
    """calibration.json's "data": the files, and how many rows each part and tier has."""
    return {"training_file": "medlib/chat_data/red_flags.jsonl (python -m medlib.chat.red_flag_set)",
            "heldout_files": [f"medlib/chat_data/{Path(p).name}" for p in heldout_files],
            "heldout_note": "each part written separately; never trained or tuned on",
            "parts": {"fit": len(fit), "tune": len(tune), "heldout": len(held), **Counter(r["part"] for r in held)},
            "sizes": {name: {t: sum(r["tier"] == t for r in part) for t in TIERS}
                      for name, part in (("training", rows), ("heldout", held))}}


def write_model_card(model_dir: Path, members: int) -> None:
    """The model folder's README.md (in place of peft's generic card)."""
    (model_dir / "README.md").write_text(
        f"# medlib red-flag classifier\n\nThe mean of {members} members, each all-MiniLM-L6-v2 + LoRA + two linear "
        f"heads (tier: {', '.join(TIERS)}; category: {', '.join(CATEGORIES)}), trained alike from different seeds by "
        "`python -m medlib.chat.red_flags` on medlib/chat_data/red_flags.jsonl. The chat runs runtime.onnx (one graph "
        "for every member and their mean) + runtime.safetensors (int8 weights) on ONNX Runtime; member_*/ hold the "
        "float members it was exported from (adapter_model.safetensors + heads.safetensors). Thresholds, held-out "
        "measures and targets, all on the runtime: calibration.json.\n")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The targets as the README shows them."""
    lines = []
    for name, t in result["targets"].items():
        measured = "n/a" if t["measured"] is None else (f"{t['measured']:.3f} ({t['hits']}/{t['n']}, 95% CI "
                                                       f"{t['ci95'][0]:.3f}-{t['ci95'][1]:.3f})")
        lines.append(f"{name:>28}: {measured} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
    return lines


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlib.chat.red_flags", description=train_red_flag_model.__doc__)
    parser.add_argument("--out", default=str(MODEL_DIR), help="model folder to write (default: %(default)s)")
    parser.add_argument("--remeasure", action="store_true", help=remeasure.__doc__.split("\n")[0])
    parser.add_argument("--recalibrate", action="store_true", help=calibrate.__doc__.split("\n")[0])
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = (remeasure(args.out) if args.remeasure else calibrate(args.out) if args.recalibrate
              else train_red_flag_model(args.out))
    print("\n".join(summary_lines(result)))
    print(f"thresholds {result['thresholds']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
