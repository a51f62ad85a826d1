"""Train a prior (discrete GPT or rectified-flow) on a tokenizer's cached tokens, with DeepSpeed.

    deepspeed [--num_gpus N] train_prior.py --config configs/prior_tiny.yaml [section.key=value ...] [--resume]
    python train_prior.py --config configs/prior_tiny.yaml [...]          (one process, no launcher)
"""

from __future__ import annotations

import argparse
import sys

from base.cli import config_parser, exits_cleanly
from base.config import load_config
from base.plan import add_plan_arguments, hardware_from_args
from evaluation.schema import ExperimentConfig
from priors.schema import PriorRunConfig


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoints/latest.json")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--deepspeed_config", metavar="JSON", default=None,
                        help="a DeepSpeed JSON merged over prior_train (wins over prior_train.deepspeed_config)")
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    hardware = hardware_from_args(args)
    # an experiment file also holds the evaluation's section (eval): that is evaluate.py's to check
    cfg = load_config(args.config, args.overrides, cls=PriorRunConfig, within=ExperimentConfig)
    if args.plan:  # sizes the run on the meta device: no DeepSpeed, no tokenizer, nothing trained or written
        from priors.plan import print_prior_plan

        return print_prior_plan(cfg, hardware, args.deepspeed_config)
    # DeepSpeed is imported only once the config is valid
    from base.training import launch
    from priors.trainer import PriorTrainer

    return launch(lambda: PriorTrainer(cfg, resume=args.resume, deepspeed_config_path=args.deepspeed_config),
                  local_rank=args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
