"""Training: one package. `run.train` is the run, read top to bottom; beside it: arguments (SFTConfig from
the typed recipe), backends (unsloth | hf), tokenize (assistant-only labels), handoff (how stage 2 starts
from stage 1, and what that keeps of it), adapters (a stacked stage 1 + stage 2 shipped as one adapter),
metadata (what a run folder records), checkpoints (resume), card (model card, push to the Hub), cli
(`medlib train`), handoff_cli (`medlib handoff measure`)."""

from medlib.training.run import TrainError, plan_run, train, train_or_resume

__all__ = ["TrainError", "plan_run", "train", "train_or_resume"]
