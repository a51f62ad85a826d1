"""Tokenizer training throughput through the real trainer: `TokenizerTrainer.train_step` on batches from
`train_loader`, for any tokenizer config. Prints training images/s (optimizer steps only), the data
loader's images/s, and the achieved FLOP/s (the plan's training FLOPs per image, `flextok.plan`) as a
share of the fp32 matmul GFLOP/s measured in this process.

    python benchmarks/bench_tokenizer_training.py --config configs/1d_tiny.yaml [--steps 40] [overrides ...]
    python benchmarks/bench_tokenizer_training.py --config configs/fmnist.yaml tokenizer=flextok   # a study's 1D

Under `torchrun --nproc_per_node N` every rank trains its share of each global batch through DDP, and
rank 0 prints the step time; `--ddp-find-unused` restores the wrapper used before issue #24 (DDP with
`find_unused_parameters=True` for the whole run whenever a PatchGAN exists), for before/after timings:

    torchrun --nproc_per_node 2 benchmarks/bench_tokenizer_training.py --config configs/grid_vq.yaml \
        loss.adversarial=0.1 loss.adversarial_start=1000 [--ddp-find-unused]

A 1D tokenizer that reads latents gets a randomly initialized autoencoder built from the config's
`grid` section (the speed does not depend on its weights), so no earlier stage has to exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import matmul_gflops, peak_rss_mib  # noqa: E402

from base.config import load_config
from base.data import train_loader
from base.training import grouped  # noqa: E402
from evaluation.schema import ExperimentConfig  # noqa: E402
from flextok.plan import planned_tokenizer, tokenizer_workloads  # noqa: E402
from flextok.schema import TokenizerRunConfig  # noqa: E402
from flextok.training import TokenizerTrainer  # noqa: E402
from grid.autoencoder import GridAutoencoder


def frozen_autoencoder(cfg: TokenizerRunConfig, folder: Path) -> list[str]:
    """Overrides pointing a latent-input 1D tokenizer at a fresh autoencoder of the config's grid section."""
    if cfg.tokenizer != "flextok" or cfg.flextok.input != "latents":
        return []
    grid = dataclasses.replace(cfg.grid, bottleneck="kl")
    GridAutoencoder(grid, resolution=cfg.data.resolution).save_pretrained(folder / "autoencoder")
    return [f"flextok.autoencoder={folder / 'autoencoder'}"]


def find_unused_everywhere(trainer: TokenizerTrainer) -> None:
    """The DDP wrapper before issue #24: `find_unused_parameters=True` for the whole run when the
    objective has a PatchGAN (idle before `loss.adversarial_start`), built once."""
    if trainer.world_size == 1:
        return
    from torch.nn.parallel import DistributedDataParallel

    unused = getattr(trainer.objective, "discriminator", None) is not None
    wrapper = DistributedDataParallel(trainer.objective, find_unused_parameters=unused)
    trainer.backend.replicate = lambda step: wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/1d_tiny.yaml")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after 5 untimed ones)")
    parser.add_argument("--ddp-find-unused", action="store_true",
                        help="multi-rank: the pre-#24 DDP wrapper (find_unused_parameters for the whole run)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    before = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = load_config(args.config, args.overrides, cls=ExperimentConfig)
        overrides = [*args.overrides, *frozen_autoencoder(base, folder), f"out_dir={folder}", "name=bench",
                     f"train.steps={args.steps + 5}", "train.eval_every=100000", "train.checkpoint_every=100000"]
        cfg = load_config(args.config, overrides, cls=ExperimentConfig)
        trainer = TokenizerTrainer(cfg)
        if args.ddp_find_unused:
            find_unused_everywhere(trainer)
        t = cfg.train
        loader = iter(grouped(train_loader(cfg.data, t.batch_size, cfg.seed, 0, args.steps + 5, trainer.rank,
                                           trainer.world_size, t.grad_accumulation), t.grad_accumulation))
        compute = loading = 0.0
        for step in range(args.steps + 5):
            started = time.perf_counter()
            images = [batch.images for batch in next(loader)]
            loaded = time.perf_counter()
            logs = trainer.train_step(images)
            trainer.step += 1
            if step >= 5:
                loading += loaded - started
                compute += time.perf_counter() - loaded
    after = matmul_gflops()
    if trainer.rank != 0:
        return 0
    images = args.steps * cfg.train.batch_size  # global: every rank's share
    flops = sum(w.train_flops for w in tokenizer_workloads(cfg, planned_tokenizer(cfg)))
    achieved = images / compute * flops / 1e9
    wrapper = " (pre-#24 DDP: find_unused_parameters)" if args.ddp_find_unused else ""
    print(f"{args.config} {' '.join(args.overrides)}: batch {cfg.train.batch_size}, threads {torch.get_num_threads()}, "
          f"{trainer.world_size} rank(s){wrapper}; step time {compute / args.steps * 1000:.1f} ms (rank 0)")
    print(f"  train {images / compute:.1f} img/s ({achieved:.1f} GFLOP/s by the plan's {flops / 1e9:.3f} GFLOP "
          f"per image = {achieved / before:.1%} of matmul) | data loader {images / loading:.0f} img/s | "
          f"last loss {logs['loss']:.4f} | peak RSS {peak_rss_mib():.0f} MiB | "
          f"matmul {before:.1f} GFLOP/s before, {after:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
