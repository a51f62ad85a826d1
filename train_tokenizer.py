"""Train a tokenizer (grid KL/VQ autoencoder or FlexTok-style 1D tokenizer) from a YAML config.

    python train_tokenizer.py --config configs/grid_kl.yaml [train.steps=500 ...] [--resume]
    torchrun --nproc_per_node N train_tokenizer.py --config ...      (N ranks, DDP)
    deepspeed --num_gpus N train_tokenizer.py --config ...           (the same, through DeepSpeed's launcher)
"""

from __future__ import annotations

import argparse
import sys

from base.cli import config_parser, exits_cleanly
from base.config import load_config
from base.plan import add_plan_arguments, hardware_from_args
from evaluation.schema import ExperimentConfig
from flextok.plan import print_tokenizer_plan
from flextok.schema import TokenizerRunConfig


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoints/latest.json")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by `deepspeed`
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    hardware = hardware_from_args(args)
    # an experiment file also holds later stages' sections (prior, eval): those are theirs to check
    cfg = load_config(args.config, args.overrides, cls=TokenizerRunConfig, within=ExperimentConfig)
    if args.plan:  # sizes the run on the meta device: no process group, nothing trained or written
        return print_tokenizer_plan(cfg, hardware)
    from base.training import launch
    from flextok.training import TokenizerTrainer

    return launch(lambda: TokenizerTrainer(cfg, resume=args.resume), local_rank=args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
