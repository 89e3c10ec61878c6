"""Trainer checkpoints in <run>/checkpoints/checkpoint-N: which one a resume continues from."""

from __future__ import annotations

from pathlib import Path


def find_last_checkpoint(ckpt_dir: str | Path) -> str | None:
    """The highest checkpoint-N folder that finished saving (has trainer_state.json), or None."""
    if not Path(ckpt_dir).is_dir():
        return None
    done = [p for p in Path(ckpt_dir).glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(done, key=step_of)) if done else None


def step_of(checkpoint: str | Path | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
