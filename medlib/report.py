"""REPORT.md: profile, models, data sources and sizes, manifest hashes, every table and figure, and
our numbers beside the paper's — every local number labelled local."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medlib import config
from medlib.evaluate.tables import collect_results
from medlib.plots import read_log_history
from medlib.runs import stage_recipes


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _demote_headings(markdown: str) -> str:
    return "\n".join(("##" + line) if line.startswith("#") else line for line in markdown.splitlines())


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


ALPHA = 0.05


def findings(lay, caveat: str | None = None) -> list[str]:
    """What this run's own numbers support, and what they do not: collapsed answerers, and every paired
    comparison of Tables 3 and 4 read at the 5% level. Nothing here goes beyond those numbers."""
    lines = ["## Findings", "", f"From this run's numbers only; a difference is called significant at p < {ALPHA} "
             "(McNemar's exact test for accuracy, a sign-flip permutation test for BERTScore), without correction "
             "for the number of comparisons.", ""]
    said = 0
    for r in collect_results(lay.eval, "mcq") if (lay.eval / "mcq").exists() else []:
        for name, summary in r.get("sets", {}).items():
            d = summary.get("diagnostics") or {}
            if d.get("constant"):
                said += 1
                answers = ("gives no readable answer" if d["top_prediction"] == "none"
                           else f"answers {d['top_prediction']}")
                lines.append(f"- **{r.get('display_name', r['label'])} {answers} to "
                             f"{100 * d['top_prediction_share']:.0f}% of {name} questions** (gold {d['gold']}): its "
                             f"{100 * summary['accuracy']:.1f}% there measures a near-constant answer, not knowledge "
                             f"(the majority-class baseline scores {100 * d['majority_baseline']:.1f}%).")
            b = summary.get("position_bias")
            if b:
                said += 1
                verdict = ("prefers some positions whatever sits there: a difference this run supports"
                           if b["position_biased"] else "spreads its answers over the positions as far as this run can tell")
                lines.append(f"- {r.get('display_name', r['label'])} on {name}, every cyclic permutation of the options "
                             f"({b['questions']} questions): right under all of them for {100 * b['right_under_all']:.1f}%, "
                             f"{100 * b['accuracy_over_permutations']:.1f}% over permutations; it {verdict} "
                             f"(chi-square p = {b['p']:.3g}).")
    for kind, verb in (("table3_paired.json", "accuracy"), ("table4_paired.json", "BERTScore F1")):
        path = lay.eval / kind
        for c in json.loads(path.read_text()) if path.exists() else []:
            said += 1
            p = c.get("p_mcnemar", c.get("p_permutation"))
            where = f" on {c['set']}" if "set" in c else ""
            scale, unit = (100, " points") if "set" in c else (1, "")
            diff = f"{scale * c['difference']:+.{1 if scale == 100 else 4}f}{unit} (95% CI {scale * c['ci95'][0]:+.{1 if scale == 100 else 4}f} to {scale * c['ci95'][1]:+.{1 if scale == 100 else 4}f})"
            if p < ALPHA:
                lines.append(f"- {c['second']} vs {c['first']}{where}, {verb}: {diff}, p = {p:.3g} (n = {c['n_paired']}): "
                             "a difference this run supports.")
            else:
                lines.append(f"- {c['second']} vs {c['first']}{where}, {verb}: {diff}, p = {p:.3g} (n = {c['n_paired']}): "
                             "not significant; this run cannot tell the two apart.")
    for run in sorted(lay.root.glob("*/run_metadata.json")):
        measured = json.loads(run.read_text()).get("handoff_measure")
        if measured:
            said += 1
            lines.append(f"- {handoff_finding(run.parent.name, measured)}")
    study = lay.study("handoff") / "study.json"
    for line in json.loads(study.read_text())["findings"] if study.exists() else []:
        said += 1
        lines.append(f"- Handoff study: {line}")
    if not said:
        lines.append("- No evaluation results to read yet.")
    if caveat:
        lines.append(f"- {caveat}")
    return lines + [""]


def handoff_finding(run: str, measured: dict[str, Any]) -> str:
    """What the authors' handoff (merge in 16-bit, reload in 4-bit) keeps of a stage-1 run, measured on it."""
    a, loss = measured["all"], measured["validation_loss"]
    text = (f"{run}'s stage-1 update is {100 * a['delta_over_weight']:.2f}% of the weights it adapts "
            f"(|ΔW1| / |W'| over {a['matrices']} matrices); the authors' handoff (merged in {measured['merge_dtype']}, "
            f"reloaded in 4-bit) keeps {100 * a['kept_share']:.1f}% of it (projection; cosine {a['kept_cosine']:.3f})")
    if None not in loss.values():
        text += (f", and its stage-1 validation loss is {loss['requantized_merge']:.3f} against {loss['trained']:.3f} "
                 f"trained and {loss['base']:.3f} for the base: it keeps "
                 f"{100 * measured.get('validation_gain_kept', float('nan')):.0f}% of stage 1's gain")
    return text + ". One run, no interval: the handoff study compares the handoffs with paired tests."


def write_report(lay, preset: str | None = None) -> Path:
    root = lay.root
    evaluation = config.load_eval(lay.profile, preset=preset)
    stages = stage_recipes(lay.profile, preset=preset)
    lines = [f"# medlib reproduction report — `{lay.profile}` profile", "", f"> {evaluation.report.banner}", ""]

    lines += ["## Data", "", "| stage | mixture | train | validation | per source (train) | decontamination dropped | content hash |",
              "|---|---|---|---|---|---|---|"]
    for stage, recipe in stages.items():
        mixture = lay.mixture(recipe.mixture)
        manifest = _json(mixture / "manifest.json")
        if manifest is None:
            lines.append(f"| {stage} | not built | | | | | |")
            continue
        per_source = ", ".join(f"{k} {v:,}" for k, v in manifest["counts"]["train"].items())
        lines.append(f"| {stage} | `{_rel(mixture, root)}` ({'stand-in' if manifest['standin'] else 'paper'}) | "
                     f"{manifest['sizes']['train']:,} | {manifest['sizes']['validation']:,} | {per_source} | "
                     f"{manifest['decontamination']['dropped']} | `{manifest['content_hash'][:16]}…` |")
    lines.append("")

    lines += ["## Training", "", "| stage | run | base model | backend | steps | final train loss | final validation loss "
              "| tokens seen | wall time | peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, recipe in stages.items():
        run = lay.run(recipe.run_name)
        meta = _json(run / "run_metadata.json")
        if meta is None:
            lines.append(f"| {stage} | not trained | | | | | | | | |")
            continue
        train, validation = read_log_history(run) if (run / "log_history.csv").exists() else ([], [])
        memory = ", ".join(f"{k} {v:,.0f}" if isinstance(v, (int, float)) else f"{k} {v}"
                           for k, v in (meta.get("memory") or {}).items())
        lines.append(
            f"| {stage} | `{_rel(run, root)}` | {meta['base_model']} | {meta['backend']} | {meta['global_step']} | "
            f"{train[-1][1] if train else float('nan'):.4f} | {validation[-1][1] if validation else float('nan'):.4f} | "
            f"{meta['tokens_seen']:,} | {meta['wall_time_s']} s | {memory} |")
        if meta.get("fallbacks"):
            lines.append(f"|  | fallbacks: {'; '.join(meta['fallbacks'])} | | | | | | | | |")
    lines.append("")

    lines += findings(lay, evaluation.report.findings_caveat)
    for name, title in (("table3.md", "Table 3"), ("table4.md", "Table 4"), ("samples.md", "Side-by-side answers")):
        path = lay.eval / name
        lines += [f"## {title}", ""]
        lines += [_demote_headings(path.read_text()), ""] if path.exists() else ["(not run)", ""]

    lines += ["## Figures", ""]
    for png in sorted(lay.figures.glob("*.png")) if lay.figures.exists() else []:
        lines += [f"### {png.stem.replace('_', ' ')}", "", f"![{png.stem}]({_rel(png, root)})", ""]

    for name, title, figure in (("dmt", "DMT study", "dmt_tradeoff.png"), ("handoff", "Handoff study", "handoffs.png")):
        study = lay.study(name) / "table.md"
        if study.exists():  # beyond the paper: `make study` (notebook 07), `make study-handoff` (notebook 08)
            lines += [f"## {title}", "", _demote_headings(study.read_text()).replace(
                f"]({figure})", f"]({_rel(study.parent / figure, root)})"), ""]

    transcript = lay.chat / "transcript.md"
    lines += ["## Chat demo", "", f"Scripted conversation: [`{_rel(transcript, root)}`]({_rel(transcript, root)})"
              if transcript.exists() else "(not run)", ""]

    timings = _json(lay.notebooks / "timings.json")
    if timings:
        lines += ["## Notebooks", "", "| notebook | seconds | executed copy |", "|---|---|---|"]
        lines += [f"| {nb} | {t['seconds']:.0f} | `{_rel(Path(t['output']), root)}` |" for nb, t in timings.items()]
        lines += ["", f"Total: {sum(t['seconds'] for t in timings.values()) / 60:.1f} minutes.", ""]
    lay.report.parent.mkdir(parents=True, exist_ok=True)
    lay.report.write_text("\n".join(lines))
    return lay.report
