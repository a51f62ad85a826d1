"""Learning-rate sweep of a study's grid tokenizers: train each named tokenizer stage of a study file (its own
overrides, as `study.py` trains it) at every learning rate for the same number of steps, then score the
deterministic reconstruction of the first held-out images: mean PSNR with a 95% bootstrap interval, beside
the training steps' seconds and img/s (the model's training.json). The study's grids train at lr 4e-3, the
highest rate their first trials reached (1e-3, 2e-3, 4e-3: `benchmarks/RESULTS.md`); the default rates go two
doublings past it.

    python benchmarks/ablate_grid.py --study configs/study_fmnist.yaml --stage fsq_f8_1000 \
        --stage kl_f4 --steps 1000   # lr 1e-3 .. 1.6e-2, 1,000 steps each, scored on 500 test images

Each run trains in its own `train_tokenizer.py` process into OUT/STAGE_lrLR, logging to OUT/STAGE_lrLR.log
(`ablate_flextok.train`); a run whose folder has `final` is not retrained. Nothing else should run meanwhile,
or the times say nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from ablate_flextok import train
from machine import matmul_gflops

from base.config import load_config
from base.data import load_images
from base.errors import UserError
from base.metrics import psnr
from base.training import TRAINING_RECORD
from evaluation.bootstrap import bootstrap_interval
from evaluation.schema import ExperimentConfig
from flextok.schema import TokenizerRunConfig
from grid import GridAutoencoder
from study import load_study

LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)


def stage_overrides(study_path: Path, name: str) -> tuple[Path, list[str]]:
    """The study's experiment file and the overrides of its tokenizer stage `name` (a grid: it may not refer
    to another stage's model)."""
    study, experiment = load_study(study_path)
    stage = next((s for s in study.stages if s.name == name), None)
    if stage is None or stage.kind != "tokenizer":
        tokenizers = [s.name for s in study.stages if s.kind == "tokenizer"]
        raise UserError(f"--stage {name}: {study_path} has no tokenizer stage of that name (it has {tokenizers})")
    if any("{" in item for item in stage.overrides) or "tokenizer=grid" not in stage.overrides:
        raise UserError(f"--stage {name}: not a grid tokenizer stage (overrides {stage.overrides})")
    return experiment, list(stage.overrides)


@torch.no_grad()
def psnr_per_image(model: GridAutoencoder, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Held-out PSNR of each image's deterministic round trip (what the study's report measures)."""
    values = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        (reconstruction,) = model.eval_reconstructions(x).values()
        values.append(psnr(reconstruction, x))
    return torch.cat(values).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="study YAML whose tokenizer stages to sweep")
    parser.add_argument("--stage", action="append", required=True, help="a grid tokenizer stage of the study")
    parser.add_argument("--lr", type=float, action="append", help=f"learning rates (default {LEARNING_RATES})")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=500, help="held-out images (the config's eval_split)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate_grid"))
    args = parser.parse_args()
    out = args.out.resolve()  # the trainer runs in the repository root, this script anywhere
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul 2048^3 fp32: "
          f"{matmul_gflops():.1f} GFLOP/s")
    rows = []
    for stage in args.stage:
        experiment, overrides = stage_overrides(args.study, stage)
        cfg = load_config(experiment, overrides, cls=TokenizerRunConfig, within=ExperimentConfig)
        images = load_images(cfg.data, cfg.data.eval_split, limit=args.images).images
        for lr in args.lr or LEARNING_RATES:
            name = f"{stage}_lr{lr:g}"
            seconds = train(str(experiment), out, name, args.steps, [*overrides, f"train.lr={lr}"])
            model = GridAutoencoder.from_pretrained(out / name / "final").eval()
            values = psnr_per_image(model, images).numpy()
            low, high = bootstrap_interval(values)
            record = json.loads((out / name / "final" / TRAINING_RECORD).read_text())
            trained = (f"trained now, {seconds:.0f} s wall" if seconds else "trained earlier (reused)")
            trained += (f"; training steps {record['step_seconds']:.0f} s, {record['images_per_s']:.0f} img/s at "
                        f"matmul {record['matmul_gflops']:.0f}")
            print(f"{stage} at lr {lr:g} ({args.steps} steps): {trained}; PSNR {values.mean():.2f} dB "
                  f"[{low:.2f}, {high:.2f}] on {len(images)} held-out images", flush=True)
            rows.append({"stage": stage, "lr": lr, "steps": args.steps, "seconds": seconds,
                         "step_seconds": record["step_seconds"], "images_per_s": record["images_per_s"],
                         "psnr": float(values.mean()), "psnr_ci": [low, high], "images": len(images)})
    print(f"matmul after: {matmul_gflops():.1f} GFLOP/s")
    print(json.dumps(rows))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
