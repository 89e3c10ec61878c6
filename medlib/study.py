"""`medlib study dmt`: how much stage-1 replay stage 2 needs.

The paper replays k = 33,333 stage-1 rows beside 100,000 NoteChat rows in stage 2 (a replay share of
0.25 of the stage-2 training rows) and says k was chosen empirically; it reports no other value.
This study trains stage 2 from one Med-Mix run once per replay share (recipe
`medlib/recipes/<profile>/study_dmt.yaml`), every arm on the same dialogue rows, optionally also
stage-2 data alone from the base model, and scores each on MCQ retention (the paper's three sets)
and on dialogue BERTScore. Paired comparisons against the no-replay arm say which differences the
numbers support.

    medlib study dmt --profile local            # CPU, about 50 minutes; make study runs notebook 07
    from medlib.study import run_dmt_study       # what notebook 07 calls

Writes under <output root>/study/dmt/: data/<arm>/ and runs/<arm>/ (mixtures and training runs),
eval/ (per-model predictions), study.json, table.md, table.csv and dmt_tradeoff.png.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from medlib import config
from medlib.cli_common import CLIError
from medlib.config import StudyRecipe, TrainRecipe
from medlib.data.io import read_jsonl
from medlib.data.mixtures import build_mixture
from medlib.evaluate import stats
from medlib.evaluate.bertscore import run_bertscore
from medlib.evaluate.mcq import run_mcq
from medlib.pipeline import Layout, layout, stage1_of, train_stage, with_data_dir
from medlib.plots import _pyplot, _save
from medlib.training import train_or_resume

PAPER_SHARE = 33_333 / (100_000 + 33_333)   # Table 2: replayed stage-1 rows among stage-2 training rows


class StudyError(ValueError):
    """A study setting that cannot work; the message names it."""


@dataclass(frozen=True)
class Arm:
    share: float            # replayed stage-1 rows / all stage-2 training rows
    from_base: bool = False  # stage-2 data alone, trained from the base model (no Med-Mix)

    @property
    def slug(self) -> str:
        return "from-base" if self.from_base else f"replay-{round(self.share * 100):02d}"

    @property
    def name(self) -> str:
        if self.from_base:
            return "stage-2 data alone, from the base model"
        paper = " (the paper's)" if abs(self.share - PAPER_SHARE) < 0.005 else ""
        return f"replay share {self.share:.2f}{paper}" if self.share else "no replay (k = 0)"


def replay_rows(share: float, dialogue_rows: int) -> int:
    """k such that k / (dialogue_rows + k) is the share."""
    if not 0 <= share < 1:
        raise StudyError(f"replay share {share!r} must be in [0, 1)")
    return round(share / (1 - share) * dialogue_rows)


def study_recipe(profile: str, overrides: Iterable[str] = (), **settings: Any) -> StudyRecipe:
    """study_dmt.yaml with --set overrides, then typed settings (None = the recipe's): shares, from_base,
    dialogue_train, dialogue_validation, max_steps, mcq_limit, n_queries (the notebook's parameters)."""
    recipe = config.load_study(profile, overrides)
    settings = {k: v for k, v in settings.items() if v is not None}
    nested = {"mcq_limit": ("mcq", "limit"), "n_queries": ("bertscore", "n_queries")}
    for name, (section, key) in nested.items():
        if name in settings:
            recipe = recipe.replace(**{section: getattr(recipe, section).replace(**{key: settings.pop(name)})})
    try:
        recipe = recipe.replace(**settings)
    except config.RecipeError as exc:
        raise StudyError(f"study setting: {exc}") from None
    if 0.0 not in recipe.shares:
        raise StudyError(f"study_dmt shares {list(recipe.shares)}: 0.0 (no replay) must be one of them; every arm "
                         "is compared with it")
    return recipe.replace(shares=tuple(sorted(set(recipe.shares))))


def arm_recipe(arm: Arm, stage2: TrainRecipe, study: StudyRecipe, counts: tuple[int, int] | None) -> TrainRecipe:
    """The stage-2 recipe of one arm: same dialogue rows for every arm, k replayed rows for its share."""
    sources = stage2.data.sources
    if study.dialogue_train is not None or study.dialogue_validation is not None:
        if len(sources) != 1:
            raise StudyError(f"study_dmt dialogue_train/dialogue_validation need one dialogue source; the stage-2 "
                             f"recipe has {len(sources)}")
        source = sources[0]
        if study.dialogue_train is not None:
            source = source.replace(n_train=study.dialogue_train)
        if study.dialogue_validation is not None:
            source = source.replace(n_validation=study.dialogue_validation)
        sources = (source,)
    replay = stage2.data.replay
    if arm.share == 0:
        replay = None
    else:
        if not replay or counts is None:
            raise StudyError("a replay arm needs the stage-2 recipe's data.replay section and the no-replay arm's counts")
        n_train, n_validation = (replay_rows(arm.share, n) for n in counts)
        replay = replay.replace(n_train=n_train, n_validation=n_validation)
    training = stage2.training if study.max_steps is None else stage2.training.replace(max_steps=study.max_steps)
    return stage2.replace(run_name=f"dmt-{arm.slug}", mixture=arm.slug, training=training,
                          data=stage2.data.replace(sources=sources, replay=replay),
                          handoff="from_base" if arm.from_base else stage2.handoff)


def _dialogue_counts(mixture_dir: Path) -> tuple[int, int]:
    sizes = json.loads((mixture_dir / "manifest.json").read_text())["sizes"]
    return sizes["train"], sizes["validation"]


def _mcq_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for s in results["sets"].values() for row in read_jsonl(s["predictions_file"])]


def run_dmt_study(profile: str = "local", out_dir: str | Path | None = None, data_dir: str | None = None,
                  overrides: Iterable[str] = (), stage1_max_steps: int | None = None,
                  say: Callable[[str], None] = print, **settings: Any) -> dict[str, Any]:
    """Train every arm (a finished arm with the same settings is kept), evaluate, compare, draw.
    settings: typed study settings (see study_recipe). Returns the study summary (also study.json)."""
    study = study_recipe(profile, overrides, **settings)
    lay = layout(profile, out_dir)
    study_dir = lay.study
    arms_layout = Layout(profile, study_dir)   # arms' mixtures in study/dmt/data/<arm>, runs in study/dmt/runs/...
    say(f"[dmt study] {profile} profile, shares {list(study.shares)}{' + from the base model' if study.from_base else ''}; "
        f"writing {study_dir}")
    med_mix = train_stage(1, profile, lay.root, data_dir, max_steps=stage1_max_steps)
    stage2 = with_data_dir(config.load_train(profile, 2), data_dir)
    stage1_mixture = lay.mixture(stage1_of(stage2).mixture)

    arms = [Arm(s) for s in study.shares] + ([Arm(0.0, from_base=True)] if study.from_base else [])
    runs: dict[str, Path] = {}
    counts = None
    eval_recipe = config.load_eval(profile)
    for arm in arms:  # the no-replay arm comes first: its mixture gives the dialogue counts
        recipe = arm_recipe(arm, stage2, study, counts)
        mixture = arms_layout.mixture(recipe.mixture)
        if not (mixture / "manifest.json").exists():
            build_mixture(recipe, mixture, eval_recipe, stage1_mixture if recipe.data.replay else None)
        if counts is None:
            counts = _dialogue_counts(mixture)
        runs[arm.slug] = train_or_resume(recipe, study_dir / "runs" / arm.slug, mixture,
                                         med_mix if recipe.uses_stage1 else None, say=say)

    evaluation = with_data_dir(eval_recipe, data_dir)
    evaluation = evaluation.replace(mcq=evaluation.mcq.replace(sets=study.mcq.sets, limit=study.mcq.limit),
                                    bertscore=evaluation.bertscore.replace(n_queries=study.bertscore.n_queries))
    models = {"med-mix": med_mix, **runs}
    mcq, chat = {}, {}
    for label, run in models.items():
        say(f"[dmt study] evaluating {label}")
        mcq[label] = run_mcq(evaluation, study_dir / "eval", run, label=label, write_tables=False)
        chat[label] = run_bertscore(evaluation, study_dir / "eval", run, label=label, write_tables=False)

    reference = Arm(0.0).slug
    rows = []
    for label in models:
        arm = next((a for a in arms if a.slug == label), None)
        f1s = [float(r["f1"]) for r in read_jsonl(chat[label]["generations_file"])]
        f1, f1_lo, f1_hi = stats.paired_bootstrap(f1s)
        manifest = json.loads((Path(runs[label] if arm else med_mix) / "run_metadata.json").read_text())["data"]
        row = {"label": label, "arm": arm.name if arm else "Med-Mix (stage 1 only, reference)",
               "share": arm.share if arm else None, "from_base": bool(arm and arm.from_base),
               "train_rows": manifest.get("train", {}).get("records"), "sources": manifest.get("sources"),
               "mcq_accuracy": mcq[label]["average"]["accuracy"], "mcq_ci95": mcq[label]["average"]["ci95"],
               "mcq_by_set": {s: v["accuracy"] for s, v in mcq[label]["sets"].items()},
               "mcq_n": sum(v["n_scored"] for v in mcq[label]["sets"].values()),
               "f1": f1, "f1_ci95": [f1_lo, f1_hi], "f1_n": len(f1s)}
        if label != reference:
            row["vs_no_replay"] = {"mcq": stats.compare_mcq(_mcq_rows(mcq[reference]), _mcq_rows(mcq[label])),
                                   "f1": stats.compare_bertscore(read_jsonl(chat[reference]["generations_file"]),
                                                                 read_jsonl(chat[label]["generations_file"]))}
        rows.append(row)

    summary = {"profile": profile, "note": study.note, "study": study.to_dict(),
               "recipe": {"recipe_file": study.meta.recipe_file, "overrides": list(study.meta.overrides)},
               "paper_share": PAPER_SHARE, "dialogue_rows": {"train": counts[0], "validation": counts[1]},
               "med_mix": str(med_mix), "rows": rows, "findings": findings(rows)}
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.json").write_text(json.dumps(summary, indent=1))
    write_table(summary, study_dir)
    plot_tradeoff(summary, study_dir / "dmt_tradeoff.png")
    for line in summary["findings"]:
        say(f"[dmt study] {line}")
    return summary


def findings(rows: Sequence[dict[str, Any]], alpha: float = 0.05) -> list[str]:
    """Each arm against no replay, stated only as far as the paired tests go (no multiplicity correction)."""
    out = []
    for row in rows:
        if "vs_no_replay" not in row:
            continue
        m, f = row["vs_no_replay"]["mcq"], row["vs_no_replay"]["f1"]
        mcq_says = (f"MCQ accuracy {100 * m['difference']:+.1f} points [{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}], "
                    f"McNemar p = {m['p_mcnemar']:.3g}: " + ("a difference" if m["p_mcnemar"] < alpha else "no significant difference"))
        f1_says = (f"BERTScore F1 {f['difference']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}], permutation p = "
                   f"{f['p_permutation']:.3g}: " + ("a difference" if f["p_permutation"] < alpha else "no significant difference"))
        out.append(f"{row['arm']} vs no replay, on {m['n_paired']} questions and {f['n_paired']} queries: {mcq_says}; {f1_says}.")
    out.append(f"Significance at p < {alpha} per comparison, without correction for the {len(out)} comparisons made.")
    return out


def write_table(summary: dict[str, Any], study_dir: Path) -> tuple[Path, Path]:
    rows = summary["rows"]
    sets = list(rows[0]["mcq_by_set"])
    md = [f"# DMT study: stage-1 replay in stage 2 ({summary['profile']} profile)", "", summary["note"] + ".", "",
          f"Every arm trains stage 2 on the same {summary['dialogue_rows']['train']:,} dialogue rows; the replay share is "
          f"the stage-1 rows among all stage-2 training rows (the paper's is {summary['paper_share']:.2f}: 33,333 beside "
          "100,000). MCQ: mean accuracy over " + ", ".join(sets) + " with a bootstrap 95% CI; BERTScore F1 on the dialogue "
          "hold-out with a bootstrap 95% CI. Differences are paired, against the no-replay arm.", "",
          "| Model | Replay share | Train rows | MCQ accuracy | 95% CI | " + " | ".join(sets) + " | BERTScore F1 | 95% CI | "
          "MCQ vs no replay (p) | F1 vs no replay (p) |",
          "|---|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_no_replay")
        mcq_vs = f"{100 * vs['mcq']['difference']:+.1f} ({vs['mcq']['p_mcnemar']:.3g})" if vs else "–"
        f1_vs = f"{vs['f1']['difference']:+.3f} ({vs['f1']['p_permutation']:.3g})" if vs else "–"
        share = "–" if r["share"] is None else f"{r['share']:.2f}"
        md.append(f"| {r['arm']} | {share} | {r['train_rows']} | {100 * r['mcq_accuracy']:.1f} | "
                  f"[{100 * r['mcq_ci95'][0]:.1f}, {100 * r['mcq_ci95'][1]:.1f}] | "
                  + " | ".join(f"{100 * r['mcq_by_set'][s]:.1f}" for s in sets)
                  + f" | {r['f1']:.3f} | [{r['f1_ci95'][0]:.3f}, {r['f1_ci95'][1]:.3f}] | {mcq_vs} | {f1_vs} |")
    md += ["", "## Findings", ""] + [f"- {line}" for line in summary["findings"]] + ["", "![trade-off](dmt_tradeoff.png)", ""]
    md_path = study_dir / "table.md"
    md_path.write_text("\n".join(md))
    csv_path = study_dir / "table.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "arm", "share", "from_base", "train_rows", "mcq_accuracy", "mcq_ci_low", "mcq_ci_high",
                         *[f"{s}_accuracy" for s in sets], "f1", "f1_ci_low", "f1_ci_high"])
        for r in rows:
            writer.writerow([r["label"], r["arm"], r["share"], r["from_base"], r["train_rows"], r["mcq_accuracy"],
                             *r["mcq_ci95"], *[r["mcq_by_set"][s] for s in sets], r["f1"], *r["f1_ci95"]])
    return md_path, csv_path


def plot_tradeoff(summary: dict[str, Any], path: Path) -> Path:
    """MCQ retention and dialogue BERTScore against the replay share, with 95% CIs; Med-Mix and the
    from-base arm as reference marks."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    arms = [r for r in summary["rows"] if r["share"] is not None and not r["from_base"]]
    xs = [r["share"] for r in arms]
    for ax, key, ci, scale, title in ((axes[0], "mcq_accuracy", "mcq_ci95", 100, "MCQ accuracy (%), mean of the sets"),
                                      (axes[1], "f1", "f1_ci95", 1, "BERTScore F1, dialogue hold-out")):
        ys = [scale * r[key] for r in arms]
        err = [[scale * (r[key] - r[ci][0]) for r in arms], [scale * (r[ci][1] - r[key]) for r in arms]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="stage 2 from Med-Mix")
        for r in summary["rows"]:
            if r["share"] is None:
                ax.axhline(scale * r[key], color="grey", linestyle="--", label="Med-Mix (stage 1 only)")
                ax.axhspan(scale * r[ci][0], scale * r[ci][1], color="grey", alpha=0.12)
            elif r["from_base"]:
                ax.errorbar([r["share"]], [scale * r[key]], yerr=[[scale * (r[key] - r[ci][0])], [scale * (r[ci][1] - r[key])]],
                            marker="s", color="tab:red", capsize=4, linestyle="none", label="stage-2 data alone, from the base")
        ax.axvline(summary["paper_share"], color="tab:green", linestyle=":", label=f"the paper's share ({summary['paper_share']:.2f})")
        ax.set_xlabel("replay share of stage-2 training rows")
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"DMT replay study — {summary['profile']} profile\n{summary['note']}", fontsize=9)
    return _save(fig, path, description=f"DMT study, {summary['profile']} profile: MCQ accuracy and BERTScore F1 "
                                         "against the replay share, 95% CIs")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("study", help="studies beyond the paper (dmt: how much replay stage 2 needs)")
    which = parser.add_subparsers(dest="study", required=True)
    dmt = which.add_parser("dmt", help="stage 2 from one Med-Mix for several replay shares, scored on MCQ and BERTScore",
                           description=__doc__.split("\n\n")[1])
    dmt.add_argument("--profile", choices=["local", "paper"], default="local")
    dmt.add_argument("--out", default=None, help="output root (default outputs/<profile>); the study goes in study/dmt/")
    dmt.add_argument("--data-dir", default=None, help="folder of the published data files (overrides the recipes)")
    dmt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a study_dmt.yaml key, e.g. --set shares=[0,0.25,0.5,0.75] (repeatable)")
    dmt.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        run_dmt_study(args.profile, args.out, args.data_dir, args.overrides)
    except StudyError as exc:
        raise CLIError(str(exc)) from None
    return 0
