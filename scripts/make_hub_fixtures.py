"""Write medlib/samples/hub/: small datasets laid out like the Hugging Face Hub datasets the paper profile
reads, with their columns, configs and splits, so `datasets.load_dataset(<folder>/<owner>/<name>, config,
split=...)` reads them on the same code path as the Hub (recipes: data.hub_mirror).

Every row is built from the [SAMPLE] files beside them (medlib/samples/, written for medlib, not real
data), plus the quirks real Hub data has:
- MedQA train holds a row that repeats a MedQA test question word for word;
- MedMCQA's test split is unlabelled (cop = -1), and a train row repeats a validation question;
- NoteChat dialogues with bracketed stage directions, a "Patient’s Family:" speaker (curly apostrophe),
  a "Nurse:" speaker and a line with no speaker.

Run from the repository root: python scripts/make_hub_fixtures.py (the output is committed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "medlib" / "samples"
OUT = SAMPLES / "hub"
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_dataset(repo: str, configs: dict[str, dict[str, list[dict]]], about: str) -> None:
    """configs: config name -> split -> rows; written as <config>/<split>.jsonl (data/ for "default")."""
    folder = OUT / repo
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        sub = "data" if config == "default" else config
        lines.append(f"- config_name: {config}")
        lines.append("  data_files:")
        for split, rows in splits.items():
            path = folder / sub / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            lines += [f"  - split: {split}", f"    path: {sub}/{split}.jsonl"]
    lines += ["---", "", f"# {repo} (medlib fixture)", "", about,
              "Rows are medlib's [SAMPLE] texts, not the real dataset; columns, configs and splits follow the Hub's.", ""]
    (folder / "README.md").write_text("\n".join(lines))


def medqa() -> None:
    train = read_jsonl(SAMPLES / "medqa" / "train.jsonl")
    test = read_jsonl(SAMPLES / "medqa" / "test.jsonl")
    train = train + [dict(test[0])]  # quirk: a training row that repeats a test question
    validation = train[:2]

    def hf(rows: list[dict], split: str) -> list[dict]:
        out = []
        for i, r in enumerate(rows):
            letters = list(r["options"])
            out.append({"id": f"{split}-{i:05d}", "sent1": r["question"], "sent2": "",
                        **{f"ending{j}": r["options"][letter] for j, letter in enumerate(letters)},
                        "label": letters.index(r["answer_idx"])})
        return out

    write_dataset("GBaker/MedQA-USMLE-4-options-hf",
                  {"default": {"train": hf(train, "train"), "validation": hf(validation, "validation"),
                               "test": hf(test, "test")}},
                  "Columns id, sent1, sent2, ending0-3, label (0-3); splits train, validation, test.")
    write_dataset("GBaker/MedQA-USMLE-4-options", {"default": {"train": train, "test": test}},
                  "Columns question, answer, options (A-D), meta_info, answer_idx, metamap_phrases; splits train, test.")


def medmcqa() -> None:
    train = read_jsonl(SAMPLES / "medmcqa" / "train.jsonl")
    mirage = json.loads((SAMPLES / "medmcqa" / "validation.json").read_text())
    validation = []
    for i, (key, r) in enumerate(mirage.items()):
        validation.append({"id": key, "question": r["question"],
                           **{f"op{letter.lower()}": r["options"][letter] for letter in "ABCD"},
                           "cop": "ABCD".index(r["answer"]), "choice_type": "single", "exp": "",
                           "subject_name": "Medicine", "topic_name": ""})
    train = train + [dict(validation[1], id="sample-medmcqa-train-repeat")]  # quirk: repeats a validation question
    test = [dict(v, id=f"sample-medmcqa-test-{i}", cop=-1, exp=None) for i, v in enumerate(validation[:3])]
    write_dataset("openlifescienceai/medmcqa", {"default": {"train": train, "validation": validation, "test": test}},
                  "Columns id, question, opa-opd, cop (0-3; -1 in the unlabelled test split), choice_type, exp, "
                  "subject_name, topic_name.")


def pubmedqa() -> None:
    def hub(rows: dict, labelled: bool) -> list[dict]:
        out = []
        for pmid, r in rows.items():
            context = {"contexts": r["CONTEXTS"], "labels": r["LABELS"], "meshes": r["MESHES"]}
            if labelled:
                context.update(reasoning_required_pred=[r["reasoning_required_pred"]],
                               reasoning_free_pred=[r["reasoning_free_pred"]])
            out.append({"pubid": int(pmid), "question": r["QUESTION"], "context": context,
                        "long_answer": r["LONG_ANSWER"], "final_decision": r["final_decision"]})
        return out

    write_dataset("qiaojin/PubMedQA", {
        "pqa_artificial": {"train": hub(json.loads((SAMPLES / "pubmedqa" / "ori_pqaa.json").read_text()), False)},
        "pqa_labeled": {"train": hub(json.loads((SAMPLES / "pubmedqa" / "ori_pqal.json").read_text()), True)},
    }, "Configs pqa_artificial and pqa_labeled, split train each; columns pubid, question, context "
       "{contexts, labels, meshes, ...}, long_answer, final_decision.")


def notechat() -> None:
    rows = read_jsonl(SAMPLES / "notechat" / "notechat.jsonl")
    quirks = [
        {"data": "[SAMPLE] Clinical note: elderly man with a productive cough, brought in by his daughter.",
         "conversation": "[The patient enters with his daughter.]\nDoctor: Good morning, what brings you here?\n"
                         "Patient: [SAMPLE] I have had a cough with phlegm for ten days.\n"
                         "Patient’s Family: He has also been more tired than usual.\n\n"
                         "Doctor: Thank you. Has he had a fever?\nPatient’s Family: Yes, last night.\n"
                         "Doctor: We will listen to his chest and take an X-ray to look for pneumonia."},
        {"data": "[SAMPLE] Clinical note: woman with a sprained ankle, seen with a nurse present.",
         "conversation": "Doctor: Hello, how did you hurt your ankle?\nPatient: [SAMPLE] I twisted it on the stairs.\n"
                         "Nurse: Her ankle is swollen on the outside.\nmm, it hurts when I walk\n"
                         "[Doctor examines the ankle]\nDoctor: It looks like a sprain; rest, ice and elevation will help."},
    ]
    write_dataset("akemiH/NoteChat", {"default": {"train": rows + quirks}},
                  "Columns data (the clinical note) and conversation (the dialogue text); split train.")


def chatdoctor() -> None:
    # 50 rows, so the paper's 25-conversation hold-out fits: the HealthCareMagic samples, then GenMedGPT's (same layout)
    hcm = json.loads((SAMPLES / "chatdoctor" / "HealthCareMagic-100k.json").read_text())
    hcm += json.loads((SAMPLES / "chatdoctor" / "genmedgpt_5k.json").read_text())[:50 - len(hcm)]
    icliniq = json.loads((SAMPLES / "chatdoctor" / "iCliniq.json").read_text())
    write_dataset("lavita/ChatDoctor-HealthCareMagic-100k", {"default": {"train": hcm}},
                  "Columns instruction, input, output; split train.")
    write_dataset("lavita/ChatDoctor-iCliniq", {"default": {"train": icliniq}},
                  "Columns input, answer_icliniq, answer_chatgpt, answer_chatdoctor; split train.")


def mmlu() -> None:
    rows = list(json.loads((SAMPLES / "mmlu_med" / "mmlu_med.json").read_text()).values())
    configs = {}
    for i, subject in enumerate(MMLU_SUBJECTS):
        r = rows[i % len(rows)]
        configs[subject] = {"test": [{"question": r["question"], "subject": subject, "choices": list(r["options"].values()),
                                      "answer": "ABCD".index(r["answer"])}]}
    write_dataset("cais/mmlu", configs, "One config per subject (the six medical ones here), split test; columns "
                  "question, subject, choices, answer (0-3).")


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    for build in (medqa, medmcqa, pubmedqa, notechat, chatdoctor, mmlu):
        build()
    print(f"wrote {OUT}")
