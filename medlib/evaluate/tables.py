"""table3.md/.csv (MCQ accuracy), table4.md/.csv (BERTScore) and samples.md, with the paper's
reference rows from medlib/reference/paper.yaml beside ours.

Our rows are read from the results.json files of an output folder (<out>/mcq/<label>/ and
<out>/bertscore/<label>/), so evaluating base, Med-Mix and Med-Nirvana one by one fills one table.
Paper rows print "n/a (not transcribed)" for every figure still null in the reference file.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from medlib.paths import PACKAGE_DIR

REFERENCE_FILE = PACKAGE_DIR / "reference" / "paper.yaml"
NOT_TRANSCRIBED = "n/a (not transcribed)"
NOT_IN_PAPER = "— (not in paper)"
NOT_RUN = "not run"

TABLE3_SETS = ("medqa", "medmcqa", "pubmedqa")
TABLE3_COLUMNS = [("medqa", "MedQA"), ("medmcqa", "MedMCQA"), ("pubmedqa", "PubMedQA"),
                  ("average", "Average (MedQA, MedMCQA, PubMedQA)"), ("mmlu_med", "MMLU-med (extra)")]
TABLE3_ID_COLUMNS = ["Source", "Model", "Profile", "Base model", "Adapter", "Method", "Questions/set", "Weights"]
TABLE4_METRICS = [("precision", "Precision"), ("recall", "Recall"), ("f1", "F1")]
TABLE4_ID_COLUMNS = ["Source", "Model", "Profile", "Base model", "Adapter", "BERTScore model", "N", "Decoding"]


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
                if key != "model" and value is not None and not isinstance(value, (int, float)):
                    raise ValueError(f"{path}: {table}.rows[{i}].{key} must be a number or null, not {value!r}")
    return data


def collect_results(out_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """Every <out_dir>/<kind>/<label>/results.json, base first, then Med-Mix, Med-Nirvana, others."""
    from medlib.evaluate.common import row_sort_key

    results = [json.loads(p.read_text()) for p in sorted(Path(out_dir, kind).glob("*/results.json"))]
    return sorted(results, key=lambda r: row_sort_key(r["label"]))


def _pct(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _ours_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("accuracy") is None or entry.get("n_scored", 1) == 0:
        return NOT_RUN
    lo, hi = entry["ci95"]
    n = f", n={entry['n_scored']}" if "n_scored" in entry else ""
    return f"{_pct(entry['accuracy'])} ({_pct(lo)}–{_pct(hi)}{n})"


def _ref_cell(row: Mapping[str, Any], key: str, scale: str = "{:.1f}") -> str:
    if key not in row:
        return NOT_IN_PAPER
    return NOT_TRANSCRIBED if row[key] is None else scale.format(row[key])


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
            f"quoted from medlib/reference/paper.yaml, not reproduced here. Status: {status}.")
    if status != "transcribed":
        note += (" The paper's text could not be checked offline, so its figures have not been transcribed and"
                 " none are invented; fill in medlib/reference/paper.yaml to show them.")
    return note


def _write(out_dir: Path, stem: str, header: Sequence[str], md_rows: list[list[str]], csv_header: Sequence[str],
           csv_rows: list[list[Any]], title: str, notes: Sequence[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(f"# {title}\n\n" + _markdown(header, md_rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
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
    keys = [k for k, _ in TABLE3_COLUMNS]
    header = TABLE3_ID_COLUMNS + [title for _, title in TABLE3_COLUMNS]
    csv_header = ["source", "model", "profile", "base_model", "adapter", "method", "questions_per_set", "weights"]
    for key in keys:
        csv_header += [f"{key}_accuracy", f"{key}_ci95_low", f"{key}_ci95_high", f"{key}_n"]
    md_rows, csv_rows = [], []
    for r in results:
        entries = dict(r.get("sets", {}))
        entries["average"] = r.get("average_paper_sets")
        ident = ["ours", r.get("display_name", r["label"]), r["profile"], r["model"], _adapter_text(r),
                 r["settings"]["method"], str(r.get("limit_per_set") or "all"),
                 "nf4" if r.get("load_in_4bit") else r.get("dtype", "")]
        md_rows.append(ident + [_ours_cell(entries.get(k)) for k in keys])
        row: list[Any] = list(ident)
        for k in keys:
            e = entries.get(k)
            if e and e.get("accuracy") is not None:
                row += [round(100 * e["accuracy"], 2), round(100 * e["ci95"][0], 2), round(100 * e["ci95"][1], 2),
                        e.get("n_scored", sum(entries[s]["n_scored"] for s in e.get("sets", [])))]
            else:
                row += [NOT_RUN, "", "", ""]
        csv_rows.append(row)
    for ref in reference.get("table3", {}).get("rows", []):
        ident = ["paper (Table 3)", ref["model"], "paper", "", "", "as reported", "as reported", ""]
        md_rows.append(ident + [_ref_cell(ref, k) for k in keys])
        row = list(ident)
        for k in keys:
            row += [_ref_cell(ref, k, "{}"), "", "", ""]
        csv_rows.append(row)
    notes = ["Our cells: accuracy % (95% bootstrap CI, n = questions scored). The average is the unweighted mean of "
             "MedQA, MedMCQA and PubMedQA, with a CI that resamples each set.",
             _reference_note(reference, "table3")]
    profiles = sorted({r["profile"] for r in results})
    if "local" in profiles:
        notes.append("Local-profile rows: SmolLM2-135M-Instruct with CPU-sized training stand-ins and a fixed random "
                     "subset of each set (see Questions/set); they illustrate the method and are NOT the paper's results. "
                     "Local sets: MedMCQA = validation rows not used by the local training stand-in; PubMedQA = the official "
                     "500-question test split.")
    for r in results:
        bad = {k: v["n_bad"] for k, v in r.get("sets", {}).items() if v.get("n_bad")}
        trunc = {k: v["n_truncated"] for k, v in r.get("sets", {}).items() if v.get("n_truncated")}
        unparse = {k: f"{100 * v['unparseable_share']:.1f}%" for k, v in r.get("sets", {}).items() if "unparseable_share" in v}
        extra = [f"bad items {bad}" if bad else "no bad items", f"contexts cut to fit {r['settings']['max_length']} tokens: {trunc or 0}"]
        if unparse:
            extra.append(f"unparseable replies {unparse}")
        notes.append(f"{r.get('display_name', r['label'])}: " + "; ".join(extra) + ".")
    return _write(out_dir, "table3", header, md_rows, csv_header, csv_rows,
                  "Table 3 — multiple-choice accuracy", notes)


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
    for ref in reference.get("table4", {}).get("rows", []):
        ident = ["paper (Table 4)", ref["model"], "paper", "", "", "roberta-large (as reported)", "as reported", "best of several samples"]
        md_rows.append(ident + [_ref_cell(ref, k, "{:.4f}") for k, _ in TABLE4_METRICS])
        csv_rows.append(ident + [_ref_cell(ref, k, "{}") for k, _ in TABLE4_METRICS] + [""])
    notes = ["BERTScore P/R/F1 (mean over queries) of each model's answer against the physician's answer; "
             "no baseline rescaling unless the hash says `rescaled`."]
    notes += [f"{r.get('display_name', r['label'])}: bert-score hash `{r['bertscore']['hash']}`; generation {json.dumps(r['generation'])}"
              for r in results]
    notes.append(_reference_note(reference, "table4"))
    if any(r["profile"] == "local" for r in results):
        notes.append("Local-profile rows: SmolLM2-135M, the GenMedGPT-5k hold-out as queries and all-MiniLM-L6-v2 as "
                     "the BERTScore model (offline stand-in for roberta-large): not comparable with the paper's figures.")
    return _write(out_dir, "table4", header, md_rows, csv_header, csv_rows, "Table 4 — BERTScore", notes)


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


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())
