"""The reproduction as steps: what each numbered notebook calls, one function per notebook.

Every step writes under one output root (default outputs/<profile>/), laid out as:
  data/stage{1,2}/   mixtures + manifest.json          med-mix/, med-nirvana/   training runs
  eval/              table3/table4 (md+csv), samples.md, per-question predictions
  figures/           PNGs                              notebooks/   executed notebooks
  chat/              the scripted chat transcript      REPORT.md
Recipe paths are redirected into that root with ordinary `--set` overrides, so a notebook run with
out_dir=/tmp/x never touches outputs/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib.config import preset_overrides
from medlib.paths import outputs_dir, resolve


@dataclass(frozen=True)
class Layout:
    profile: str
    root: Path

    def mixture(self, stage: int) -> Path:
        return self.root / "data" / f"stage{stage}"

    def run(self, stage: int) -> Path:
        return self.root / ("med-mix" if stage == 1 else "med-nirvana")

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def chat(self) -> Path:
        return self.root / "chat"

    @property
    def report(self) -> Path:
        return self.root / "REPORT.md"


def layout(profile: str = "local", out_dir: str | Path | None = None) -> Layout:
    return Layout(profile, resolve(out_dir) if out_dir else outputs_dir() / profile)


def stage_overrides(stage: int, lay: Layout, data_dir: str | None = None, max_steps: int | None = None,
                    extra: Iterable[str] = ()) -> list[str]:
    """Recipe overrides that put a stage's mixture and run inside the layout."""
    out = [f"output_dir={lay.run(stage)}", f"data.mixture_dir={lay.mixture(stage)}"]
    if stage == 2:
        out += [f"from_stage1={lay.run(1)}", f"data.replay.mixture_dir={lay.mixture(1)}"]
    if data_dir:
        out.append(f"data.data_dir={data_dir}")
    if max_steps is not None:
        out.append(f"training.max_steps={max_steps}")
    return out + list(extra)


def eval_overrides(lay: Layout, data_dir: str | None = None, extra: Iterable[str] = ()) -> list[str]:
    out = [f"output_dir={lay.eval}", f"model.adapters.med-mix={lay.run(1)}", f"model.adapters.med-nirvana={lay.run(2)}"]
    if data_dir:
        out.append(f"data.data_dir={data_dir}")
    return out + list(extra)


# ------------------------------------------------------------------------------------------ steps

def build_data(profile: str = "local", out_dir: str | Path | None = None, data_dir: str | None = None,
               overrides: Iterable[str] = (), preset: str | None = None) -> dict[int, Path]:
    """00: both stages' mixtures and manifests. Returns {stage: mixture folder}."""
    from medlib.config import load_recipe
    from medlib.data.mixtures import build_mixture

    lay = layout(profile, out_dir)
    return {stage: build_mixture(load_recipe(profile, f"stage{stage}", stage_overrides(
                stage, lay, data_dir, extra=[*preset_overrides(preset, profile, f"stage{stage}"), *overrides])))
            for stage in (1, 2)}


def train_stage(stage: int, profile: str = "local", out_dir: str | Path | None = None, data_dir: str | None = None,
                max_steps: int | None = None, overrides: Iterable[str] = (), resume: bool | None = None,
                overwrite: bool = False, train_samples: int | None = None, preset: str | None = None) -> Path:
    """01 / 02: train Med-Mix (stage 1) or Med-Nirvana (stage 2 from the stage-1 run). Returns the run folder.

    A re-run never loses work: it resumes from the last checkpoint when there is one (resume=None or
    True), keeps a finished run with the same settings, and deletes a run only with overwrite=True;
    it prints which it did (medlib.train.plan_run). train_samples: a seeded subset of the mixture."""
    from medlib.train import load_recipe_for, train_or_resume

    lay = layout(profile, out_dir)
    extra = [*preset_overrides(preset, profile, f"stage{stage}"), *overrides]
    if train_samples is not None:
        extra.append(f"training.max_train_samples={train_samples}")
    recipe = load_recipe_for(stage, profile, stage_overrides(stage, lay, data_dir, max_steps, extra))
    return train_or_resume(recipe, resume=resume, overwrite=overwrite)


def evaluate_mcq(profile: str = "local", out_dir: str | Path | None = None, data_dir: str | None = None,
                 limit: int | None = None, sets: Sequence[str] | None = None, overrides: Iterable[str] = (),
                 preset: str | None = None) -> Path:
    """03: Table 3 for the base model, Med-Mix and Med-Nirvana. Returns table3.md."""
    from medlib.evaluate import run_all, write_table3

    lay = layout(profile, out_dir)
    extra = [*preset_overrides(preset, profile, "eval"), *overrides] + ([f"mcq.limit={limit}"] if limit is not None else [])
    if sets:
        extra.append("mcq.sets=[" + ",".join(sets) + "]")
    run_all(profile, mcq=True, bertscore=False, overrides=eval_overrides(lay, data_dir, extra))
    return write_table3(out_dir=lay.eval)[0]


def evaluate_bertscore(profile: str = "local", out_dir: str | Path | None = None, data_dir: str | None = None,
                       n_queries: int | None = None, max_new_tokens: int | None = None,
                       overrides: Iterable[str] = (), preset: str | None = None) -> Path:
    """04: Table 4 and side-by-side samples. Returns table4.md."""
    from medlib.evaluate import run_all, write_table4

    lay = layout(profile, out_dir)
    extra = [*preset_overrides(preset, profile, "eval"), *overrides]
    if n_queries is not None:
        extra.append(f"bertscore.n_queries={n_queries}")
    if max_new_tokens is not None:
        extra.append(f"bertscore.generation.max_new_tokens={max_new_tokens}")
    run_all(profile, mcq=False, bertscore=True, overrides=eval_overrides(lay, data_dir, extra))
    return write_table4(out_dir=lay.eval)[0]


def figures(profile: str = "local", out_dir: str | Path | None = None) -> dict[str, Path]:
    """05 (and the report): loss curves per stage, MCQ and BERTScore bars, from what the steps wrote."""
    from medlib import plots

    lay = layout(profile, out_dir)
    made: dict[str, Path] = {}
    for stage, figure in ((1, "figure11_loss_stage1_med_mix.png"), (2, "figure12_loss_stage2_med_nirvana.png")):
        if (lay.run(stage) / "log_history.csv").exists():
            made[f"loss_stage{stage}"] = plots.plot_loss_curves(lay.run(stage), lay.figures / figure)
    if (lay.eval / "table3.csv").exists():
        made["mcq"] = plots.plot_mcq_bars(lay.eval / "table3.csv", lay.figures / "table3_mcq_accuracy.png")
    if (lay.eval / "table4.csv").exists():
        made["bertscore"] = plots.plot_bertscore_bars(lay.eval / "table4.csv", lay.figures / "table4_bertscore.png")
    return made


def chat_demo(profile: str = "local", out_dir: str | Path | None = None, script: Sequence[str] = (),
              overrides: Iterable[str] = (), adapter: str | Path | None = None, preset: str | None = None) -> Path:
    """06: a scripted conversation with the chatbot (Med-Nirvana of this layout, else the base model)."""
    from medlib.chat.session import ChatSession, run_script

    lay = layout(profile, out_dir)
    # The layout's Med-Nirvana is the recipe's default adapter: when it is not trained yet the session says
    # so once and runs the base model, so the chat notebook works before any training.
    session = ChatSession.from_profile(profile, adapter=adapter, overrides=[
        f"adapter={lay.run(2)}", *preset_overrides(preset, profile, "chat"), *overrides])
    replies = run_script(session, list(script))
    lay.chat.mkdir(parents=True, exist_ok=True)
    path = lay.chat / "transcript.md"
    lines = [f"# Scripted chat — {profile} profile", "", session.describe(), ""]
    for text, reply in zip(script, replies):
        flags = f", red flags: {', '.join(reply.red_flags)}" if reply.red_flags else ""
        lines += [f"**User:** {text}", "", f"**Assistant ({reply.kind}{flags}):** {reply.text}", ""]
    path.write_text("\n".join(lines))
    (lay.chat / "transcript.json").write_text(json.dumps(
        [{"user": t, "kind": r.kind, "red_flags": r.red_flags, "reply": r.text} for t, r in zip(script, replies)],
        indent=1))
    return path


def report(profile: str = "local", out_dir: str | Path | None = None) -> Path:
    from medlib.report import write_report

    lay = layout(profile, out_dir)
    figures(profile, out_dir)
    return write_report(lay)


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
