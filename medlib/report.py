"""REPORT.md: profile, models, data sources and sizes, manifest hashes, every table and figure, and
our numbers beside the paper's — every local number labelled local."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _demote_headings(markdown: str) -> str:
    return "\n".join(("##" + line) if line.startswith("#") else line for line in markdown.splitlines())


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def write_report(lay) -> Path:
    root = lay.root
    local = lay.profile == "local"
    lines = [f"# medlib reproduction report — `{lay.profile}` profile", ""]
    if local:
        lines += ["> **LOCAL PROFILE — NOT THE PAPER'S RESULTS.** SmolLM2-135M-Instruct on a 2-core CPU, trained for a "
                  "few dozen steps on stand-in data built from the public evaluation files (see "
                  "`data_cards/local_standins.md`). The numbers show that the pipeline runs and behaves sensibly; "
                  "they say nothing about Med-Nirvana 8B. The paper's figures appear only in rows labelled "
                  "`paper`.", ""]
    else:
        lines += ["> Paper profile: the paper's model, data and hyperparameters (Athukoralage & Atapattu, NeurIPS 2024 "
                  "workshop). Our rows are our own runs; the paper's reported figures are in rows labelled `paper`.", ""]

    lines += ["## Data", "", "| stage | mixture | train | validation | per source (train) | decontamination dropped | content hash |",
              "|---|---|---|---|---|---|---|"]
    for stage in (1, 2):
        manifest = _json(lay.mixture(stage) / "manifest.json")
        if manifest is None:
            lines.append(f"| {stage} | not built | | | | | |")
            continue
        per_source = ", ".join(f"{k} {v:,}" for k, v in manifest["counts"]["train"].items())
        lines.append(f"| {stage} | `{_rel(lay.mixture(stage), root)}` ({'stand-in' if manifest['standin'] else 'paper'}) | "
                     f"{manifest['sizes']['train']:,} | {manifest['sizes']['validation']:,} | {per_source} | "
                     f"{manifest['decontamination']['dropped']} | `{manifest['content_hash'][:16]}…` |")
    lines.append("")

    lines += ["## Training", "", "| stage | run | base model | backend | steps | final train loss | final validation loss "
              "| tokens seen | wall time | peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage in (1, 2):
        run = lay.run(stage)
        meta = _json(run / "run_metadata.json")
        if meta is None:
            lines.append(f"| {stage} | not trained | | | | | | | | |")
            continue
        from medlib.plots import read_log_history

        train, validation = read_log_history(run) if (run / "log_history.csv").exists() else ([], [])
        memory = ", ".join(f"{k} {v:,.0f}" for k, v in (meta.get("memory") or {}).items())
        lines.append(
            f"| {stage} | `{_rel(run, root)}` | {meta['base_model']} | {meta['backend']} | {meta['global_step']} | "
            f"{train[-1][1] if train else float('nan'):.4f} | {validation[-1][1] if validation else float('nan'):.4f} | "
            f"{meta['tokens_seen']:,} | {meta['wall_time_s']} s | {memory} |")
        if meta.get("fallbacks"):
            lines.append(f"|  | fallbacks: {'; '.join(meta['fallbacks'])} | | | | | | | | |")
    lines.append("")

    for name, title in (("table3.md", "Table 3"), ("table4.md", "Table 4"), ("samples.md", "Side-by-side answers")):
        path = lay.eval / name
        lines += [f"## {title}", ""]
        lines += [_demote_headings(path.read_text()), ""] if path.exists() else ["(not run)", ""]

    lines += ["## Figures", ""]
    for png in sorted(lay.figures.glob("*.png")) if lay.figures.exists() else []:
        lines += [f"### {png.stem.replace('_', ' ')}", "", f"![{png.stem}]({_rel(png, root)})", ""]

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
