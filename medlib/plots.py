"""Figures: train/validation loss per stage (the paper's Figures 11-12), MCQ accuracy bars with the
paper's Table 3 rows beside ours, BERTScore bars. Every figure names profile and model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from medlib.evaluate.tables import COLUMNS_FILE, TABLE4_METRICS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: papermill and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, description: str | None = None) -> Path:
    """Write a figure as PNG; `description` goes into the PNG metadata (what was drawn)."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Description": description} if description else None)
    fig.clf()
    _pyplot().close(fig)
    return path


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_log_history(run_dir: str | Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train points, validation points) as (step, loss) from a run's log_history.csv."""
    train, validation = [], []
    with open(Path(run_dir) / "log_history.csv") as f:
        for row in csv.DictReader(f):
            step = _float(row["step"])
            if _float(row.get("loss")) is not None:
                train.append((step, float(row["loss"])))
            if _float(row.get("eval_loss")) is not None:
                validation.append((step, float(row["eval_loss"])))
    return train, validation


def plot_loss_curves(run_dir: str | Path, path: str | Path) -> Path:
    run_dir, path = Path(run_dir), Path(path)
    train, validation = read_log_history(run_dir)
    meta_file = run_dir / "run_metadata.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", marker=".", linewidth=1.5)
    if validation:
        ax.plot(*zip(*validation), label="validation loss", color="tab:orange", marker="o", linewidth=1.5)
    # Which curves were drawn, as PNG metadata, so tests and readers can check without eyeballing.
    description = f"training loss: {len(train)} points; validation loss: {len(validation)} points"
    stage = meta.get("stage", "?")
    name = {1: "Med-Mix", 2: "Med-Nirvana"}.get(stage, run_dir.name)
    model = meta.get("model", {}).get("name") if isinstance(meta.get("model"), dict) else meta.get("base_model")
    ax.set_title(f"Stage {stage} ({name}) loss — {meta.get('profile', '?')} profile\n{model or ''}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on assistant tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, description)


def _grouped_bars(ax, groups: list[str], series: list[tuple[str, list[float | None], list[tuple[float, float] | None]]]):
    import numpy as np

    missing = [label for label, values, _ in series if all(v is None for v in values)]
    series = [s for s in series if s[0] not in missing]
    if missing:
        ax.text(0.01, 0.97, "no figures for: " + "; ".join(missing), transform=ax.transAxes, fontsize=7, va="top")

    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, values, errors) in enumerate(series):
        heights = [v if v is not None else 0.0 for v in values]
        yerr = None
        if any(e for e in errors):
            yerr = [[(v - e[0]) if (e and v is not None) else 0 for v, e in zip(values, errors)],
                    [(e[1] - v) if (e and v is not None) else 0 for v, e in zip(values, errors)]]
        hatch = "//" if label.startswith("paper") else None
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label, yerr=yerr, capsize=3,
                      hatch=hatch, alpha=0.85)
        for bar, value in zip(bars, values):
            if value is None:
                ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=7,
                            rotation=90, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, groups)


def plot_mcq_bars(table3_csv: str | Path, path: str | Path) -> Path:
    with open(table3_csv) as f:
        rows = list(csv.DictReader(f))
    columns = json.loads((Path(table3_csv).parent / COLUMNS_FILE).read_text())  # written beside it by write_table3
    keys = [k for k, _ in columns]
    titles = [t.replace(", extra)", ")") for _, t in columns]
    series = []
    for row in rows:
        if "comparison" in row["source"]:  # the tables hold every paper row; the figure, the paper's own models
            continue
        values = [_float(row.get(f"{k}_accuracy")) for k in keys]
        errors = [(float(row[f"{k}_ci95_low"]), float(row[f"{k}_ci95_high"]))
                  if _float(row.get(f"{k}_ci95_low")) is not None else None for k in keys]
        tag = "paper" if row["source"].startswith("paper") else row["profile"]
        series.append((f"{tag}: {row['model']}", values, errors))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    _grouped_bars(ax, titles, series)
    profiles = sorted({r["profile"] for r in rows if not r["source"].startswith("paper")})
    ax.set_ylabel("accuracy (%) with 95% bootstrap CI")
    ax.set_ylim(0, 100)
    ax.set_title(f"Table 3 — MCQ accuracy; ours: {', '.join(profiles)} profile. Hatched: the paper's own models "
                 "as reported (n/a = not reported)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_bertscore_bars(table4_csv: str | Path, path: str | Path) -> Path:
    with open(table4_csv) as f:
        rows = list(csv.DictReader(f))
    series = []
    for row in rows:
        tag = "paper" if row["source"].startswith("paper") else row["profile"]
        series.append((f"{tag}: {row['model']}", [_float(row.get(k)) for k, _ in TABLE4_METRICS],
                       [None] * len(TABLE4_METRICS)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _grouped_bars(ax, [t for _, t in TABLE4_METRICS], series)
    ours = [r for r in rows if not r["source"].startswith("paper")]
    model = ours[0]["bertscore_model"] if ours else "?"
    ax.set_ylabel("BERTScore vs physicians' answers")
    ax.set_ylim(0, 1)
    ax.set_title(f"Table 4 — BERTScore, ours with {model}; hatched: the paper's rows (its BERTScore model is not named)",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
