"""Train a tokenizer (grid KL/VQ autoencoder or FlexTok-style 1D tokenizer) from a YAML config.

    python train_tokenizer.py --config configs/grid_kl.yaml [train.steps=500 ...] [--resume]
    torchrun --nproc_per_node N train_tokenizer.py --config ...      (N ranks, DDP)
    deepspeed --num_gpus N train_tokenizer.py --config ...           (the same, through DeepSpeed's launcher)
"""

from __future__ import annotations

import argparse
import sys

from base.cli import config_parser, exits_cleanly, load_from_args
from base.plan import add_plan_arguments, hardware_from_args
from evaluation.schema import ExperimentConfig
from flextok.plan import print_tokenizer_plan


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoints/latest.pt")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by `deepspeed`
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    hardware = hardware_from_args(args)
    cfg = load_from_args(args, ExperimentConfig)
    if args.plan:  # sizes the run on the meta device: no process group, nothing trained or written
        return print_tokenizer_plan(cfg, hardware)
    from base import distributed
    from flextok.training import TokenizerTrainer

    distributed.ensure_launch_env(args.local_rank)
    final = TokenizerTrainer(cfg, resume=args.resume).train()
    distributed.shutdown()
    if final is not None:
        print(f"saved {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
