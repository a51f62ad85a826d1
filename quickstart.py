"""The whole pipeline on the embedded photographs, CPU-sized, one command:

    python quickstart.py [--force] [--scale 1.0]

Stages (each reuses its finished artifact on a re-run; --force retrains everything):
grid KL autoencoder -> 1D tokenizer on its latents -> grid FSQ baseline -> BPE codecs on both code streams
-> priors with the DeepSpeed launcher (2 CPU ranks): 1D tokens, BPE'd 1D tokens, grid codes, and a flow
prior on KL latents -> evaluate.py. Everything lands in runs/quickstart/<stage>/, the report in
runs/quickstart/report/. `--scale` multiplies every stage's step count (0.03 runs a reduced chain).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import (
    ROOT,
    Stage,
    bpe_stage,
    evaluate_stage,
    prior_stage,
    run_stages,
    tokenizer_stage,
)

OUT = Path("runs/quickstart")


def stages() -> list[Stage]:
    from base.config import load_config
    from evaluation.schema import ExperimentConfig

    tok = lambda name: f"prior.tokenizer={OUT / name / 'final'}"  # noqa: E731
    prior = lambda name, *overrides: prior_stage(OUT, name, "configs/prior_tiny.yaml", 200, *overrides)  # noqa: E731
    ev = load_config("configs/eval_tiny.yaml", cls=ExperimentConfig).eval
    return [
        tokenizer_stage(OUT, "grid_kl", "configs/grid_kl.yaml", 400),
        tokenizer_stage(OUT, "1d_tiny", "configs/1d_tiny.yaml", 1250),
        tokenizer_stage(OUT, "grid_vq", "configs/grid_vq.yaml", 400),
        bpe_stage(OUT, "bpe_1d", "1d_tiny", "configs/grid_kl.yaml", "1d", 1400),
        bpe_stage(OUT, "bpe_grid", "grid_vq", "configs/grid_kl.yaml", "2d", 1400),
        prior("prior_1d", tok("1d_tiny")),
        prior("prior_1d_bpe", tok("1d_tiny"), "prior.tokens=bpe", f"prior.bpe={OUT / 'bpe_1d'}"),
        prior("prior_grid_vq", tok("grid_vq")),
        prior("prior_kl", tok("grid_kl"), "prior.kind=flow"),
        evaluate_stage("configs/eval_tiny.yaml", ev.classifier_steps, ev.gfid_samples),
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
