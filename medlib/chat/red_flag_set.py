"""The red-flag training set: medlib/chat_data/red_flags.jsonl, written from templates by a seeded generator.

    python -m medlib.chat.red_flag_set          # rewrites medlib/chat_data/red_flags.jsonl and prints its make-up

Rows are {"tier", "category", "group", "lang", "text"} (the tiers and categories of medlib.chat.red_flags). They
come from two places:
- medlib/chat_data/red_flags_seed.jsonl: hand-written messages (the first detector's set, relabelled into tiers);
- medlib/chat_data/red_flag_templates/*.json: template blocks with slots (FORMAT.md there), each drawn `n`
  times without repeats.
From the English urgent blocks the generator also derives two groups the detector must read: "typo" (lower
case, punctuation dropped, letters swapped) and "buried" (the emergency between routine sentences of the
templates' filler block). A text already in a held-out part (red_flags_heldout*.jsonl, written separately), or
one sharing NEAR_OVERLAP of its words with one, is never written here: it is counted and left out, so nothing is
trained on what is measured.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from medlib.chat.red_flags import (CATEGORIES, HELDOUT_FILES, LANGUAGES, NO_CATEGORY, RED_FLAG_FILE, TIERS,
                                   RedFlagError, read_heldout, read_red_flag_examples)
from medlib.chat.router import CHAT_DATA_DIR, normalise

SEED_FILE = CHAT_DATA_DIR / "red_flags_seed.jsonl"
TEMPLATE_DIR = CHAT_DATA_DIR / "red_flag_templates"
SEED = 3407
DERIVED = {"typo": 0.12, "buried": 0.15}   # derived rows per English urgent row
_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, slots: dict[str, list[str]], rng: random.Random, where: str, depth: int = 0) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in slots or not slots[name]:
            raise RedFlagError(f"{where}: slot {{{name}}} is not defined")
        value = rng.choice(slots[name])
        return _fill(value, slots, rng, where, depth + 1) if depth < 2 else value
    return _SLOT.sub(one, template)


def _check_block(block: dict[str, Any], where: str) -> None:
    for key in ("tier", "category", "group", "lang", "n", "templates"):
        if key not in block:
            raise RedFlagError(f"{where}: no {key!r}")
    if block["tier"] not in TIERS:
        raise RedFlagError(f"{where}: tier {block['tier']!r} is not one of {', '.join(TIERS)}")
    expected = CATEGORIES if block["tier"] in ("urgent", "safety_net") else (NO_CATEGORY,)
    if block["category"] not in expected:
        raise RedFlagError(f"{where}: category {block['category']!r} does not fit tier {block['tier']!r}")
    if block["lang"] not in LANGUAGES:
        raise RedFlagError(f"{where}: lang {block['lang']!r} is not one of {', '.join(LANGUAGES)}")


def expand(path: Path, rng: random.Random) -> tuple[list[dict[str, str]], list[str]]:
    """(rows, filler sentences) of one template file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    shared = data.get("slots", {})
    rows, fillers = [], []
    for i, block in enumerate(data.get("blocks", [])):
        where = f"{path.name} block {i}"
        if block.get("role") == "filler":
            fillers += list(block.get("templates", []))
            continue
        _check_block(block, where)
        slots = {**shared, **block.get("slots", {})}
        seen: dict[str, str] = {}
        for _ in range(block["n"] * 30):
            if len(seen) >= block["n"]:
                break
            text = " ".join(_fill(rng.choice(block["templates"]), slots, rng, where).split())
            seen.setdefault(normalise(text), text)
        rows += [{"tier": block["tier"], "category": block["category"], "group": block["group"], "lang": block["lang"],
                  "text": text} for text in seen.values()]
    return rows, fillers


def typo(text: str, rng: random.Random) -> str:
    """Lower case, punctuation mostly dropped, two neighbouring letters swapped in a word or two."""
    words = re.sub(r"[.,!?;:]", lambda m: m.group(0) if rng.random() < 0.2 else "", text.lower()).split()
    for _ in range(rng.choice((1, 2))):
        long_words = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
        if long_words:
            i = rng.choice(long_words)
            w, j = words[i], rng.randrange(1, len(words[i]) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def bury(text: str, fillers: list[str], rng: random.Random) -> str:
    before, after = rng.sample(fillers, rng.randint(1, 2)), rng.sample(fillers, rng.randint(1, 2))
    middle = text if text.endswith((".", "!", "?")) else text + "."
    return " ".join([*before, middle[0].upper() + middle[1:], *after])


NEAR_OVERLAP = 0.6  # Jaccard overlap of word sets from which a training text counts as a held-out text reworded


class NearTexts:
    """Texts, indexed by word, to ask whether another text shares NEAR_OVERLAP of its words with one of them."""

    def __init__(self, texts: Iterable[str]):
        self.words = [set(t.split()) for t in texts]
        self.index: dict[str, list[int]] = {}
        for i, words in enumerate(self.words):
            for word in words:
                self.index.setdefault(word, []).append(i)

    def near(self, text: str) -> bool:
        words = set(text.split())
        shared = Counter(i for word in words for i in self.index.get(word, ()))
        return any(n / len(words | self.words[i]) >= NEAR_OVERLAP for i, n in shared.items())


def build(seed_file: Path = SEED_FILE, template_dir: Path = TEMPLATE_DIR,
          heldout_files: Iterable[Path] = HELDOUT_FILES, seed: int = SEED) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The training rows and what was left out (duplicates, held-out texts)."""
    rng = random.Random(seed)
    rows = read_red_flag_examples(seed_file)
    fillers: list[str] = []
    files = sorted(template_dir.glob("*.json"))
    if not files:
        raise RedFlagError(f"no template files in {template_dir}")
    for path in files:
        made, filler = expand(path, rng)
        rows += made
        fillers += filler
    urgent_en = [r for r in rows if r["tier"] == "urgent" and r["lang"] == "en" and len(r["text"]) < 200]
    derived = [{**r, "group": "typo", "text": typo(r["text"], rng)} for r in rng.sample(urgent_en, int(DERIVED["typo"] * len(urgent_en)))]
    if fillers:
        derived += [{**r, "group": "buried", "text": bury(r["text"], fillers, rng)}
                    for r in rng.sample(urgent_en, int(DERIVED["buried"] * len(urgent_en)))]
    held = {normalise(r["text"]) for r in read_heldout([p for p in heldout_files if p.exists()])}
    near_held = NearTexts(held)
    out, seen, left_out = [], set(), Counter()
    for row in rows + derived:
        key = normalise(row["text"])
        if key in held:
            left_out["in the held-out set"] += 1
        elif near_held.near(key):
            left_out[f"near a held-out text (word overlap >= {NEAR_OVERLAP})"] += 1
        elif key in seen:
            left_out["duplicate"] += 1
        else:
            seen.add(key)
            out.append({k: row[k] for k in ("tier", "category", "group", "lang", "text")})
    return out, {"left_out": dict(left_out), "template_files": [p.name for p in files], "fillers": len(fillers)}


def summary(rows: list[dict[str, str]]) -> list[str]:
    lines = [f"{len(rows)} rows"]
    for key in ("tier", "lang"):
        lines.append(f"by {key}: " + ", ".join(f"{k} {n}" for k, n in sorted(Counter(r[key] for r in rows).items())))
    urgent = Counter(r["category"] for r in rows if r["tier"] == "urgent")
    lines.append("urgent by category: " + ", ".join(f"{c} {urgent[c]}" for c in CATEGORIES))
    lines.append("by tier/group: " + ", ".join(f"{t}/{g} {n}" for (t, g), n in sorted(Counter((r["tier"], r["group"]) for r in rows).items())))
    return lines


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlib.chat.red_flag_set", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RED_FLAG_FILE)
    args = parser.parse_args(list(argv) if argv is not None else None)
    rows, notes = build()
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print("\n".join(summary(rows)))
    print(f"left out: {notes['left_out'] or 'nothing'}; from {', '.join(notes['template_files'])} and {SEED_FILE.name} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
