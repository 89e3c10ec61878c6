"""The chat's routes, in one table: which route a message takes, what it is shown, and whether the model answers.

Each message arrives with three signals: the red-flag tier and category (medlib.chat.red_flags: urgent,
safety_net, support or routine), the language it is written in, and the router's label (medical, greeting or
other). The first route in ROUTES whose `when` holds takes the message. The order is the safety argument:
urgent and support come before anything else, in every language, and greeting and fallback come after every
tier that is not routine, so an emergency or a distressed person never gets a greeting or the fallback. A routine message the
router does not read as medical gets them only when the detector reads it as clearly routine (every score under
red_flags.FLOOR_MIN); otherwise it is raised to the safety net of the category the detector leans to, because a
missed emergency worded as small talk ("ok im done. tonight is the night") must not get a canned greeting.

Adding a route is one entry here: its name, when it applies, the text shown before any answer, whether the
model answers, and a text after the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from medlib.chat import guardrails

if TYPE_CHECKING:  # a type only: red_flags imports this module (its held-out report walks the routes)
    from medlib.chat.red_flags import Assessment


@dataclass(frozen=True)
class Signals:
    tier: str               # urgent | safety_net | support | routine
    categories: tuple[str, ...]
    lang: str               # en | es | fr | de | pt
    label: str              # the router's: medical | greeting | other
    answer_after_urgent: bool = False   # the recipe's guardrails.answer_after_red_flag

    @classmethod
    def of(cls, assessment: Assessment, label: str, answer_after_urgent: bool = False) -> "Signals":
        tier, categories = assessment.tier, tuple(assessment.categories)
        if tier == "routine" and label != "medical" and assessment.leaning:  # not clearly routine: never the
            tier, categories = "safety_net", (assessment.leaning,)            # greeting or the fallback
        return cls(tier, categories, assessment.lang, label, answer_after_urgent)


def _urgent_text(s: Signals) -> str:
    return guardrails.urgent_message([guardrails.RedFlag(c, []) for c in s.categories])


def _safety_net_text(s: Signals) -> str:
    return guardrails.SAFETY_NETS[s.categories[0]]


@dataclass(frozen=True)
class Route:
    name: str
    when: Callable[[Signals], bool]
    before: Callable[[Signals], str] | None = None   # shown first; the whole reply when the model does not answer
    answers: Callable[[Signals], bool] = lambda s: False
    after: Callable[[Signals], str] | None = None    # shown after the model's answer


ROUTES: tuple[Route, ...] = (
    # An emergency: the urgent-care message; the model answers after it only when the recipe asks and the
    # router reads a medical question in English.
    Route("urgent", lambda s: s.tier == "urgent", before=_urgent_text,
          answers=lambda s: s.answer_after_urgent and s.label == "medical" and s.lang == "en"),
    # Distress in any language gets the support lines; in another language, the English-only note after them.
    Route("support", lambda s: s.tier == "support",
          before=lambda s: guardrails.SUPPORT_REPLY + ("" if s.lang == "en" else "\n\n" + guardrails.ENGLISH_ONLY_REPLY)),
    # Another language, no emergency or distress: never an emergency line, never the model (it was trained in English).
    Route("english_only", lambda s: s.lang != "en", before=lambda s: guardrails.ENGLISH_ONLY_REPLY),
    Route("safety_net", lambda s: s.tier == "safety_net", answers=lambda s: True, after=_safety_net_text),
    Route("greeting", lambda s: s.label == "greeting", before=lambda s: guardrails.GREETING_REPLY),
    Route("fallback", lambda s: s.label != "medical", before=lambda s: guardrails.FALLBACK_REPLY),
    Route("medical", lambda s: True, answers=lambda s: True),
)
ROUTE_NAMES = tuple(r.name for r in ROUTES)


def route_for(signals: Signals) -> Route:
    return next(route for route in ROUTES if route.when(signals))
