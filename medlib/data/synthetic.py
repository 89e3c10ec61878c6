"""Generated rows in the real published schemas, for paper-scale tests and benchmarks.

They let the mixture builders run at the exact sizes of the paper's Tables 1 and 2 without the
Hub-only training sets. The text is meaningless filler; never train or evaluate on it.
"""

from __future__ import annotations

import json
from pathlib import Path

PAPER_SIZES = {"medqa": 10178, "medmcqa": 182822, "pubmedqa_artificial": 211269}
NOTECHAT_ROWS = 207001


def _question(source: str, i: int) -> str:
    return f"Generated {source} question {i}: which option fits finding {i * 7919 % 100003}?"


def write_paper_scale_folder(folder: str | Path, sizes: dict[str, int] | None = None,
                             notechat_rows: int = NOTECHAT_ROWS, chat_eval_rows: int = 60) -> Path:
    """Write medqa/train.jsonl, medmcqa/train.jsonl (Hub layout), pubmedqa/ori_pqaa.json,
    notechat/notechat.jsonl, chatdoctor/iCliniq.json and chatdoctor/HealthCareMagic-100k.json (the paper's two
    Table 4 query sets) under `folder`."""
    sizes = {**PAPER_SIZES, **(sizes or {})}
    folder = Path(folder)
    for sub in ("medqa", "medmcqa", "pubmedqa", "notechat", "chatdoctor"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    dumps = json.dumps
    with open(folder / "medqa" / "train.jsonl", "w") as f:
        for i in range(sizes["medqa"]):
            options = {k: f"medqa option {k}{i}" for k in "ABCD"}
            f.write(dumps({"question": _question("medqa", i), "answer": options["ABCD"[i % 4]], "options": options,
                           "meta_info": "step1", "answer_idx": "ABCD"[i % 4], "metamap_phrases": []}) + "\n")
    with open(folder / "medmcqa" / "train.jsonl", "w") as f:
        for i in range(sizes["medmcqa"]):
            f.write(dumps({"id": f"gen-medmcqa-{i}", "question": _question("medmcqa", i), "opa": f"a{i}", "opb": f"b{i}",
                           "opc": f"c{i}", "opd": f"d{i}", "cop": i % 4, "choice_type": "single", "exp": "",
                           "subject_name": "Medicine", "topic_name": ""}) + "\n")
    with open(folder / "pubmedqa" / "ori_pqaa.json", "w") as f:
        f.write("{")
        for i in range(sizes["pubmedqa_artificial"]):
            row = {"QUESTION": _question("pubmedqa", i), "CONTEXTS": [f"Generated abstract sentence {i}."],
                   "LABELS": ["BACKGROUND"], "MESHES": [], "YEAR": "2000",
                   "final_decision": ("yes", "no")[i % 2], "LONG_ANSWER": "Generated."}
            f.write(("," if i else "") + dumps(str(30000000 + i)) + ":" + dumps(row))
        f.write("}")
    with open(folder / "notechat" / "notechat.jsonl", "w") as f:
        for i in range(notechat_rows):
            conversation = (f"Doctor: Hello, what brings you in, visit {i}?\nPatient: I have generated symptom {i}.\n"
                            f"Doctor: Generated advice number {i}.")
            f.write(dumps({"data": f"Generated clinical note {i}.", "conversation": conversation}) + "\n")
    with open(folder / "chatdoctor" / "iCliniq.json", "w") as f:
        json.dump([{"input": f"Generated consumer question {i}?", "answer_icliniq": f"Generated physician answer {i}."}
                   for i in range(chat_eval_rows)], f)
    with open(folder / "chatdoctor" / "HealthCareMagic-100k.json", "w") as f:
        json.dump([{"instruction": "If you are a doctor, please answer the medical questions based on the patient's "
                                   "description.", "input": f"Generated patient message {i}.",
                    "output": f"Generated doctor answer {i}."} for i in range(chat_eval_rows)], f)
    return folder
