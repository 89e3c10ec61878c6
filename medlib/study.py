"""`medlib study dmt | handoff`: beyond the paper, stage 2 trained several ways from one Med-Mix.

dmt: how much stage-1 replay stage 2 needs. The paper replays k = 33,333 stage-1 rows beside 100,000
NoteChat rows in stage 2 (a replay share of 0.25 of the stage-2 training rows) and says k was chosen
empirically; it reports no other value. One arm per replay share (`study_dmt.yaml`), compared with no replay.

handoff: how stage 2 starts from stage 1 (medlib/training/handoff.py). At the paper's replay share, one arm
per handoff (`study_handoff.yaml`): the authors' requantized merge, medlib's stacked LoRA, and continuing
the stage-1 adapter, compared with the authors'.

Every arm trains on the same dialogue rows (optionally also stage-2 data alone from the base model) and is
scored on MCQ retention (the paper's three sets; the gold letter's log-probability too), on the stage-1
validation loss (a continuous retention measure), on dialogue BERTScore, and on the share of ΔW1 it starts
from. Paired comparisons against the reference arm say which differences the numbers support.

    medlib study dmt --profile local            # CPU, about 50 minutes; make study runs notebook 07
    medlib study handoff --profile local        # CPU, about 35 minutes; make study-handoff runs notebook 08
    from medlib.study import run_study           # what notebooks 07 and 08 call

Writes under <output root>/study/<name>/: data/<arm>/ and runs/<arm>/ (mixtures and training runs),
eval/ (per-model predictions), study.json, table.md, table.csv and a figure.
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
from medlib.data.io import read_jsonl, write_jsonl
from medlib.data.mixtures import build_mixture, read_mixture, seeded_subset
from medlib.evaluate import stats
from medlib.evaluate.bertscore import run_bertscore
from medlib.evaluate.common import load_evaluated
from medlib.evaluate.mcq import run_mcq
from medlib.evaluate.retention import record_losses
from medlib.pipeline import train_stage
from medlib.plots import _pyplot, _save
from medlib.models import load_tokenizer
from medlib.runs import Layout, RunRecord, layout, load_run, stage1_of
from medlib.training import train_or_resume

PAPER_SHARE = 33_333 / (100_000 + 33_333)   # Table 2: replayed stage-1 rows among stage-2 training rows


class StudyError(ValueError):
    """A study setting that cannot work; the message names it."""


HANDOFF_NAMES = {"requantized_merge": "requantized merge (the authors')", "stacked": "stacked LoRA (medlib's correction)",
                 "continue": "stage-1 adapter continued"}


@dataclass(frozen=True)
class Arm:
    share: float            # replayed stage-1 rows / all stage-2 training rows
    from_base: bool = False  # stage-2 data alone, trained from the base model (no Med-Mix)
    handoff: str | None = None  # a handoff study's arm: how it starts from Med-Mix (None: the stage-2 recipe's)

    @property
    def slug(self) -> str:
        if self.from_base:
            return "from-base"
        return f"handoff-{self.handoff.replace('_', '-')}" if self.handoff else self.data_slug

    @property
    def data_slug(self) -> str:
        """The arm's mixture: arms with the same replay share train on the very same rows."""
        return "from-base" if self.from_base else f"replay-{round(self.share * 100):02d}"

    @property
    def name(self) -> str:
        if self.from_base:
            return "stage-2 data alone, from the base model"
        if self.handoff:
            return HANDOFF_NAMES[self.handoff]
        paper = " (the paper's)" if abs(self.share - PAPER_SHARE) < 0.005 else ""
        return f"replay share {self.share:.2f}{paper}" if self.share else "no replay (k = 0)"


def replay_rows(share: float, dialogue_rows: int) -> int:
    """k such that k / (dialogue_rows + k) is the share."""
    if not 0 <= share < 1:
        raise StudyError(f"replay share {share!r} must be in [0, 1)")
    return round(share / (1 - share) * dialogue_rows)


def study_recipe(profile: str, overrides: Iterable[str] = (), name: str = "dmt", **settings: Any) -> StudyRecipe:
    """study_<name>.yaml with --set overrides, then typed settings (None = the recipe's): shares, from_base,
    handoffs, dialogue_train, dialogue_validation, max_steps, mcq_limit, n_queries (the notebooks' parameters)."""
    recipe = config.load_study(profile, overrides, name)
    settings = {k: v for k, v in settings.items() if v is not None}
    nested = {"mcq_limit": ("mcq", "limit"), "n_queries": ("bertscore", "n_queries")}
    for key, (section, field_name) in nested.items():
        if key in settings:
            recipe = recipe.replace(**{section: getattr(recipe, section).replace(**{field_name: settings.pop(key)})})
    try:
        recipe = recipe.replace(**settings)
    except config.RecipeError as exc:
        raise StudyError(f"study setting: {exc}") from None
    if recipe.compare == "replay" and 0.0 not in recipe.shares:
        raise StudyError(f"study_{name} shares {list(recipe.shares)}: 0.0 (no replay) must be one of them; every arm "
                         "is compared with it")
    if recipe.compare == "handoff" and (len(recipe.shares) != 1 or len(set(recipe.handoffs)) < 2):
        raise StudyError(f"study_{name}: a handoff study trains every arm at one replay share (shares: "
                         f"{list(recipe.shares)}) and needs two or more distinct handoffs (handoffs: {list(recipe.handoffs)})")
    return recipe.replace(shares=tuple(sorted(set(recipe.shares))))


def study_arms(study: StudyRecipe) -> list[Arm]:
    """The arms, the reference arm first (no replay, or the first handoff listed)."""
    if study.compare == "handoff":
        arms = [Arm(study.shares[0], handoff=h) for h in dict.fromkeys(study.handoffs)]
    else:
        arms = [Arm(s) for s in study.shares]
    return arms + ([Arm(0.0, from_base=True)] if study.from_base else [])


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
    model = stage2.model
    if arm.handoff == "stacked" and model.backend == "unsloth":  # Unsloth trains one LoRA at a time (run_metadata says so)
        model = model.replace(backend="hf")
    return stage2.replace(run_name=f"study-{arm.slug}", mixture=arm.data_slug, training=training, model=model,
                          data=stage2.data.replace(sources=sources, replay=replay),
                          handoff="from_base" if arm.from_base else (arm.handoff or stage2.handoff))


def _dialogue_counts(mixture_dir: Path) -> tuple[int, int]:
    sizes = json.loads((mixture_dir / "manifest.json").read_text())["sizes"]
    return sizes["train"], sizes["validation"]


def _mcq_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for s in results["sets"].values() for row in read_jsonl(s["predictions_file"])]


def _retention_records(stage1_mixture: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """The stage-1 validation records whose answer loss measures retention: a seeded subset of n."""
    _, validation, _ = read_mixture(stage1_mixture)
    return seeded_subset(validation, n, seed)


def _delta_w1_kept(arm: Arm | None, med_mix_meta: dict[str, Any]) -> float | None:
    """The share of Med-Mix's ΔW1 a model starts stage 2 from: all of it, except through the requantized merge."""
    if arm is None:
        return 1.0
    if arm.from_base:
        return 0.0
    handoff = arm.handoff or med_mix_meta.get("stage2_handoff")
    if handoff == "requantized_merge":
        return (med_mix_meta.get("handoff_measure") or {}).get("all", {}).get("kept_share")
    return 1.0


def run_study(name: str = "dmt", profile: str = "local", out_dir: str | Path | None = None,
              overrides: Iterable[str] = (), say: Callable[[str], None] = print, **settings: Any) -> dict[str, Any]:
    """Train every arm (a finished arm with the same settings is kept), evaluate, compare, draw.

    overrides: key=value, the --set language, each taken by the recipes that have its section: study_<name>.yaml
    keys (max_steps, shares, mcq.limit, ...) by the study; training-recipe keys (training.max_steps, data.data_dir)
    by Med-Mix and the arms' stage-2 recipe; data.* also by the evaluation recipe. settings: typed study settings
    (see study_recipe). Returns the study summary (also study.json)."""
    overrides = config.check_overrides(overrides, ("study", "train", "eval"))
    study_overrides = config.overrides_for("study", overrides)
    train_overrides = config.overrides_for("train", overrides)
    eval_overrides = [o for o in config.overrides_for("eval", overrides) if o not in study_overrides]
    study = study_recipe(profile, study_overrides, name, **settings)
    lay = layout(profile, out_dir)
    study_dir = lay.study(name)
    arms_layout = Layout(profile, study_dir)   # arms' mixtures in study/<name>/data/<arm>, runs in study/<name>/runs/...
    arms = study_arms(study)
    say(f"[{name} study] {profile} profile, arms {[a.slug for a in arms]}; writing {study_dir}")
    med_mix = train_stage(1, profile, lay.root, overrides=train_overrides)
    stage2 = config.load_train(profile, 2, train_overrides)
    stage1 = stage1_of(stage2)
    stage1_mixture = lay.mixture(stage1.mixture)

    runs: dict[str, Path] = {}
    eval_recipe = config.load_eval(profile, eval_overrides)
    counts_recipe = arm_recipe(Arm(0.0), stage2, study, None)   # the dialogue rows alone give the counts
    counts_mixture = arms_layout.mixture(counts_recipe.mixture)
    if not (counts_mixture / "manifest.json").exists():
        build_mixture(counts_recipe, counts_mixture, eval_recipe)
    counts = _dialogue_counts(counts_mixture)
    for arm in arms:
        recipe = arm_recipe(arm, stage2, study, counts)
        mixture = arms_layout.mixture(recipe.mixture)
        if not (mixture / "manifest.json").exists():
            build_mixture(recipe, mixture, eval_recipe, stage1_mixture if recipe.data.replay else None)
        runs[arm.slug] = train_or_resume(recipe, study_dir / "runs" / arm.slug, mixture,
                                         med_mix if recipe.uses_stage1 else None, say=say)

    # Arms are compared by the eval recipe's main protocol; its second protocol and the permutation check (Table 3's
    # extras) run here only when the overrides ask for them.
    asked = {o.split("=", 1)[0].strip() for o in eval_overrides}
    extras = {key: None for key in ("other_protocol", "position_bias") if f"mcq.{key}" not in asked}
    evaluation = eval_recipe.replace(mcq=eval_recipe.mcq.replace(sets=study.mcq.sets, limit=study.mcq.limit, **extras),
                                     bertscore=eval_recipe.bertscore.replace(n_queries=study.bertscore.n_queries))
    retention = _retention_records(stage1_mixture, study.retention_rows, stage1.seed)
    med_mix_record = RunRecord.read(med_mix)
    # every model's retention is scored on the same token ids: stage 1's tokenizer, its template as trained
    retention_tokenizer = load_tokenizer(str(med_mix))

    def score_retention(label: str, model: Any) -> list[dict[str, Any]]:
        scored = record_losses(model, retention_tokenizer, retention, stage1.model.max_seq_length,
                               med_mix_record.system_prompt, stage1.prompt.target_style, stage1.prompt.mcq_format)
        write_jsonl(study_dir / "eval" / "retention" / f"{label}.jsonl", scored)
        return scored

    models = {"med-mix": med_mix, **runs}
    mcq, chat, losses = {}, {}, {}
    for label, run in models.items():
        say(f"[{name} study] evaluating {label}")
        loaded = load_evaluated(evaluation, run)
        mcq[label] = run_mcq(evaluation, study_dir / "eval", run, label=label, write_tables=False, loaded=loaded)
        chat[label] = run_bertscore(evaluation, study_dir / "eval", run, label=label, write_tables=False, loaded=loaded)
        losses[label] = score_retention(label, loaded[0])
        del loaded
    # the two ends stage 1's gain is measured between, and the authors' handoff point (Med-Mix merged in 16-bit,
    # reloaded in 4-bit), scored for retention only
    m = evaluation.model
    for label, weights in (("base", None), ("med-mix-requantized", "requantized_merge")):
        say(f"[{name} study] retention of {label}")
        model, _ = load_run(m.name, med_mix if weights else None, m.load_in_4bit, m.dtype, weights or "as_trained")
        losses[label] = score_retention(label, model)
        del model
    survival = _survival(losses)

    reference = arms[0]
    med_mix_meta = {**med_mix_record.metadata, "stage2_handoff": stage2.handoff}
    rows = []
    for label in models:
        arm = next((a for a in arms if a.slug == label), None)
        f1s = [float(r["f1"]) for r in read_jsonl(chat[label]["generations_file"])]
        f1, f1_lo, f1_hi = stats.paired_bootstrap(f1s)
        scored = [r for r in losses[label] if r["loss"] is not None]
        loss, loss_lo, loss_hi = stats.paired_bootstrap([r["loss"] for r in scored])
        gold = [v["gold_logprob_mean"] for v in mcq[label]["sets"].values() if "gold_logprob_mean" in v]
        manifest = json.loads((Path(runs[label] if arm else med_mix) / "run_metadata.json").read_text())["data"]
        row = {"label": label, "arm": arm.name if arm else "Med-Mix (stage 1 only, reference)",
               "share": arm.share if arm else None, "from_base": bool(arm and arm.from_base),
               "handoff": (arm.handoff or stage2.handoff) if arm and not arm.from_base else None,
               "train_rows": manifest.get("train", {}).get("records"), "sources": manifest.get("sources"),
               "mcq_accuracy": mcq[label]["average"]["accuracy"], "mcq_ci95": mcq[label]["average"]["ci95"],
               "mcq_by_set": {s: v["accuracy"] for s, v in mcq[label]["sets"].items()},
               "mcq_n": sum(v["n_scored"] for v in mcq[label]["sets"].values()),
               "gold_logprob": sum(gold) / len(gold) if gold else None,
               "retention_loss": loss, "retention_loss_ci95": [loss_lo, loss_hi], "retention_n": len(scored),
               "retention_unscored": len(losses[label]) - len(scored),
               "delta_w1_kept": _delta_w1_kept(arm, med_mix_meta),
               "stage1_gain_kept": survival.get(label),
               "f1": f1, "f1_ci95": [f1_lo, f1_hi], "f1_n": len(f1s)}
        if label != reference.slug:
            row["vs_reference"] = {
                "mcq": stats.compare_mcq(_mcq_rows(mcq[reference.slug]), _mcq_rows(mcq[label])),
                "f1": stats.compare_bertscore(read_jsonl(chat[reference.slug]["generations_file"]),
                                              read_jsonl(chat[label]["generations_file"])),
                "retention_loss": stats.compare_values([r for r in losses[reference.slug] if r["loss"] is not None],
                                                       scored, "loss")}
        rows.append(row)

    summary = {"study": name, "compare": study.compare, "profile": profile, "note": study.note,
               "settings": study.to_dict(), "reference": {"label": reference.slug, "name": reference.name},
               "recipe": {"recipe_file": study.meta.recipe_file, "overrides": list(study.meta.overrides)},
               "paper_share": PAPER_SHARE, "dialogue_rows": {"train": counts[0], "validation": counts[1]},
               "med_mix": str(med_mix), "med_mix_handoff_measure": med_mix_record.metadata.get("handoff_measure"),
               "retention_references": {label: _mean_loss(losses[label]) for label in ("base", "med-mix-requantized")},
               "gain_kept_at_the_handoff": {"requantized_merge": survival["med-mix-requantized"],
                                            "stacked": [1.0, 1.0, 1.0], "continue": [1.0, 1.0, 1.0]},
               "rows": rows}
    summary["findings"] = findings(rows, reference.name, summary["gain_kept_at_the_handoff"])
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.json").write_text(json.dumps(summary, indent=1))
    write_table(summary, study_dir)
    if study.compare == "handoff":
        plot_handoffs(summary, study_dir / "handoffs.png")
    else:
        plot_tradeoff(summary, study_dir / "dmt_tradeoff.png")
    for line in summary["findings"]:
        say(f"[{name} study] {line}")
    return summary


def _mean_loss(scored: Sequence[dict[str, Any]]) -> float:
    values = [r["loss"] for r in scored if r["loss"] is not None]
    return sum(values) / len(values) if values else float("nan")


def _survival(losses: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Each model's share of Med-Mix's stage-1 validation-loss gain over the base, with a bootstrap 95% CI, on
    the records every model scored."""
    by_label = {label: {r["id"]: r["loss"] for r in rows if r["loss"] is not None} for label, rows in losses.items()}
    ids = sorted(set.intersection(*(set(v) for v in by_label.values())))
    column = lambda label: [by_label[label][i] for i in ids]  # noqa: E731
    return {label: list(stats.share_of_gain(column("base"), column(label), column("med-mix")))
            for label in by_label if label != "base"}


def run_dmt_study(profile: str = "local", out_dir: str | Path | None = None, overrides: Iterable[str] = (),
                  say: Callable[[str], None] = print, **settings: Any) -> dict[str, Any]:
    """The DMT (replay) study: run_study("dmt", ...)."""
    return run_study("dmt", profile, out_dir, overrides, say, **settings)


def run_handoff_study(profile: str = "local", out_dir: str | Path | None = None, overrides: Iterable[str] = (),
                      say: Callable[[str], None] = print, **settings: Any) -> dict[str, Any]:
    """The handoff study: run_study("handoff", ...)."""
    return run_study("handoff", profile, out_dir, overrides, say, **settings)


def _verdict(p: float, alpha: float) -> str:
    return "a difference" if p < alpha else "no significant difference"


def findings(rows: Sequence[dict[str, Any]], reference: str, at_handoff: dict[str, list[float]] | None = None,
             alpha: float = 0.05) -> list[str]:
    """How much of stage 1 each model keeps, then each arm against the reference arm, stated only as far as the
    intervals and paired tests go (no multiplicity correction)."""
    out = []
    kept = (at_handoff or {}).get("requantized_merge")
    if kept:
        out.append(f"At the handoff, the authors' requantized merge keeps {100 * kept[0]:.0f}% [{100 * kept[1]:.0f}, "
                   f"{100 * kept[2]:.0f}] of Med-Mix's stage-1 validation-loss gain over the base (the stacked and "
                   "continued adapters keep all of it, by construction).")
    for row in rows:
        if row["share"] is not None and row.get("stage1_gain_kept"):
            g = row["stage1_gain_kept"]
            out.append(f"After stage 2, {row['arm']} keeps {100 * g[0]:.0f}% [{100 * g[1]:.0f}, {100 * g[2]:.0f}] of it.")
    for row in rows:
        if "vs_reference" not in row:
            continue
        m, f, r = row["vs_reference"]["mcq"], row["vs_reference"]["f1"], row["vs_reference"]["retention_loss"]
        mcq_says = (f"MCQ accuracy {100 * m['difference']:+.1f} points [{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}], "
                    f"McNemar p = {m['p_mcnemar']:.3g}: {_verdict(m['p_mcnemar'], alpha)}")
        loss_says = (f"stage-1 validation loss {r['difference']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}], "
                     f"permutation p = {r['p_permutation']:.3g}: {_verdict(r['p_permutation'], alpha)}")
        f1_says = (f"BERTScore F1 {f['difference']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}], permutation p = "
                   f"{f['p_permutation']:.3g}: {_verdict(f['p_permutation'], alpha)}")
        out.append(f"{row['arm']} vs {reference}, on {m['n_paired']} questions, {r['n_paired']} stage-1 validation "
                   f"records and {f['n_paired']} queries: {mcq_says}; {loss_says}; {f1_says}.")
    compared = sum("vs_reference" in row for row in rows)
    out.append(f"Intervals: bootstrap 95% over the stage-1 validation records. Significance at p < {alpha} per "
               f"comparison, without correction for the {3 * compared} comparisons made.")
    return out


def write_table(summary: dict[str, Any], study_dir: Path) -> tuple[Path, Path]:
    rows = summary["rows"]
    sets = list(rows[0]["mcq_by_set"])
    reference = summary["reference"]["name"]
    if summary["compare"] == "handoff":
        title = f"# Handoff study: how stage 2 starts from stage 1 ({summary['profile']} profile)"
        design = (f"Every arm trains stage 2 on the same {summary['dialogue_rows']['train']:,} dialogue rows and the same "
                  f"replayed stage-1 rows (replay share {summary['settings']['shares'][0]:.2f}; the paper's is "
                  f"{summary['paper_share']:.2f}) and differs only in its handoff (medlib/training/handoff.py).")
    else:
        title = f"# DMT study: stage-1 replay in stage 2 ({summary['profile']} profile)"
        design = (f"Every arm trains stage 2 on the same {summary['dialogue_rows']['train']:,} dialogue rows; the replay share "
                  f"is the stage-1 rows among all stage-2 training rows (the paper's is {summary['paper_share']:.2f}: 33,333 "
                  "beside 100,000).")
    md = [title, "", summary["note"] + ".", "", design + " MCQ: mean accuracy over " + ", ".join(sets) + " with a "
          "bootstrap 95% CI, and the mean log-probability of the gold letter; stage-1 gain kept: the share of Med-Mix's "
          "validation-loss gain over the base that the model keeps; retention: the answer loss of "
          f"{rows[0]['retention_n'] + rows[0]['retention_unscored']} stage-1 validation records (lower keeps more of "
          "stage 1); ΔW1 kept: the share of Med-Mix's update the arm starts stage 2 from; BERTScore F1 on the dialogue "
          f"hold-out with a bootstrap 95% CI. Differences are paired, against {reference}.", "",
          "| Model | Handoff | Replay share | Train rows | ΔW1 kept | Stage-1 gain kept [95% CI] | MCQ accuracy | 95% CI | "
          + " | ".join(sets)
          + " | Gold-letter log-prob | Stage-1 val loss | 95% CI | BERTScore F1 | 95% CI | MCQ vs ref (p) | "
          "Loss vs ref (p) | F1 vs ref (p) |",
          "|---|---|---|---|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_reference")
        mcq_vs = f"{100 * vs['mcq']['difference']:+.1f} ({vs['mcq']['p_mcnemar']:.3g})" if vs else "–"
        loss_vs = f"{vs['retention_loss']['difference']:+.3f} ({vs['retention_loss']['p_permutation']:.3g})" if vs else "–"
        f1_vs = f"{vs['f1']['difference']:+.3f} ({vs['f1']['p_permutation']:.3g})" if vs else "–"
        share = "–" if r["share"] is None else f"{r['share']:.2f}"
        kept = "–" if r["delta_w1_kept"] is None else f"{100 * r['delta_w1_kept']:.1f}%"
        gold = "–" if r["gold_logprob"] is None else f"{r['gold_logprob']:.3f}"
        g = r.get("stage1_gain_kept")
        gain = "–" if not g else f"{100 * g[0]:.0f}% [{100 * g[1]:.0f}, {100 * g[2]:.0f}]"
        md.append(f"| {r['arm']} | {r['handoff'] or '–'} | {share} | {r['train_rows']} | {kept} | {gain} | {100 * r['mcq_accuracy']:.1f} | "
                  f"[{100 * r['mcq_ci95'][0]:.1f}, {100 * r['mcq_ci95'][1]:.1f}] | "
                  + " | ".join(f"{100 * r['mcq_by_set'][s]:.1f}" for s in sets)
                  + f" | {gold} | {r['retention_loss']:.3f} | [{r['retention_loss_ci95'][0]:.3f}, {r['retention_loss_ci95'][1]:.3f}]"
                  f" | {r['f1']:.3f} | [{r['f1_ci95'][0]:.3f}, {r['f1_ci95'][1]:.3f}] | {mcq_vs} | {loss_vs} | {f1_vs} |")
    measured = summary.get("med_mix_handoff_measure")
    if measured:
        md += ["", "Med-Mix's ΔW1 and what the requantized merge keeps of it, per module type:", "",
               "| module | matrices | |ΔW1| / |W'| | kept by the 16-bit cast | kept by the 4-bit reload | cosine |",
               "|---|---|---|---|---|---|"]
        for module, m in [("all", measured["all"]), *measured["by_module"].items()]:
            md.append(f"| {module} | {m['matrices']} | {100 * m['delta_over_weight']:.3f}% | {100 * m['kept_after_16bit_cast']:.1f}% "
                      f"| {100 * m['kept_share']:.1f}% | {m['kept_cosine']:.3f} |")
    figure = "handoffs.png" if summary["compare"] == "handoff" else "dmt_tradeoff.png"
    md += ["", "## Findings", ""] + [f"- {line}" for line in summary["findings"]] + ["", f"![{summary['study']} study]({figure})", ""]
    md_path = study_dir / "table.md"
    md_path.write_text("\n".join(md))
    csv_path = study_dir / "table.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "arm", "handoff", "share", "from_base", "train_rows", "delta_w1_kept", "mcq_accuracy",
                         "mcq_ci_low", "mcq_ci_high", *[f"{s}_accuracy" for s in sets], "gold_logprob", "retention_loss",
                         "retention_loss_ci_low", "retention_loss_ci_high", "f1", "f1_ci_low", "f1_ci_high"])
        for r in rows:
            writer.writerow([r["label"], r["arm"], r["handoff"], r["share"], r["from_base"], r["train_rows"],
                             r["delta_w1_kept"], r["mcq_accuracy"], *r["mcq_ci95"], *[r["mcq_by_set"][s] for s in sets],
                             r["gold_logprob"], r["retention_loss"], *r["retention_loss_ci95"], r["f1"], *r["f1_ci95"]])
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


def plot_handoffs(summary: dict[str, Any], path: Path) -> Path:
    """One bar per model on each measure (MCQ accuracy, stage-1 validation loss, BERTScore F1), 95% CIs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    rows = summary["rows"]
    labels = [r["label"] for r in rows]
    for ax, key, ci, scale, title in ((axes[0], "mcq_accuracy", "mcq_ci95", 100, "MCQ accuracy (%), mean of the sets"),
                                      (axes[1], "retention_loss", "retention_loss_ci95", 1, "stage-1 validation loss (lower keeps more)"),
                                      (axes[2], "f1", "f1_ci95", 1, "BERTScore F1, dialogue hold-out")):
        ys = [scale * r[key] for r in rows]
        err = [[scale * (r[key] - r[ci][0]) for r in rows], [scale * (r[ci][1] - r[key]) for r in rows]]
        colors = ["grey" if r["share"] is None else "tab:red" if r["from_base"] else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), ys, yerr=err, capsize=4, color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        low = min(scale * r[ci][0] for r in rows)
        ax.set_ylim(bottom=max(0.0, low - 0.1 * abs(low)))
    fig.suptitle(f"Handoff study — {summary['profile']} profile, reference {summary['reference']['name']}\n{summary['note']}",
                 fontsize=9)
    return _save(fig, path, description=f"Handoff study, {summary['profile']} profile: MCQ accuracy, stage-1 validation "
                                         "loss and BERTScore F1 per handoff, 95% CIs")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("study", help="studies beyond the paper (dmt: how much replay stage 2 needs; "
                                                 "handoff: how stage 2 starts from stage 1)")
    which = parser.add_subparsers(dest="study", required=True)
    for name, help_text in (("dmt", "stage 2 from one Med-Mix for several replay shares, scored on retention and BERTScore"),
                            ("handoff", "stage 2 from one Med-Mix through each handoff, scored on retention and BERTScore")):
        sub = which.add_parser(name, help=help_text, description=__doc__.split("\n\n")[1 if name == "dmt" else 2])
        sub.add_argument("--profile", choices=["local", "paper"], default="local")
        sub.add_argument("--out", default=None, help=f"output root (default outputs/<profile>); the study goes in study/{name}/")
        sub.add_argument("--data-dir", default=None, help="folder of the published data files (overrides the recipes)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help=f"override a study_{name}.yaml key (e.g. --set max_steps=20) or a training or evaluation "
                              "recipe key (e.g. --set training.max_steps=20); repeatable")
        sub.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        data_dir = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
        run_study(args.study, args.profile, args.out, [*data_dir, *args.overrides])
    except (StudyError, config.RecipeError) as exc:
        raise CLIError(str(exc)) from None
    return 0
