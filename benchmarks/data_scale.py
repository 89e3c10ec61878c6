"""Build both mixtures at paper scale from generated rows; print wall time and peak RSS.

Stage 1: 404,269 rows (Table 1). Stage 2: a NoteChat-sized 207,001-row dialogue source giving
100,000 + 10,000 rows, plus 33,333 + 3,333 replayed stage-1 rows (Table 2).
Target: under 60 s and 2 GiB on 2 cores.   Run: python benchmarks/data_scale.py
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

from medlib.config import load_eval, load_train
from medlib.data.mixtures import build_mixture
from medlib.data.synthetic import NOTECHAT_ROWS, write_paper_scale_folder


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        write_paper_scale_folder(folder / "data", notechat_rows=NOTECHAT_ROWS)
        generated = time.perf_counter()
        data = [f"data.data_dir={folder}/data"]
        s1 = build_mixture(load_train("paper", 1, data), folder / "s1", load_eval("paper"))
        built1 = time.perf_counter()
        s2 = build_mixture(load_train("paper", 2, data), folder / "s2", load_eval("paper"), stage1_mixture=s1)
        built2 = time.perf_counter()
        sizes = [json.loads((d / "manifest.json").read_text())["sizes"] for d in (s1, s2)]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    build_s = built2 - generated
    print(f"generate rows (not counted): {generated - started:6.1f} s")
    print(f"stage 1 mixture {sizes[0]}: {built1 - generated:6.1f} s")
    print(f"stage 2 mixture {sizes[1]}: {built2 - built1:6.1f} s")
    print(f"both mixtures: {build_s:.1f} s (target < 60 s, ratio {build_s / 60:.2f} of budget); "
          f"peak RSS {peak_mib:.0f} MiB (target < 2048 MiB, ratio {peak_mib / 2048:.2f} of budget)")


if __name__ == "__main__":
    main()
