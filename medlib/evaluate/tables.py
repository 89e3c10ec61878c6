"""table3.md/.csv (MCQ accuracy), table4.md/.csv (BERTScore) and samples.md, with the paper's
reference rows from medlib/reference/paper.yaml beside ours.

Our rows are read from the results.json files of an output folder (<out>/mcq/<label>/ and
<out>/bertscore/<label>/), so evaluating base, Med-Mix and Med-Nirvana one by one fills one table.
Paper rows are every row of the paper's Tables 3 and 4 as transcribed there; "–" (not reported) where
the paper prints none.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from medlib.data.io import read_jsonl
from medlib.data.sources import REGISTRY, paper_columns, set_title
from medlib.evaluate import stats
from medlib.paths import PACKAGE_DIR

REFERENCE_FILE = PACKAGE_DIR / "reference" / "paper.yaml"
NOT_TRANSCRIBED = "n/a (not transcribed)"
NOT_REPORTED = "– (not reported)"
REFERENCE_LABELS = ("model", "size", "table", "own")  # the non-numeric keys of a reference row
NOT_IN_PAPER = "— (not in paper)"
NOT_RUN = "not run"

COLUMNS_FILE = "table3_columns.json"   # Table 3's columns as [key, title], for its figure
TABLE3_ID_COLUMNS = ["Source", "Model", "Profile", "Base model", "Adapter", "Method", "Questions/set", "Weights"]
TABLE4_METRICS = [("precision", "Precision"), ("recall", "Recall"), ("f1", "F1")]
TABLE4_ID_COLUMNS = ["Source", "Model", "Profile", "Base model", "Adapter", "BERTScore model", "N", "Decoding"]


def table3_columns(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The paper's columns (medlib.data.sources: paper_column), their average, then every other set the results
    scored, in the order first seen, each titled by its source."""
    paper = [(key, next(s.title for s in REGISTRY.values() if s.paper_column == key)) for key in paper_columns()]
    columns = paper + [("average", f"Average ({', '.join(title for _, title in paper)})")]
    for r in results:
        for name in r.get("sets", {}):
            if name not in {key for key, _ in columns}:
                source = (r.get("sets_source") or {}).get(name, {}).get("source", name)
                columns.append((name, set_title(name, source)))
    return columns


def load_reference(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else REFERENCE_FILE
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for table in ("table3", "table4"):
        rows = data.get(table, {}).get("rows", [])
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "model" not in row:
                raise ValueError(f"{path}: {table}.rows[{i}] must be a mapping with a 'model' key")
            for key, value in row.items():
                if key not in REFERENCE_LABELS and value is not None and not isinstance(value, (int, float)):
                    raise ValueError(f"{path}: {table}.rows[{i}].{key} must be a number or null, not {value!r}")
    return data


def collect_results(out_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """Every <out_dir>/<kind>/<label>/results.json: the base model, then stage-1 runs, then stage-2 runs."""
    results = [json.loads(p.read_text()) for p in sorted(Path(out_dir, kind).glob("*/results.json"))]
    return sorted(results, key=lambda r: (int(r.get("stage", 2)), "" if r["label"] == "base" else r["label"]))


def _pct(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _ours_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("accuracy") is None or entry.get("n_scored", 1) == 0:
        return NOT_RUN
    lo, hi = entry["ci95"]
    n = f", n={entry['n_scored']}" if "n_scored" in entry else ""
    spread = f" ± {_pct(entry['accuracy_sd'])} SD of {len(entry['runs'])} runs" if entry.get("runs") else ""
    return f"{_pct(entry['accuracy'])}{spread} ({_pct(lo)}–{_pct(hi)}{n})"


def _ref_cell(row: Mapping[str, Any], key: str, scale: str = "{:.1f}", transcribed: bool = True) -> str:
    if key not in row:
        return NOT_IN_PAPER
    if row[key] is None:
        return NOT_REPORTED if transcribed else NOT_TRANSCRIBED
    return scale.format(row[key])


def _ref_source(row: Mapping[str, Any], table: int) -> str:
    """The paper's own models, and the comparison models it quotes from others, kept apart."""
    return f"paper (Table {table})" if row.get("own") else f"paper (Table {table}, comparison)"


def _ref_model(row: Mapping[str, Any]) -> str:
    return f"{row['model']} {row['size']}" if row.get("size") else row["model"]


def _adapter_text(result: Mapping[str, Any]) -> str:
    adapters = result.get("adapters") or []
    return " + ".join(Path(a).name for a in adapters) if adapters else "none"


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _reference_note(reference: Mapping[str, Any], table: str) -> str:
    status = reference.get(table, {}).get("status", reference.get("status", "unknown"))
    note = (f"Paper rows: figures reported by {reference.get('citation', 'the paper')} ({'Table 3' if table == 'table3' else 'Table 4'}), "
            f"quoted from medlib/reference/paper.yaml, not reproduced here. Status: {status}. "
            "'comparison' rows are other models whose figures the paper quotes.")
    if status != "transcribed":
        note += (" The paper's text could not be checked offline, so its figures have not been transcribed and"
                 " none are invented; fill in medlib/reference/paper.yaml to show them.")
    return note


def fidelity_text(fidelity: Mapping[str, Any]) -> str:
    """A run's fidelity choices in one line (data_cards/fidelity.md explains each)."""
    seeds = fidelity.get("seeds") or {}
    parts = [f"template {fidelity.get('chat_template')}", f"prompt {fidelity.get('mcq_format')}",
             f"target {fidelity.get('target_style')}", f"loss on {fidelity.get('loss_on')}",
             f"packing {fidelity.get('packing')}", f"batch {fidelity.get('batch')}",
             f"seeds data {seeds.get('data')} / trainer {seeds.get('trainer')}", f"data order {fidelity.get('data_order')}",
             f"decontamination {fidelity.get('decontaminate')}"]
    if fidelity.get("stage1_handoff"):
        parts.append(f"stage-1 handoff {fidelity['stage1_handoff']}")
    return ", ".join(parts)


def _method_text(settings: Mapping[str, Any]) -> str:
    """loglik | generate, with the answer cue and the authors' parse rule when they were used."""
    text = settings["method"]
    extras = [f"cue {settings['answer_cue']!r}"] if settings.get("answer_cue") else []
    if settings["method"] == "generate" and settings.get("parse") == "authors":
        extras.append("authors' parse")
    sampling = settings.get("sampling") or {}
    if settings["method"] == "generate" and sampling.get("do_sample"):
        extras.append(f"sampled T={sampling.get('temperature')} top_p={sampling.get('top_p')}")
    return f"{text} ({', '.join(extras)})" if extras else text


def _queries_text(result: Mapping[str, Any]) -> str:
    source = result.get("queries_source")
    if isinstance(source, Mapping):
        return f"{source.get('source')}/{source.get('split')}" + (f" hold-out of {source['holdout']}" if source.get("holdout") else "")
    if isinstance(source, list):
        return " + ".join(_queries_text({"queries_source": s}) for s in source)
    return str(source)


def _write(out_dir: Path, stem: str, header: Sequence[str], md_rows: list[list[str]], csv_header: Sequence[str],
           csv_rows: list[list[Any]], title: str, notes: Sequence[str], extra: str = "") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(f"# {title}\n\n" + _markdown(header, md_rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
                  + (f"\n{extra}\n" if extra else ""))
    path_csv = out_dir / f"{stem}.csv"
    with open(path_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_header)
        writer.writerows(csv_rows)
    return md, path_csv


def write_table3(results: Sequence[Mapping[str, Any]] | None = None, out_dir: str | Path = ".",
                 reference_file: str | Path | None = None) -> tuple[Path, Path]:
    """table3.md and table3.csv in out_dir: our MCQ rows (default: every mcq/*/results.json there) and the paper's."""
    out_dir = Path(out_dir)
    results = list(results) if results is not None else collect_results(out_dir, "mcq")
    reference = load_reference(reference_file)
    columns = table3_columns(results)
    keys = [k for k, _ in columns]
    header = TABLE3_ID_COLUMNS + [title for _, title in columns]
    csv_header = ["source", "model", "profile", "base_model", "adapter", "method", "questions_per_set", "weights"]
    for key in keys:
        csv_header += [f"{key}_accuracy", f"{key}_ci95_low", f"{key}_ci95_high", f"{key}_n"]
    checked = any(s.get("position_bias") for r in results for s in r.get("sets", {}).values())
    if checked:  # the permutation check (mcq.position_bias): its headline as a column, its detail in its section
        header.append("Right under all option orders")
        csv_header += ["right_under_all_orders", "position_checked_questions"]
    md_rows, csv_rows = [], []
    for r in results:
        entries = dict(r.get("sets", {}))
        entries["average"] = r.get("average_paper_sets")
        ident = ["ours", r.get("display_name", r["label"]), r["profile"], r["model"], _adapter_text(r),
                 _method_text(r["settings"]), str(r.get("limit_per_set") or "all"),
                 "nf4" if r.get("load_in_4bit") else r.get("dtype", "")]
        rows_of = [(ident, entries)]
        other = r.get("other_protocol")
        if other:  # the same model by the other protocol: a row of its own, labelled with it
            rows_of.append((ident[:5] + [_method_text(other["settings"]), str(other.get("limit_per_set") or "all"), ident[7]],
                            {**other["sets"], "average": other.get("average_paper_sets")}))
        for n_row, (row_ident, row_entries) in enumerate(rows_of):
            md_rows.append(row_ident + [_ours_cell(row_entries.get(k)) for k in keys])
            row: list[Any] = list(row_ident)
            for k in keys:
                e = row_entries.get(k)
                if e and e.get("accuracy") is not None:
                    row += [round(100 * e["accuracy"], 2), round(100 * e["ci95"][0], 2), round(100 * e["ci95"][1], 2),
                            e.get("n_scored", sum(row_entries[s]["n_scored"] for s in e.get("sets", [])))]
                else:
                    row += [NOT_RUN, "", "", ""]
            if checked:  # one check per model (log-likelihood, whatever the protocol): on its first row
                share, n = _right_under_all(r) if n_row == 0 else (None, 0)
                md_rows[-1].append(f"{_pct(share)}% (n={n})" if n else "")
                row += [round(100 * share, 2) if n else "", n or ""]
            csv_rows.append(row)
    done = reference.get("table3", {}).get("status") == "transcribed"
    for ref in reference.get("table3", {}).get("rows", []):
        ident = [_ref_source(ref, 3), _ref_model(ref), "paper", "", "", "as reported", "as reported", ""]
        md_rows.append(ident + [_ref_cell(ref, k, transcribed=done) for k in keys] + (["not reported"] if checked else []))
        row = list(ident)
        for k in keys:
            row += [_ref_cell(ref, k, "{}", done), "", "", ""]
        csv_rows.append(row + (["", ""] if checked else []))
    notes = ["Our cells: accuracy % (95% bootstrap CI, n = questions scored). The average is the unweighted mean of "
             "MedQA, MedMCQA and PubMedQA, with a CI that resamples each set.",
             _reference_note(reference, "table3")]
    notes += sorted({r["tables_note"] for r in results if r.get("tables_note")})  # each eval recipe's own words
    for r in results:
        bad = {k: v["n_bad"] for k, v in r.get("sets", {}).items() if v.get("n_bad")}
        trunc = {k: v["n_truncated"] for k, v in r.get("sets", {}).items() if v.get("n_truncated")}
        unparse = {k: f"{100 * v['unparseable_share']:.1f}%" for k, v in r.get("sets", {}).items() if "unparseable_share" in v}
        unparse.update({f"{k} ({v['method']})": f"{100 * v['unparseable_share']:.1f}%"
                        for k, v in (r.get("other_protocol") or {}).get("sets", {}).items() if "unparseable_share" in v})
        extra = [f"bad items {bad}" if bad else "no bad items", f"contexts cut to fit {r['settings']['max_length']} tokens: {trunc or 0}"]
        if unparse:
            extra.append(f"unparseable replies {unparse}")
        if r.get("training_fidelity"):
            extra.append("trained with " + fidelity_text(r["training_fidelity"]))
        if r.get("weights"):
            extra.append(f"weights scored: {r['weights']}")
        gold = {k: f"{v['gold_logprob_mean']:.3f}" for k, v in r.get("sets", {}).items() if "gold_logprob_mean" in v}
        if gold:
            extra.append(f"mean log-probability of the gold letter {gold}")
        notes.append(f"{r.get('display_name', r['label'])}: " + "; ".join(extra) + ".")
    notes += _sets_notes(results)
    notes.append(_protocol_note(results, columns))
    extra = "\n\n".join(part for part in (_diagnostics_md(results), _position_bias_md(results),
                                          _paired_mcq_md(results, out_dir)) if part)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COLUMNS_FILE).write_text(json.dumps(columns))
    return _write(out_dir, "table3", header, md_rows, csv_header, csv_rows,
                  "Table 3 — multiple-choice accuracy", notes, extra)


def _protocol_note(results: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Which scoring protocol each row used, and the lm-evaluation-harness task of each column: a log-likelihood
    row sits beside leaderboards that run those tasks; a generation row beside the paper and model cards."""
    source_of = {name: spec.get("source", name) for r in results for name, spec in (r.get("sets_source") or {}).items()}
    tasks = [f"{title} = {', '.join(REGISTRY[source_of.get(k, k)].lm_eval_tasks)}" for k, title in columns
             if source_of.get(k, k) in REGISTRY and REGISTRY[source_of.get(k, k)].lm_eval_tasks]
    protocols = sorted({_method_text(r["settings"]) for r in results})
    return ("Scoring protocols in this table: " + ("; ".join(protocols) or "none") + ". A loglik cell is the answer "
            "letter's log-probability after the prompt, the convention of lm-evaluation-harness (the Open Medical-LLM "
            "Leaderboard) on its tasks " + "; ".join(tasks) + " (all in its multimedqa group), scored here on medlib's "
            "prompt text; a generate cell reads the letter from a generated reply, as the paper does. The same model "
            "can differ by 10-20 points between the two, so compare a cell only with cells of its protocol.")


def _sets_notes(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each evaluated set's source (file or Hub id) and the content hash of the questions scored, once per
    distinct set; a set scored from different questions by different rows is listed once per version."""
    seen: dict[tuple, list[str]] = {}
    for r in results:
        for name, source in (r.get("sets_source") or {}).items():
            if "origin" in source:
                key = (name, source["origin"], source["content_sha256"], source["n_questions"])
                seen.setdefault(key, []).append(r.get("display_name", r["label"]))
    versions = [key[0] for key in seen]
    return [f"Set {name}: {n} questions from {origin} (content sha256 {digest[:16]}…)"
            + (f", scored for {', '.join(who)}" if versions.count(name) > 1 else "")
            for (name, origin, digest, n), who in seen.items()]


def write_table4(results: Sequence[Mapping[str, Any]] | None = None, out_dir: str | Path = ".",
                 reference_file: str | Path | None = None) -> tuple[Path, Path]:
    """table4.md and table4.csv: BERTScore P/R/F1 of our rows (bertscore/*/results.json) and the paper's."""
    out_dir = Path(out_dir)
    results = list(results) if results is not None else collect_results(out_dir, "bertscore")
    reference = load_reference(reference_file)
    header = TABLE4_ID_COLUMNS + [t for _, t in TABLE4_METRICS]
    csv_header = ["source", "model", "profile", "base_model", "adapter", "bertscore_model", "n", "decoding"] + \
        [k for k, _ in TABLE4_METRICS] + ["bertscore_hash"]
    md_rows, csv_rows = [], []
    for r in results:
        ident = ["ours", r.get("display_name", r["label"]), r["profile"], r["model"], _adapter_text(r),
                 f"{r['bertscore']['model_type']} (layer {r['bertscore']['num_layers']})", str(r["n"]), r["decoding"]]
        md_rows.append(ident + [f"{r['scores'][k]:.4f}" for k, _ in TABLE4_METRICS])
        csv_rows.append(ident + [round(r["scores"][k], 6) for k, _ in TABLE4_METRICS] + [r["bertscore"]["hash"]])
    done = reference.get("table4", {}).get("status") == "transcribed"
    for ref in reference.get("table4", {}).get("rows", []):
        ident = [_ref_source(ref, 4), _ref_model(ref), "paper", "", "", "not named in the paper", "50 (iCliniq + HealthCareMagic)",
                 "best of several samples"]
        md_rows.append(ident + [_ref_cell(ref, k, "{:.4f}", done) for k, _ in TABLE4_METRICS])
        csv_rows.append(ident + [_ref_cell(ref, k, "{}", done) for k, _ in TABLE4_METRICS] + [""])
    notes = ["BERTScore P/R/F1 (mean over queries) of each model's answer against the physician's answer; "
             "no baseline rescaling unless the hash says `rescaled`."]
    notes += [f"{r.get('display_name', r['label'])}: bert-score hash `{r['bertscore']['hash']}`; generation {json.dumps(r['generation'])}"
              for r in results]
    notes.append(_reference_note(reference, "table4"))
    for note in dict.fromkeys(f"{r['profile']} profile rows: {r['note']}; queries {_queries_text(r)}, BERTScore model "
                              f"{r['bertscore']['model_type']}" for r in results if r.get("note")):
        notes.append(note + ".")
    return _write(out_dir, "table4", header, md_rows, csv_header, csv_rows, "Table 4 — BERTScore", notes,
                  _paired_bertscore_md(results, out_dir))


def _pairs(results: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """Base -> Med-Mix, Med-Mix -> Med-Nirvana, Base -> Med-Nirvana (in row order: each later model against each earlier)."""
    return [(results[i], results[j]) for i in range(len(results)) for j in range(i + 1, len(results))]


def _name(result: Mapping[str, Any]) -> str:
    return result.get("display_name", result["label"])


def _right_under_all(result: Mapping[str, Any]) -> tuple[float | None, int]:
    """The share of a model's position-checked questions it answers right under every option order, over its sets."""
    checks = [s["position_bias"] for s in result.get("sets", {}).values() if s.get("position_bias")]
    n = sum(b["questions"] for b in checks)
    return (sum(b["right_under_all"] * b["questions"] for b in checks) / n if n else None), n


def _position_bias_md(results: Sequence[Mapping[str, Any]]) -> str:
    """The permutation check (mcq.position_bias), when it ran: one row per model and set."""
    rows = [(r, name, s["position_bias"]) for r in results for name, s in r.get("sets", {}).items() if s.get("position_bias")]
    if not rows:
        return ""
    lines = ["## Position bias (every cyclic permutation of the options)", "",
             "Each question scored by log-likelihood under every cyclic shift of its option texts, the gold answer "
             "moving with its text. A model that knows the answer is right under all shifts; one that prefers a "
             "position answers it whatever sits there. p: Pearson's chi-square test that the answers spread equally "
             "over the positions (each answer counted as one observation).", "",
             "| Model | Set | Questions | Accuracy over permutations | Right under all | Answers per position | p | Flag |",
             "|---|---|---|---|---|---|---|---|"]
    for r, name, b in rows:
        spread = ", ".join(f"{letter} {100 * share:.0f}%" for letter, share in b["position_share"].items())
        flag = "**position-biased**" if b["position_biased"] else ""
        lines.append(f"| {_name(r)} | {name} | {b['questions']} | {_pct(b['accuracy_over_permutations'])}% | "
                     f"{_pct(b['right_under_all'])}% | {spread} (equal: {100 * b['equal_share']:.0f}%) | {b['p']:.3g} | {flag} |")
    return "\n".join(lines)


def _diagnostics_md(results: Sequence[Mapping[str, Any]]) -> str:
    lines = ["## Answer-letter diagnostics", "",
             f"Predicted letters beside the gold letters of the scored questions; **constant** marks a model whose "
             f"most frequent letter takes more than {stats.CONSTANT_SHARE:.0%} of its answers. The majority baseline "
             "always answers the set's most frequent gold letter.", "",
             "| Model | Set | Predicted | Gold | Top share | Majority baseline | Accuracy | Flag |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, summary in r.get("sets", {}).items():
            d = summary.get("diagnostics")
            if not d:
                continue
            fmt = lambda c: ", ".join(f"{k} {v}" for k, v in c.items())  # noqa: E731
            flag = f"**constant ({d['top_prediction']})**" if d["constant"] else ""
            lines.append(f"| {_name(r)} | {name} | {fmt(d['predicted'])} | {fmt(d['gold'])} | "
                         f"{_pct(d['top_prediction_share'])}% {d['top_prediction']} | {_pct(d['majority_baseline'])}% "
                         f"({d['majority_letter']}) | {_pct(summary.get('accuracy'))}% | {flag} |")
    return "\n".join(lines)


def _paired(pair: tuple[Mapping[str, Any], Mapping[str, Any]], files_of, compare,
            extra: Mapping[str, Any] | None = None) -> dict | None:
    """One comparison of two models from their per-item files (None when either file is missing)."""
    first, second = pair
    files = [files_of(r) for r in pair]
    if not all(f and Path(f).exists() for f in files):
        return None
    return {"first": _name(first), "second": _name(second), **(extra or {}), **compare(*map(read_jsonl, files))}


def paired_mcq(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every model pair on every set both were scored on, from their per-question prediction files."""
    rows = (_paired(pair, lambda r, n=name: r["sets"][n].get("predictions_file"), stats.compare_mcq, {"set": name})
            for pair in _pairs(results) for name in sorted(set(pair[0].get("sets", {})) & set(pair[1].get("sets", {}))))
    return [row for row in rows if row]


def _paired_mcq_md(results: Sequence[Mapping[str, Any]], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = paired_mcq(results)
    (out_dir / "table3_paired.json").write_text(json.dumps(rows, indent=1))
    lines = ["## Paired comparisons", "",
             "Second model minus first, on the same questions: accuracy difference in points with a paired-bootstrap "
             "95% CI, the discordant questions, and McNemar's exact two-sided p.", "",
             "| First | Second | Set | n | Difference (points) | 95% CI | Only first right | Only second right | p (McNemar) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['first']} | {c['second']} | {c['set']} | {c['n_paired']} | {100 * c['difference']:+.1f} | "
                     f"{100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f} | {c['only_first_right']} | "
                     f"{c['only_second_right']} | {c['p_mcnemar']:.3g} |")
    return "\n".join(lines)


def paired_bertscore(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every model pair, BERTScore F1 per query, from their generation files."""
    rows = (_paired(pair, lambda r: r.get("generations_file"), stats.compare_bertscore) for pair in _pairs(results))
    return [row for row in rows if row]


def _paired_bertscore_md(results: Sequence[Mapping[str, Any]], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = paired_bertscore(results)
    (out_dir / "table4_paired.json").write_text(json.dumps(rows, indent=1))
    lines = ["## Paired comparisons", "",
             "Second model minus first, BERTScore F1 on the same queries: mean difference with a paired-bootstrap 95% CI "
             "and a two-sided sign-flip permutation p.", "",
             "| First | Second | n | F1 first | F1 second | Difference | 95% CI | p (permutation) |", "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c['first']} | {c['second']} | {c['n_paired']} | {c['f1_first']:.4f} | {c['f1_second']:.4f} | "
                     f"{c['difference']:+.4f} | {c['ci95'][0]:+.4f} to {c['ci95'][1]:+.4f} | {c['p_permutation']:.3g} |")
    return "\n".join(lines)


def write_samples(results: Sequence[Mapping[str, Any]] | None = None, out_dir: str | Path = ".", k: int = 5) -> Path:
    """samples.md: for the first k queries, the physician's answer beside every evaluated model's answer."""
    out_dir = Path(out_dir)
    results = list(results) if results is not None else collect_results(out_dir, "bertscore")
    answers: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in results:
        with open(r["generations_file"]) as f:
            answers[r["label"]] = {row["id"]: row for row in map(json.loads, f)}
    first = results[0] if results else None
    ids = list(answers[first["label"]])[:k] if first else []
    parts = ["# Side-by-side answers", "",
             f"{len(ids)} held-out consumer questions; the physician's answer beside each model's "
             "(the paper's Figures 3-10 show such pairs). Decoding and models are listed under each answer.", ""]
    for n, qid in enumerate(ids, 1):
        base_row = answers[first["label"]][qid]
        parts += [f"## {n}. `{qid}`", "", "**Patient:**", "", _quote(base_row["query"]), "",
                  "**Physician (reference):**", "", _quote(base_row["reference"]), ""]
        for r in results:
            row = answers[r["label"]].get(qid)
            if row is None:
                continue
            parts += [f"**{r.get('display_name', r['label'])}** ({r['model']}, adapter {_adapter_text(r)}; "
                      f"BERTScore F1 {row['f1']:.3f}):", "", _quote(row["answer"]), ""]
    path = out_dir / "samples.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


PAPER_SAMPLE_TITLES = {"llama_instruct": "LLaMA 3.1 8B Instruct (4 bit quantized)",
                       "med_nirvana": "Med-Nirvana 8B (4 bit quantized)"}


def write_paper_samples(results: Sequence[Mapping[str, Any]] | None = None, out_dir: str | Path = ".") -> Path:
    """figures_3_10.md: the paper's eight consumer queries (its Figures 3-10); for each, the physician's
    answer, the answers the paper published (best of several samples, its Section 4) and every model
    evaluated here, each with its BERTScore F1 against the physician under this run's BERTScore model."""
    out_dir = Path(out_dir)
    results = [r for r in (list(results) if results is not None else collect_results(out_dir, "bertscore"))
               if r.get("paper_samples")]
    answers = {}
    for r in results:
        with open(r["paper_samples"]["file"]) as f:
            answers[r["label"]] = list(map(json.loads, f))
    first = answers[results[0]["label"]] if results else []
    scorer = f"`{results[0]['bertscore']['model_type']}`" if results else "—"
    parts = ["# Figures 3-10 side by side", "",
             "The paper's eight consumer queries with the physician's answer and the answers the paper published "
             "(transcribed verbatim: medlib/reference/figures_3_10.yaml; the paper picked each as the best of several "
             f"samples), beside this run's models. F1: BERTScore against the physician, all scored here with {scorer}.", ""]
    if results:
        parts += ["| Model | mean F1 over the 8 queries |", "|---|---|"]
        for key, title in PAPER_SAMPLE_TITLES.items():
            parts.append(f"| paper: {title} | {sum(row['paper'][key]['f1'] for row in first) / len(first):.3f} |")
        for r in results:
            rows = answers[r["label"]]
            parts.append(f"| ours: {r.get('display_name', r['label'])} ({r['model']}; {r.get('decoding', '')}) | "
                         f"{sum(row['f1'] for row in rows) / len(rows):.3f} |")
        parts.append("")
    for i, row in enumerate(first):
        parts += [f"## Figure {row['figure']} (Sample {row['sample']})", "", "**Consumer query:**", "", _quote(row["query"]),
                  "", "**Physician's answer:**", "", _quote(row["reference"]), ""]
        for key, title in PAPER_SAMPLE_TITLES.items():
            parts += [f"**paper: {title}** (F1 {row['paper'][key]['f1']:.3f}):", "", _quote(row["paper"][key]["answer"]), ""]
        for r in results:
            ours = answers[r["label"]][i]
            parts += [f"**ours: {r.get('display_name', r['label'])}** (F1 {ours['f1']:.3f}):", "", _quote(ours["answer"]), ""]
    path = out_dir / "figures_3_10.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())
