"""`medlib train`: two-stage QLoRA. Stage 1 (Med-Mix) on MCQ mixtures, stage 2 (Med-Nirvana) on dialogues.

    medlib train --stage 1 --profile local
    medlib train --stage 2 --profile local --from outputs/local/med-mix
    medlib train --stage 1 --profile paper --set training.max_steps=200 --resume
    medlib train --recipe chatdoctor --profile local     # any training recipe in medlib/recipes/<profile>/

Backend: `unsloth` on a CUDA GPU when it imports, else `hf` (transformers + bitsandbytes NF4 +
peft + TRL SFTTrainer). Several GPUs (hf backend, data parallel; the recipe's batch size is per device):

    accelerate launch --num_processes 4 -m medlib train --stage 1 --profile paper --set model.backend=hf

The run folder is outputs/<profile>/<run_name>/ (or --out); the mixture is outputs/<profile>/data/<mixture>/,
built first when missing. See medlib/training/run.py for what a run folder holds.
"""

from __future__ import annotations

import argparse
import os

from medlib import config
from medlib.cli_common import CLIError, add_common_args
from medlib.runs import layout, with_data_dir
from medlib.training.card import PushError, push_to_hub
from medlib.training.run import TrainError, train_run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="two-stage QLoRA training (stage 1 Med-Mix, stage 2 Med-Nirvana)",
                                   description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, choices=(1, 2), help="the profile's stage1.yaml or stage2.yaml")
    which.add_argument("--recipe", default=None, metavar="NAME",
                       help="another training recipe of the profile, e.g. chatdoctor or llama3_chatbot (single-stage)")
    add_common_args(parser)
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="stage-1 run folder for stage 2 (default: the recipe's from_run in the output root)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="upload adapter + model card to this Hub repo (token from $HF_TOKEN)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    recipe = with_data_dir(config.load_train(args.profile, args.recipe or args.stage, args.overrides), args.data_dir)
    if args.push_to_hub and not os.environ.get("HF_TOKEN"):
        raise CLIError("--push-to-hub needs a token in the HF_TOKEN environment variable (checked before training)")
    lay = layout(args.profile)
    try:
        run_dir = train_run(recipe, lay, resume=args.resume, overwrite=args.overwrite, stage1_run=args.from_dir,
                            run_dir=args.out, plan=False)
    except TrainError as exc:
        raise CLIError(str(exc)) from None
    print(run_dir)
    if args.push_to_hub:
        try:
            print(push_to_hub(run_dir, args.push_to_hub))
        except PushError as exc:
            raise CLIError(str(exc)) from None
    return 0
