"""`medlib reproduce`: run the numbered notebooks in order with papermill, then write REPORT.md.

A failing notebook stops the run, naming the notebook, the cell and the error; the executed copies
up to that point are kept. A rerun skips finished notebooks (same parameters) unless --force; once
one notebook runs again, every later one runs too, since its inputs changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from medlib.cli_common import CLIError
from medlib.config import RecipeError, parse_value, preset_overrides
from medlib.paths import REPO_ROOT
from medlib.pipeline import layout, report

log = logging.getLogger(__name__)

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("00_data_prep", "01_stage1_med_mix", "02_stage2_med_nirvana", "03_eval_mcq", "04_eval_bertscore",
             "05_loss_curves", "06_chat")
# Beyond the paper, run on request (`make study`, `make study-handoff`, or --only): not part of the 30-minute reproduction.
STUDY_NOTEBOOKS = ("07_dmt_study", "08_handoff_study")
SMOKE_PRESET = "smoke"  # medlib/recipes/presets/smoke.yaml


class ReproduceError(RuntimeError):
    pass


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    params = {}
    for item in items:
        if "=" not in item:
            raise ReproduceError(f"parameter {item!r} must look like name=value")
        key, value = item.split("=", 1)
        params[key.strip()] = parse_value(value)
    return params


def reproduce(profile: str = "local", out_dir: str | Path | None = None, force: bool = False,
              params: dict[str, Any] | None = None, notebooks: Sequence[str] = NOTEBOOKS) -> Path:
    import papermill as pm

    lay = layout(profile, out_dir)
    lay.notebooks.mkdir(parents=True, exist_ok=True)
    timings_file = lay.notebooks / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    wanted = {"profile": profile, "out_dir": str(lay.root), **(params or {})}
    known = NOTEBOOKS + STUDY_NOTEBOOKS
    unknown_names = [name for name in notebooks if name not in known]
    if unknown_names:
        raise ReproduceError(f"no notebook named {', '.join(unknown_names)} (known: {', '.join(known)})")
    # Names are checked against every notebook, so one parameter set serves a run of any subset.
    declared_by = {name: set(pm.inspect_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"))) for name in known}
    unknown = set(params or {}) - set().union(*declared_by.values())
    if unknown:
        raise ReproduceError(f"no notebook has a parameter named {', '.join(sorted(unknown))}")
    rerun = force
    for name in notebooks:
        source = NOTEBOOK_DIR / f"{name}.ipynb"
        declared = declared_by[name]
        given = {k: v for k, v in wanted.items() if k in declared}
        target = lay.notebooks / f"{name}.ipynb"
        marker = lay.notebooks / ".done" / f"{name}.json"
        if not rerun and marker.exists() and target.exists() and json.loads(marker.read_text()) == given:
            print(f"[reproduce] {name}: done earlier with the same parameters, skipped (--force reruns it)", flush=True)
            continue
        rerun = True
        marker.unlink(missing_ok=True)
        print(f"[reproduce] {name}: running {json.dumps(given)}", flush=True)
        started = time.time()
        try:
            pm.execute_notebook(str(source), str(target), parameters=given, kernel_name="python3",
                                cwd=str(REPO_ROOT), progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as exc:
            raise ReproduceError(f"notebook {name} failed at cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                                 f"(executed copy kept at {target})") from None
        seconds = time.time() - started
        timings[name] = {"seconds": round(seconds, 1), "output": str(target), "parameters": given}
        timings_file.write_text(json.dumps(timings, indent=1))
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps(given))
        print(f"[reproduce] {name}: {seconds:.0f} s", flush=True)
    path = report(profile, lay.root, (params or {}).get("preset"))
    print(f"[reproduce] report: {path}", flush=True)
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reproduce", help="run every notebook with papermill and write REPORT.md")
    parser.add_argument("--profile", choices=["local", "paper"], default="local")
    parser.add_argument("--out", default=None, help="output root (default outputs/<profile>)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks that finished earlier")
    parser.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="notebook parameter, e.g. -p 'overrides=[training.max_steps=10, mcq.limit=20]' (repeatable)")
    parser.add_argument("--only", default=None, help="comma-separated notebook names (default: all, in order)")
    parser.add_argument("--smoke", action="store_true",
                        help="the paper profile's whole path on CPU in minutes: preset smoke (a tiny random Llama, the "
                             "Hub-shaped fixtures; only sizes and what a CPU forces change), output outputs/paper-smoke")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    notebooks = tuple(args.only.split(",")) if args.only else NOTEBOOKS
    try:
        params = _parse_params(args.params)
        out = args.out
        if args.smoke:
            if "preset" in params:
                raise ReproduceError("--smoke is the smoke preset: give no -p preset with it")
            preset_overrides(SMOKE_PRESET, args.profile, "stage1")  # a preset for another profile: a clear error
            params["preset"] = SMOKE_PRESET
            out = out or str(layout(args.profile).root.with_name(f"{args.profile}-smoke"))
        reproduce(args.profile, out, args.force, params, notebooks)
    except (ReproduceError, RecipeError) as exc:
        raise CLIError(str(exc)) from None
    return 0
