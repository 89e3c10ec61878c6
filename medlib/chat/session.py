"""ChatSession: routed, multi-turn medical chat on a base model plus an optional adapter.

    session = ChatSession.from_profile("local")          # the profile's Med-Nirvana, else the base model
    reply = session.reply("I have had a fever for 3 days")  # Reply(kind="medical", text=..., ...)
    replies = run_script(session, ["hi", "I have a headache", "who won the match?"])

Every message is cleaned (guardrails.clean_input), given a red-flag tier by meaning and by pattern
(medlib.chat.red_flags: urgent, safety_net, support or routine), and routed (medical / greeting / other);
the route table (medlib.chat.routes) then decides what the user sees. An urgent message gets the category's
urgent-care message and never reaches the model, a greeting or the fallback; distress gets a support
message; a safety-net message gets the model's answer and the category's one-line safety net; a message in
another language gets a short "English only" reply. The model's prompt is the training system prompt + the
kept history + the new message, rendered by medlib.prompts.render_chat (the same template as training). An
answer that states a dose or regimen ends with a caution to check it with a pharmacist or clinician.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from medlib.chat import guardrails
from medlib.chat.red_flags import RedFlagDetector
from medlib.chat.router import RouteDecision, Router
from medlib.chat.routes import Signals, route_for
from medlib.config import ChatRecipe, load_chat
from medlib.models import ModelNotFoundError
from medlib.paths import resolve
from medlib.prompts import effective_system_prompt, render_chat
from medlib.runs import METADATA_FILE, RunRecord, layout, load_run

log = logging.getLogger(__name__)
StreamFn = Callable[[str], None]


@dataclass
class Reply:
    kind: str                       # the route taken (medlib.chat.routes.ROUTE_NAMES), or "empty"
    text: str                       # everything shown to the user, in order
    answer: str | None = None       # the model's own answer, when it was asked
    tier: str = "routine"           # the red-flag tier: urgent | safety_net | support | routine
    category: str | None = None     # the emergency category of an urgent or safety-net message
    red_flags: list[str] = field(default_factory=list)   # every urgent category found
    notices: list[str] = field(default_factory=list)
    route: RouteDecision | None = None
    disclaimer: bool = False
    dropped_turns: int = 0          # history turns left out to fit the context
    lang: str = "en"                # the language the message was read as
    dose_caution: bool = False      # the answer stated a dose, so the caution line was added


def fit_history(tokenizer: Any, system_prompt: str, history: Sequence[tuple[str, str]], user_text: str,
                budget: int) -> tuple[list[dict[str, str]], int, bool]:
    """Messages whose rendered prompt fits `budget` tokens: the system prompt always, then as many
    of the most recent (user, assistant) turns as fit, then the new user message (cut from the
    end, as a last resort, when it alone does not fit). Returns (messages, dropped_turns, cut)."""
    def build(turns: Sequence[tuple[str, str]], text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system_prompt}]
        for u, a in turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": text}]

    def n_tokens(msgs: list[dict[str, str]]) -> int:
        return len(tokenizer(render_chat(tokenizer, msgs, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"])

    turns = list(history)
    dropped = 0
    while turns and n_tokens(build(turns, user_text)) > budget:
        turns.pop(0)  # oldest first
        dropped += 1
    msgs = build(turns, user_text)
    cut = False
    if n_tokens(msgs) > budget:
        overflow = n_tokens(msgs) - budget
        ids = tokenizer(user_text, add_special_tokens=False)["input_ids"]
        if overflow >= len(ids):
            raise ValueError(f"the system prompt alone does not fit the {budget}-token history budget")
        user_text = tokenizer.decode(ids[: len(ids) - overflow - 8], skip_special_tokens=True)
        msgs = build(turns, user_text)
        cut = True
    return msgs, dropped, cut


def find_adapter(path: str | Path) -> Path | None:
    """A run folder or an adapter folder -> the folder holding adapter_config.json, or None."""
    path = Path(path)
    for candidate in (path, path / "adapter", path / "final_adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


def trained_with(adapter_dir: Path) -> RunRecord | None:
    """What a medlib run recorded about itself (run_metadata.json next to or above the adapter), or
    None for an adapter from elsewhere."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / METADATA_FILE).exists():
            return RunRecord.read(folder)
    return None


def model_and_prompt(recipe: ChatRecipe, adapter_dir: Path | None) -> tuple[str, str, str | None]:
    """(base model, system prompt, notice) for a chat recipe and an adapter. The run folder says what
    the adapter was trained on and with which prompt (the seeds' single-stage chatbots use another
    base model or instruction than the profile's Med-Nirvana); the chat recipe's own prompt wins."""
    run = trained_with(adapter_dir) if adapter_dir else None
    base_model, notice = recipe.model.name, None
    if run and run.base_model != base_model:
        notice = (f"The adapter was trained on {run.base_model}: loading that base model "
                  f"instead of the chat recipe's {base_model}.")
        base_model = run.base_model
    prompt = recipe.prompt.system_prompt or (run.system_prompt if run else None)
    return base_model, effective_system_prompt(prompt), notice


class ChatSession:
    def __init__(self, model: Any, tokenizer: Any, router: Router, recipe: ChatRecipe,
                 red_flags: RedFlagDetector, system_prompt: str | None = None, notices: Iterable[str] = (),
                 model_name: str | None = None, adapter_used: Path | None = None):
        if red_flags is None:  # fail safe: no chat without the red-flag detector
            raise ValueError("ChatSession needs a RedFlagDetector; it never runs without red-flag detection")
        self.model = model
        self.tokenizer = tokenizer
        self.router = router
        self.red_flags = red_flags
        self.recipe = recipe
        self.system_prompt = effective_system_prompt(system_prompt or recipe.prompt.system_prompt)
        self.model_name = model_name or recipe.model.name
        self.adapter_used = adapter_used
        self.startup_notices = list(notices)
        self.history: list[tuple[str, str]] = []
        self.answers_given = 0
        self.temperature = recipe.generation.temperature
        self.max_new_tokens = recipe.generation.max_new_tokens
        self.context_tokens = recipe.history.max_context_tokens
        self._special_tokens = list(getattr(tokenizer, "all_special_tokens", []) or [])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_profile(cls, profile: str = "local", adapter: str | Path | None = None,
                     overrides: Iterable[str] = (), router: Router | None = None,
                     red_flags: RedFlagDetector | None = None, preset: str | None = None,
                     runs_root: str | Path | None = None, recipe: ChatRecipe | None = None) -> "ChatSession":
        """Load the profile's chat recipe, the red-flag detector, the base model, the adapter and the router.

        The red-flag detector loads first: if it cannot load, this raises (red_flags.RedFlagError)
        and no chat starts.

        adapter=None uses the recipe's run (the profile's Med-Nirvana) under runs_root (default
        outputs/<profile>); when that does not exist yet a notice says so and the base model runs.
        An explicit adapter that does not exist is an error. `recipe`: an already loaded chat recipe.
        """
        recipe = recipe or load_chat(profile, overrides, preset)
        if red_flags is None:
            model_dir = recipe.guardrails.red_flag_model
            red_flags = RedFlagDetector.load(resolve(model_dir)) if model_dir else RedFlagDetector.load()
        notices = []
        adapter_dir = None
        if adapter is not None:
            adapter_dir = find_adapter(adapter)
            if adapter_dir is None:
                raise ModelNotFoundError(f"adapter {adapter} has no adapter_config.json (nor adapter/ inside it)")
        elif recipe.run:
            default = layout(profile, runs_root).run(recipe.run)
            adapter_dir = find_adapter(default)
            if adapter_dir is None:
                notices.append(f"No trained adapter at {default} yet: running the base model "
                               f"{recipe.model.name} without fine-tuning.")
        base_model, system_prompt, notice = model_and_prompt(recipe, adapter_dir)
        if notice:
            notices.append(notice)
        model, tokenizer = load_run(base_model, adapter_dir, load_in_4bit=recipe.model.load_in_4bit)
        if router is None:
            files = recipe.router
            router = Router.from_files(files.calibration_file and resolve(files.calibration_file),
                                       files.reference_file and resolve(files.reference_file))
        return cls(model, tokenizer, router, recipe, red_flags, system_prompt=system_prompt, notices=notices,
                   model_name=base_model, adapter_used=adapter_dir)

    def describe(self) -> str:
        """For the operator's console: paths included."""
        return (f"profile {self.recipe.profile}, model {self.model_name}, "
                f"adapter {self.adapter_used or 'none (base model)'}, temperature {self.temperature}")

    @property
    def run_name(self) -> str | None:
        """The run folder's name (med-nirvana), never its path; None for the base model alone."""
        if self.adapter_used is None:
            return None
        path = Path(self.adapter_used)
        return (path.parent if path.name in ("adapter", "final_adapter") else path).name

    def public_description(self) -> str:
        """For clients (the page, GET /v1/models): names only, no file path of the server."""
        model = self.model_name
        if Path(model).is_absolute() or Path(model).exists():
            model = Path(model).name
        return (f"profile {self.recipe.profile}, run {self.run_name or 'none (base model)'}, model {model}, "
                f"temperature {self.temperature}")

    def fork(self, history: Sequence[tuple[str, str]] = (), answers_given: int = 0,
             temperature: float | None = None, max_new_tokens: int | None = None) -> "ChatSession":
        """A session sharing this one's model, tokenizer, router and red-flag detector, with its own
        history: one per API request or browser conversation. max_new_tokens can only lower the
        recipe's limit."""
        twin = copy.copy(self)
        twin.history = list(history)
        twin.answers_given = answers_given
        if temperature is not None:
            twin.temperature = float(temperature)
        if max_new_tokens is not None:
            twin.max_new_tokens = min(int(max_new_tokens), self.max_new_tokens)
        return twin

    def reset(self) -> None:
        self.history.clear()
        self.answers_given = 0

    # ------------------------------------------------------------------ one turn
    def reply(self, text: str | None, stream: StreamFn | None = None) -> Reply:
        """Answer one user message. `stream` receives the reply's text piece by piece (the model
        answer token by token), in the same order as Reply.text."""
        parts: list[str] = []

        def emit(piece: str) -> None:
            parts.append(piece)
            if stream:
                stream(piece)

        g = self.recipe.guardrails
        clean = guardrails.clean_input(text, g.max_input_chars, self._special_tokens)
        for notice in clean.notices:
            emit(f"[{notice}]\n")
        if clean.empty:
            emit(guardrails.EMPTY_REPLY)
            return Reply("empty", "".join(parts), notices=clean.notices)

        # Red flags first, on every message; the route table then decides, in its order (routes.py).
        assessment = self.red_flags.assess(clean.text)
        route = self.router.route(clean.text)
        signals = Signals.of(assessment, route.label, g.answer_after_red_flag)
        chosen = route_for(signals)
        taken = dict(kind=chosen.name, tier=signals.tier, category=signals.categories[0] if signals.categories else None,
                     red_flags=assessment.categories if assessment.urgent else [], route=route, lang=assessment.lang)
        if chosen.before:
            emit(chosen.before(signals))
        if not chosen.answers(signals):
            return Reply(text="".join(parts), notices=clean.notices, **taken)
        if chosen.before:
            emit("\n\n")

        messages, dropped, cut = fit_history(self.tokenizer, self.system_prompt, self.history, clean.text,
                                             self.context_tokens - self.max_new_tokens)
        notices = list(clean.notices)
        if cut:
            notices.append("Your message was too long for the model's context; its end was left out.")
            emit(f"[{notices[-1]}]\n")
        disclaimer = g.disclaimer and self.answers_given == 0
        if disclaimer:
            emit(guardrails.DISCLAIMER + "\n\n")
        answer = self.generate(messages, emit)
        dose_caution = guardrails.mentions_dose(answer)
        if dose_caution:
            emit("\n\n" + guardrails.DOSE_CAUTION)
        if chosen.after:  # the safety net is the reply's last line
            emit("\n\n" + chosen.after(signals))
        self.history.append((messages[-1]["content"], answer))
        self.answers_given += 1
        return Reply(text="".join(parts), answer=answer, notices=notices, disclaimer=disclaimer,
                     dropped_turns=dropped, dose_caution=dose_caution, **taken)

    def build_prompt(self, text: str) -> tuple[str, int]:
        """The exact prompt the model would get for `text` now, and how many turns were dropped."""
        messages, dropped, _ = fit_history(self.tokenizer, self.system_prompt, self.history, text,
                                           self.context_tokens - self.max_new_tokens)
        return render_chat(self.tokenizer, messages, add_generation_prompt=True), dropped

    def generate(self, messages: list[dict[str, str]], emit: StreamFn) -> str:
        import torch
        from transformers import TextIteratorStreamer

        prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        gen = self.recipe.generation
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens,
                                      repetition_penalty=gen.repetition_penalty,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
        if self.temperature > 0:
            torch.manual_seed(gen.seed + self.answers_given)
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=gen.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer, **kwargs)
            except BaseException as exc:  # re-raised below, in the caller's thread
                error.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            emit(piece)
        thread.join()
        if error:
            raise error[0]
        answer = "".join(pieces).strip()
        if not answer:
            answer = "(the model returned an empty answer)"
            emit(answer)
        return answer


def run_script(session: ChatSession, messages: Sequence[str], stream: StreamFn | None = None) -> list[Reply]:
    """Send each message in turn (the notebook's scripted conversation); returns the replies."""
    return [session.reply(m, stream=stream) for m in messages]
