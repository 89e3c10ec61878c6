"""The reproduction as steps: what each numbered notebook calls, one function per notebook. The roof:
only the notebooks, `medlib.study` and `medlib.reproduce` import it.

Recipes say what to do; the Layout (medlib.runs) says where. Every step writes under one output root (default
outputs/<profile>/), laid out as:
  data/<mixture>/    mixtures + manifest.json          <run_name>/   training runs (med-mix/, med-nirvana/)
  eval/              table3/table4 (md+csv), samples.md, per-question predictions
  figures/           PNGs                              notebooks/   executed notebooks
  chat/              the scripted chat transcript      study/<name>/ the DMT and handoff studies   REPORT.md
A notebook run with out_dir=/tmp/x therefore never touches outputs/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib import config, plots
from medlib.chat.session import ChatSession, run_script
from medlib.config import TrainRecipe
from medlib.data.mixtures import build_mixture
from medlib.evaluate.suite import run_all
from medlib.evaluate.tables import write_table3, write_table4
from medlib.report import write_report
from medlib.runs import layout, stage_recipes
from medlib.training.run import train_run


# ------------------------------------------------------------------------------------------ steps
# Every step takes the same four: profile, out_dir, preset and overrides (key=value, the --set language; each
# recipe takes the overrides of its own sections, config.overrides_for), plus resume/overwrite for training.
STEP_KINDS = ("train", "eval", "chat")   # an override none of these recipes takes is an error at any step


def _checked(overrides: Iterable[str]) -> list[str]:
    return config.check_overrides(overrides, STEP_KINDS)


def build_data(profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None,
               overrides: Iterable[str] = ()) -> dict[int, Path]:
    """00: both stages' mixtures and manifests. Returns {stage: mixture folder}."""
    overrides = _checked(overrides)
    lay = layout(profile, out_dir)
    recipes = stage_recipes(profile, preset=preset, overrides=config.overrides_for("train", overrides))
    eval_recipe = config.load_eval(profile, config.overrides_for("eval", overrides))
    stage1 = build_mixture(recipes[1], lay.mixture(recipes[1].mixture), eval_recipe)
    stage2 = build_mixture(recipes[2], lay.mixture(recipes[2].mixture), eval_recipe, stage1_mixture=stage1)
    return {1: stage1, 2: stage2}


def train_stage(stage: int, profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None,
                overrides: Iterable[str] = (), resume: bool | None = None, overwrite: bool = False) -> Path:
    """01 / 02: train Med-Mix (stage 1) or Med-Nirvana (stage 2 from the stage-1 run). Returns the run folder.

    A re-run never loses work: it resumes from the last checkpoint when there is one (resume=None or
    True), keeps a finished run with the same settings, and deletes a run only with overwrite=True;
    it prints which it did (medlib.training.plan_run)."""
    overrides = config.overrides_for("train", _checked(overrides))
    return train_run(stage_recipes(profile, preset=preset, overrides=overrides)[stage], layout(profile, out_dir),
                     resume, overwrite)


def evaluate_mcq(profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None,
                 overrides: Iterable[str] = ()) -> Path:
    """03: Table 3 for the base model and every run of the eval recipe. Returns table3.md."""
    lay = layout(profile, out_dir)
    recipe = config.load_eval(profile, config.overrides_for("eval", _checked(overrides)), preset)
    run_all(recipe, lay.eval, runs_root=lay.root, mcq=True, bertscore=False)
    return write_table3(out_dir=lay.eval)[0]


def evaluate_bertscore(profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None,
                       overrides: Iterable[str] = ()) -> Path:
    """04: Table 4 and side-by-side samples. Returns table4.md."""
    lay = layout(profile, out_dir)
    recipe = config.load_eval(profile, config.overrides_for("eval", _checked(overrides)), preset)
    run_all(recipe, lay.eval, runs_root=lay.root, mcq=False, bertscore=True)
    return write_table4(out_dir=lay.eval)[0]


def figures(profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None) -> dict[str, Path]:
    """05 (and the report): loss curves per stage, MCQ and BERTScore bars, from what the steps wrote."""
    lay = layout(profile, out_dir)
    made: dict[str, Path] = {}
    for stage, recipe in stage_recipes(profile, preset=preset).items():
        run = lay.run(recipe.run_name)
        if (run / "log_history.csv").exists():
            made[f"loss_stage{stage}"] = plots.plot_loss_curves(run, lay.figures / loss_figure_name(recipe))
    if (lay.eval / "table3.csv").exists():
        made["mcq"] = plots.plot_mcq_bars(lay.eval / "table3.csv", lay.figures / "table3_mcq_accuracy.png")
    if (lay.eval / "table4.csv").exists():
        made["bertscore"] = plots.plot_bertscore_bars(lay.eval / "table4.csv", lay.figures / "table4_bertscore.png")
    return made


def loss_figure_name(recipe: TrainRecipe) -> str:
    """The paper's Figures 11 and 12 are the two stages' loss curves."""
    return f"figure{10 + recipe.stage}_loss_stage{recipe.stage}_{recipe.run_name.replace('-', '_')}.png"


def chat_demo(profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None,
              overrides: Iterable[str] = (), script: Sequence[str] = (), adapter: str | Path | None = None) -> Path:
    """06: a scripted conversation with the chatbot (the chat recipe's run in this layout, else the base model)."""
    lay = layout(profile, out_dir)
    recipe = config.load_chat(profile, config.overrides_for("chat", _checked(overrides)), preset)
    # When the run is not trained yet the session says so once and runs the base model, so the chat
    # notebook works before any training.
    session = ChatSession.from_profile(profile, adapter=adapter, recipe=recipe, runs_root=lay.root)
    replies = run_script(session, list(script))
    lay.chat.mkdir(parents=True, exist_ok=True)
    path = lay.chat / "transcript.md"
    lines = [f"# Scripted chat — {profile} profile", "", session.public_description(), ""]
    for text, reply in zip(script, replies):
        flags = f", red flags: {', '.join(reply.red_flags)}" if reply.red_flags else ""
        lines += [f"**User:** {text}", "", f"**Assistant ({reply.kind}, tier {reply.tier}{flags}):** {reply.text}", ""]
    path.write_text("\n".join(lines))
    (lay.chat / "transcript.json").write_text(json.dumps(
        [{"user": t, "kind": r.kind, "tier": r.tier, "red_flags": r.red_flags, "reply": r.text} for t, r in zip(script, replies)],
        indent=1))
    return path


def report(profile: str = "local", out_dir: str | Path | None = None, preset: str | None = None) -> Path:
    lay = layout(profile, out_dir)
    figures(profile, out_dir, preset)
    return write_report(lay, preset)


def run_summary(run_dir: str | Path) -> str:
    """A few lines on a training run from its run_metadata.json: what ran, where, and how it ended."""
    meta = json.loads((Path(run_dir) / "run_metadata.json").read_text())
    precision = meta.get("precision") or {}
    lines = [f"{meta.get('run_name')} ({meta.get('profile_note')})",
             f"base model {meta.get('base_model')}, backend {meta.get('backend')}, device {meta.get('device')}",
             f"precision {precision.get('mode', '?')}: {precision.get('reason', '')}",
             f"status {meta.get('status')}, {meta.get('global_step')} steps, train loss {meta.get('train_loss')}, "
             f"{meta.get('train_time_s')} s training"]
    if meta.get("resumed_from"):
        lines.append(f"resumed from {meta['resumed_from']}")
    lines += [f"fallback: {note}" for note in meta.get("fallbacks", [])]
    return "\n".join(lines)


def show_markdown(path: str | Path) -> Any:
    """Display a markdown file in a notebook (plain text elsewhere)."""
    text = Path(path).read_text()
    try:
        from IPython.display import Markdown

        return Markdown(text)
    except ImportError:
        return text
