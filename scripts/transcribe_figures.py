"""Transcribe the paper's Figures 3-10 (eight consumer queries, the physicians' answers and the paper's
published LLaMA 3.1 Instruct and Med-Nirvana answers) into medlib/reference/figures_3_10.yaml, verbatim.

    python scripts/transcribe_figures.py [path/to/paper_med_nirvana_2024.txt]

The text between each "Consumer Query:" and its "Figure N: (Sample k)" caption is cut at the four
headings the figures use; every answer is kept character for character (paragraphs, lists and the
paper's own typos included). tests/test_eval.py re-reads the paper and compares.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAPER = ROOT.parent / "shared" / "reference" / "paper_med_nirvana_2024.txt"
OUT = ROOT / "medlib" / "reference" / "figures_3_10.yaml"

HEADINGS = {
    "query": r"Consumer Query:",
    "physician": r"Physician's Answer:",
    "llama_instruct": r"LLaMA 3\.1 8B Instruct \(4 bit quantized\) ?:",
    "med_nirvana": r"Med-Nirvana 8B \(4 bit quantized\):",
}
CAPTION = re.compile(r"^Figure (\d+): \(Sample (\d+)\) (.*)$", re.M)


def transcribe(text: str) -> list[dict]:
    samples = []
    start = 0
    for caption in CAPTION.finditer(text):
        block = text[text.rindex("Consumer Query:", start, caption.start()):caption.start()]
        parts = re.split("^(" + "|".join(HEADINGS.values()) + ")[ \t]*$", block, flags=re.M)
        fields = {}
        for heading, body in zip(parts[1::2], parts[2::2]):
            key = next(k for k, pattern in HEADINGS.items() if re.fullmatch(pattern, heading))
            fields[key] = body.strip()
        if set(fields) != set(HEADINGS):
            raise ValueError(f"Figure {caption.group(1)}: found {sorted(fields)}, expected {sorted(HEADINGS)}")
        samples.append({"figure": int(caption.group(1)), "sample": int(caption.group(2)), **fields,
                        "caption": caption.group(0).strip()})
        start = caption.end()
    return samples


if __name__ == "__main__":
    paper = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PAPER
    samples = transcribe(paper.read_text(encoding="utf-8"))
    header = ("# The paper's Figures 3-10 (Athukoralage & Atapattu 2024), transcribed verbatim by\n"
              "# scripts/transcribe_figures.py: eight real consumer queries (iCliniq / HealthCareMagic, via ChatDoctor),\n"
              "# the physician's answer, and the answers the paper published for LLaMA 3.1 8B Instruct (4-bit) and\n"
              "# Med-Nirvana 8B (4-bit), each the best of several samples (the paper's Section 4).\n")
    OUT.write_text(header + yaml.safe_dump({"source": "paper_med_nirvana_2024.txt, Figures 3-10", "samples": samples},
                                           sort_keys=False, allow_unicode=True, width=100000))
    print(f"wrote {len(samples)} samples to {OUT}")
