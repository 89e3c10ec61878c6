"""The authors' own code, transcribed from their notebooks for comparison in tests (never imported by medlib).

Source: github.com/dasuna/med-nirvana-dual-stage-qlora, commit ed892cf:
- Fine_Tune_Llama_3_1_8B_with_Unsloth_Medical_QA_SFT.ipynb, cells 7-9 (the MedQA, MedMCQA and PubMedQA
  conversations) and the evaluation cells (input_text with "\\nAnswer:", and the "Answer: <option>" search);
- Second_stage_fine_tuning_with_noteChat.ipynb, cell 8 (convert_conversation).
The loops over datasets are unrolled into one function per example; every expression that shapes text is
theirs, character for character. Their variable names are kept.
"""

from __future__ import annotations


def medqa_conversation(example):
    question = example['sent1']

    options = [
        f"A) {example['ending0']}",
        f"B) {example['ending1']}",
        f"C) {example['ending2']}",
        f"D) {example['ending3']}"
    ]

    correct_answer = f"Answer: {options[example['label']]}"

    options_str = "\n".join(options)
    input_text = f"Question: {question}\nOptions:\n{options_str}"

    conversation = [
        {"from": "human", "value": input_text},
        {"from": "gpt", "value": correct_answer}
    ]
    return conversation


def medmcqa_conversation(example):
    question = example['question']

    options = [
        f"A) {example['opa']}",
        f"B) {example['opb']}",
        f"C) {example['opc']}",
        f"D) {example['opd']}"
    ]

    correct_answer = f"Answer: {options[example['cop']]}"

    options_str = "\n".join(options)
    input_text = f"Question: {question}\nOptions:\n{options_str}"

    conversation = [
        {"from": "human", "value": input_text},
        {"from": "gpt", "value": correct_answer}
    ]
    return conversation


def pubmedqa_conversation(example):
    context = example['context']

    context = " ".join(context['contexts'])
    question = example['question']

    options = [
        f"A) yes",
        f"B) no",
        f"C) maybe"
    ]

    answer_to_option = {
        "yes": "A) yes",
        "no": "B) no",
        "maybe": "C) maybe"
    }

    correct_answer = example['final_decision']
    correct_answer = answer_to_option.get(correct_answer, "Unknown")

    correct_answer = f"Answer: {correct_answer}"

    options_str = "\n".join(options)
    input_text = f"Context: {context}\nQuestion: {question}\nOptions:\n{options_str}"

    conversation = [
        {"from": "human", "value": input_text},
        {"from": "gpt", "value": correct_answer}
    ]
    return conversation


def convert_conversation(conversation):
    conversation_list = []

    for line in conversation.splitlines():
        line = line.strip()
        if not line or line.startswith("["):  # Skip empty lines and descriptive text in brackets
            continue

        if line.startswith("Doctor:"):
            conversation_list.append({
                "from": "gpt",
                "value": line.replace("Doctor:", "").strip()
            })
        else:
            # Assume any line not starting with "Doctor:" is from the human
            if ": " in line:
                speaker, text = line.split(": ", 1)
                conversation_list.append({
                    "from": "human",
                    "value": text.strip()
                })
            else:
                conversation_list.append({
                    "from": "human",
                    "value": line.strip()
                })

    return conversation_list


def medqa_eval_input_text(example):
    question = example['sent1']

    options = [
        f"A) {example['ending0']}",
        f"B) {example['ending1']}",
        f"C) {example['ending2']}",
        f"D) {example['ending3']}"
    ]
    options_str = "\n".join(options)
    input_text = f"Question: {question}\nOptions:\n{options_str}\nAnswer:"
    return input_text


def predicted_answer_of(predicted_text, options_list=("A", "B", "C", "D")):
    predicted_answer = ""

    # Search for the pattern "Answer: <option>"
    for option in options_list:
        if f"Answer: {option}" in predicted_text:
            predicted_answer += option
    return predicted_answer
