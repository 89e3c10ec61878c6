"""Stage-1 retention as a continuous measure: each stage-1 validation record's loss under a model.

MCQ accuracy of a 135M-parameter model moves little; the loss of the stage-1 answer after its prompt
moves with every change in what the model retains. Records are tokenised as training tokenised them
(medlib.training.tokenize), one at a time, and scored on their answer tokens only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from medlib.training.tokenize import tokenize_records


def record_losses(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int,
                  system_prompt: str | None, target_style: str, mcq_format: str) -> list[dict[str, Any]]:
    """[{"id", "loss"}] for every record that keeps an answer token within max_length; a record that
    does not is listed with loss None (and counted by the caller), never dropped silently."""
    import torch

    out = []
    with torch.inference_mode():
        for record in records:
            rows, _ = tokenize_records(tokenizer, [record], max_length, system_prompt, target_style, mcq_format)
            if not rows:
                out.append({"id": record["id"], "loss": None})
                continue
            ids = torch.tensor([rows[0]["input_ids"]], device=next(model.parameters()).device)
            labels = ids.clone()
            labels[0, ~torch.tensor(rows[0]["assistant_masks"], dtype=torch.bool)] = -100
            out.append({"id": record["id"], "loss": float(model(input_ids=ids, labels=labels).loss)})
    return out
