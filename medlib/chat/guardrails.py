"""Guardrails around the chat model: red-flag detection, the disclaimer and input clean-up.

Red flags are matched with regular expressions over the user's words, clause by clause, and a
match is ignored when a negation governs it in the same clause ("no chest pain", "I am not
suicidal", "denies shortness of breath"). Patterns are deliberately broad: a false alarm costs
the user one urgent-care sentence, a miss could cost much more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

URGENT_MESSAGE = (
    "This may be a medical emergency. Call your local emergency number (for example 911, 112 or 999) "
    "or go to the nearest emergency department now. Do not wait for an online answer."
)
URGENT_BY_CATEGORY = {
    "suicidal_thoughts": (
        "If you are thinking about ending your life or harming yourself, please reach out now: call your local "
        "emergency number, or a crisis line (for example 988 in the US, 116 123 Samaritans in the UK and Ireland). "
        "You do not have to face this alone."
    ),
    "overdose_poisoning": "If someone has taken an overdose or been poisoned, also call your local poison control centre.",
}
DISCLAIMER = (
    "Note: I am an AI assistant, not a doctor. This is general information, not a diagnosis or treatment; "
    "please see a qualified clinician about your own health."
)
GREETING_REPLY = (
    "Hello! I am a medical assistant. Describe your symptoms or ask a question about a health condition, "
    "a medicine or a test, and I will do my best to help."
)
FALLBACK_REPLY = (
    "I can only help with health and medical questions: symptoms, illnesses, medicines and their side effects, "
    "tests and results, and when to see a doctor. Please ask me something like that (I work best in English)."
)
EMPTY_REPLY = "Your message was empty. Please type a health question or describe your symptoms."

# Words that negate a symptom named later in the same clause.
_NEGATOR = (
    r"\b(?:no|not|never|without|denies|denied|deny|negative\s+for|free\s+of|nor|"
    r"(?:do|does|did|have|has|had|am|is|are|was|were|ca|can|could|would|wo)n[o']?t|cannot|"
    r"haven't|hasn't|isn't|aren't|wasn't|weren't|don't|doesn't|didn't|no\s+longer|ruled\s+out)\b"
)
_NEGATION_WINDOW = 6  # words before the symptom in which a negator counts
_CLAUSE_SPLIT = re.compile(r"[.;!?\n]+|,\s*(?:but|and|though|although|however)\b|\b(?:but|however|although|though)\b")


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")", re.IGNORECASE)


_CHEST = _rx(r"chest\s+(?:pain|pains|pressure|tightness|discomfort|is\s+(?:hurting|tight))", r"pain\s+in\s+(?:my|the)\s+chest",
             r"(?:tight|crushing|heavy|painful)\s+chest", r"chest\s+(?:feels|is|felt)\s+(?:\w+\s+){0,2}(?:tight|heavy|crushed|painful)", r"heart\s+attack")
_BREATH = _rx(r"short(?:ness)?\s+of\s+breath", r"breathless", r"can(?:no|')?t\s+breathe", r"cannot\s+breathe",
              r"(?:difficulty|trouble|struggling|hard)\s+(?:to\s+)?breath", r"out\s+of\s+breath", r"gasping",
              r"unable\s+to\s+breathe", r"(?:pain|spreading|radiating)\s+(?:\w+\s+){0,3}(?:to|down|into)\s+(?:my\s+)?(?:left\s+)?(?:arm|jaw)",
              r"cold\s+sweat")

RED_FLAG_PATTERNS: dict[str, list[tuple[re.Pattern[str], ...]]] = {
    # each entry: a tuple of patterns that must ALL match (un-negated) somewhere in the message
    "chest_pain_breathlessness": [(_CHEST, _BREATH), (_rx(r"(?:having|have)\s+a\s+heart\s+attack"),)],
    "stroke_signs": [(_rx(
        r"(?:face|mouth|smile)\s+(?:is\s+)?(?:drooping|droops|droopy|has\s+dropped|is\s+dropping)",
        r"droop\w*\s+(?:on\s+)?(?:one\s+side|face|mouth)", r"slurr(?:ed|ing)\s+(?:speech|words|my\s+words)",
        r"(?:speech|talking)\s+is\s+slurred", r"can(?:no|')?t\s+(?:speak|talk|lift\s+(?:my|his|her)\s+arm)",
        r"(?:sudden|suddenly)\s+(?:[\w']+\s+){0,4}(?:weak|numb|paralys|confus|lost\s+(?:vision|sight)|can'?t\s+(?:see|feel|move))",
        r"face\s+(?:feels|is|went|has\s+gone)\s+numb",
        r"(?:weak|weakness|numb|numbness)\s+(?:\w+\s+){0,3}(?:one\s+side|left\s+side|right\s+side)",
        r"(?:one|left|right)\s+side\s+of\s+(?:my|his|her|the)\s+(?:face|body)\s+(?:is\s+)?(?:numb|weak|drooping|paraly)",
        r"(?:having|had|think\s+(?:i|he|she)\s+(?:am|is|'m)\s+having)\s+a\s+stroke", r"signs?\s+of\s+(?:a\s+)?stroke"),)],
    "suicidal_thoughts": [(_rx(
        r"suicid", r"kill(?:ing)?\s+(?:my|him|her)sel(?:f|ves)", r"end(?:ing)?\s+(?:my|his|her)\s+(?:own\s+)?life", r"end(?:ing)?\s+it\s+all",
        r"take\s+my\s+(?:own\s+)?life", r"want\s+to\s+die", r"wish\s+i\s+(?:was|were)\s+dead",
        r"(?:hurt(?:ing)?|harm(?:ing)?|cut(?:ting)?)\s+myself", r"self[-\s]?harm", r"better\s+off\s+dead", r"no\s+reason\s+to\s+live"),)],
    "overdose_poisoning": [(_rx(
        r"overdos", r"od'?d\b", r"took\s+(?:too\s+many|a\s+(?:whole|full)\s+(?:bottle|box|pack)|all\s+(?:my|the|of\s+my))\s*(?:\w+\s+){0,2}(?:pills|tablets|medicine|meds|pack|bottle)?",
        r"(?:swallowed|drank|ate|drunk|ingested)\s+(?:\w+\s+){0,3}(?:bleach|poison|antifreeze|detergent|pesticide|rat\s+poison|weed\s*killer|batter(?:y|ies)|cleaning\s+(?:fluid|product))",
        r"(?<!food )poison(?:ed|ing)", r"carbon\s+monoxide"),)],
    "anaphylaxis": [(_rx(
        r"anaphyla", r"throat\s+(?:is\s+)?(?:closing|swelling|swollen|tight)", r"(?:tongue|lips?|face)\s+(?:is\s+|are\s+)?(?:swelling|swollen|swell)\w*\s+(?:\w+\s+){0,4}(?:after|from|since)",
        r"swollen\s+(?:tongue|lips|throat)", r"epi[-\s]?pen"),),
                    (_BREATH, _rx(r"bee\b", r"wasp", r"sting", r"peanut", r"nuts?\b", r"shellfish", r"allerg"))],
    "heavy_bleeding": [(_rx(
        r"bleeding\s+(?:\w+\s+){0,2}(?:heavily|a\s+lot|badly|profusely|non[-\s]?stop|everywhere)", r"heavy\s+bleeding",
        r"(?:won'?t|will\s+not|doesn'?t|does\s+not|can'?t|cannot)\s+stop\s+(?:the\s+)?bleeding",
        r"bleeding\s+(?:won'?t|will\s+not|doesn'?t|does\s+not)\s+stop", r"blood\s+(?:is\s+)?(?:spurting|pouring|gushing)",
        r"(?:vomiting|throwing\s+up)\s+blood", r"coughing\s+up\s+(?:a\s+lot\s+of|lots\s+of)\s+blood", r"soak(?:ing|ed)\s+(?:through\s+)?(?:a\s+)?(?:pad|pads|tampon)",
        r"lost\s+a\s+lot\s+of\s+blood"),)],
    "child_danger_signs": [(_rx(r"bab(?:y|ies)\b", r"infant\b", r"newborn\b", r"toddler\b", r"child(?:ren)?\b", r"kids?\b", r"son\b", r"daughter\b", r"\d+[-\s](?:month|week|day)[-\s]old"),
                            _rx(r"not\s+breathing", r"stopped\s+breathing", r"struggling\s+to\s+breathe", r"blue\s+(?:lips|face|skin)",
                                r"(?:lips|face|skin)\s+(?:is\s+|are\s+|turning\s+|turned\s+)?blue", r"(?:is|gone|went|very|floppy\s+and)\s+limp\b", r"floppy",
                                r"unresponsive", r"won'?t\s+wake", r"(?:can'?t|cannot)\s+(?:be\s+)?wake", r"hard\s+to\s+wake",
                                r"seizure", r"having\s+(?:a\s+)?fits?\b", r"fitting\b", r"convuls", r"stiff\s+neck", r"rash\s+(?:that\s+)?(?:does\s*n[o']?t|won'?t)\s+fade",
                                r"not\s+(?:feeding|drinking|eating)\s+(?:at\s+all|for)", r"no\s+wet\s+nappies", r"no\s+wet\s+diapers",
                                r"fever\s+(?:of\s+)?(?:over\s+|above\s+)?(?:3[89]|40|10[2-5])", r"high\s+fever\s+(?:\w+\s+){0,4}(?:under|months?)")),
                           ],
}
@dataclass
class RedFlag:
    category: str
    evidence: list[str]


def _clauses(text: str) -> list[str]:
    return [c for c in _CLAUSE_SPLIT.split(text) if c and c.strip()]


def _negated(clause: str, start: int) -> bool:
    before = clause[:start].split()[-_NEGATION_WINDOW:]
    return re.search(_NEGATOR, " ".join(before), re.IGNORECASE) is not None


def _unnegated_match(pattern: re.Pattern[str], clauses: list[str]) -> str | None:
    for clause in clauses:
        for m in pattern.finditer(clause):
            if not _negated(clause, m.start()):
                return m.group(0)
    return None


def detect_red_flags(text: str) -> list[RedFlag]:
    """Red-flag categories whose patterns all match, un-negated, in the message."""
    clauses = _clauses(text)
    flags = []
    for category, alternatives in RED_FLAG_PATTERNS.items():
        for patterns in alternatives:
            evidence = [_unnegated_match(p, clauses) for p in patterns]
            if all(e is not None for e in evidence):
                flags.append(RedFlag(category, [e for e in evidence if e]))
                break
    return flags


def urgent_message(flags: list[RedFlag]) -> str:
    extra = [URGENT_BY_CATEGORY[f.category] for f in flags if f.category in URGENT_BY_CATEGORY]
    return " ".join([URGENT_MESSAGE, *extra])


@dataclass
class CleanInput:
    text: str
    notices: list[str]
    empty: bool


def clean_input(text: str | None, max_chars: int, special_tokens: list[str] = ()) -> CleanInput:
    """Strip, cut to max_chars (with a notice) and remove chat-template control tokens, so a user
    cannot open a fake system turn by typing "<|im_start|>system"."""
    notices: list[str] = []
    text = "" if text is None else str(text)
    text = text.replace("\x00", "").strip()
    if len(text) > max_chars:
        notices.append(f"Your message was {len(text):,} characters long; only the first {max_chars:,} were read.")
        text = text[:max_chars].rstrip()
    for token in special_tokens:
        if token and token in text:
            text = text.replace(token, " ")
    text = text.strip()
    return CleanInput(text, notices, empty=not text)
