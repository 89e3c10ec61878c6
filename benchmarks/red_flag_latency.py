"""The red-flag detector's cost per message on this machine: latency (p50, p95, max) and resident memory.

Targets (issue 27): p95 <= 150 ms per message and <= 300 MB resident, on 2 CPU cores. The detector is loaded
alone in this process, as the chat runs it (int8 ONNX Runtime, no torch; the chat loads it beside the language
model, so this is its own share). Each held-out message is assessed on its own, as the chat does, after a few
warm-up calls.

    .venv/bin/python benchmarks/red_flag_latency.py [--limit 400] [--threads 2] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    """Current resident memory (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=400, help="held-out messages to time (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default %(default)s: the chat's 2 cores)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a red-flag model folder (default: the shipped one); time two folders one after the other to compare")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    before = rss_mb()
    from medlib.chat.red_flags import MODEL_DIR, RedFlagDetector, read_heldout, segments

    model_dir = args.model_dir or MODEL_DIR
    started = time.perf_counter()
    detector = RedFlagDetector.load(model_dir, threads=args.threads)
    load_s = time.perf_counter() - started
    texts = [r["text"] for r in read_heldout()][: args.limit]
    for text in texts[:5]:
        detector.assess(text)
    times = []
    for text in texts:
        t0 = time.perf_counter()
        detector.assess(text)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    result = {"model_dir": str(model_dir), "messages": len(texts), "threads": args.threads, "load_s": round(load_s, 2),
              "p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
              "max_ms": round(times[-1], 1), "segments_max": max(len(segments(t)) for t in texts),
              "rss_before_load_mb": round(before, 1), "rss_after_mb": round(rss_mb(), 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "torch_imported": "torch" in sys.modules, "runtime": type(detector.classifier).__name__,
              "targets": {"p95_ms": 150, "peak_rss_mb": 300}}
    result["met"] = {"p95": result["p95_ms"] <= 150, "memory": result["peak_rss_mb"] <= 300}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
