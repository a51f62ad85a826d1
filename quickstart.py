"""The whole pipeline on the embedded photographs, CPU-sized, one command:

    python quickstart.py [--force] [--scale 1.0]

Stages (each reuses its finished artifact on a re-run; --force retrains everything):
grid KL autoencoder -> 1D tokenizer on its latents -> grid FSQ baseline -> BPE codecs on both code streams
-> priors with the DeepSpeed launcher (2 CPU ranks) over the 1D tokens and over the grid codes -> evaluate.py.
Sized as a first run (about 6 minutes at matmul ~170 GFLOP/s: benchmarks/RESULTS.md), a demonstration of every
family, not a result: the studies (study.py) are where the numbers come from. Everything lands in
runs/quickstart/<stage>/, the report in runs/quickstart/report/. `--scale` multiplies every stage's step count
(0.03 runs a reduced chain).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from pipeline import (
    ROOT,
    Stage,
    bpe_stage,
    evaluate_stage,
    load_stage_config,
    prior_stage,
    run_stages,
    tokenizer_stage,
)

OUT = Path("runs/quickstart")
CONFIGS = ROOT / "configs"


def stages() -> list[Stage]:
    from evaluation.schema import ExperimentConfig
    from flextok.schema import TokenizerRunConfig
    from priors.schema import PriorRunConfig

    tokenizer = lambda config: load_stage_config(CONFIGS / config, cls=TokenizerRunConfig)  # noqa: E731
    bpe_data = load_stage_config(CONFIGS / "grid_kl.yaml", cls=PriorRunConfig)  # the tokenizers' images
    tiny = load_stage_config(CONFIGS / "prior_tiny.yaml", cls=PriorRunConfig)

    def prior(name: str, tokenizer_name: str, **settings) -> Stage:
        """A prior_tiny prior on the tokens of the stage `tokenizer_name`; `settings` replace `prior` fields."""
        settings = {"tokenizer": str(OUT / tokenizer_name / "final"), **settings}
        return prior_stage(replace(tiny, prior=replace(tiny.prior, **settings)), OUT, name, 150)

    return [
        tokenizer_stage(tokenizer("grid_kl.yaml"), OUT, "grid_kl", 300),
        tokenizer_stage(tokenizer("1d_tiny.yaml"), OUT, "1d_tiny", 400),
        tokenizer_stage(tokenizer("grid_vq.yaml"), OUT, "grid_vq", 200),
        bpe_stage(bpe_data, OUT, "bpe_1d", "1d_tiny", "1d", 1400),
        bpe_stage(bpe_data, OUT, "bpe_grid", "grid_vq", "2d", 1400),
        prior("prior_1d", "1d_tiny"),
        prior("prior_grid_vq", "grid_vq"),
        evaluate_stage(load_stage_config(CONFIGS / "eval_tiny.yaml", cls=ExperimentConfig), OUT),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain every stage")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's training steps")
    args = parser.parse_args()
    os.chdir(ROOT)
    run_stages(stages(), OUT, args.scale, args.force)
    report = OUT / "report"
    print(f"[quickstart] summary: {report / 'summary.md'}")
    for png in sorted(report.glob("*.png")):
        print(f"[quickstart] plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
