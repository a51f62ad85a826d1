"""Cost of tail supervision: seconds per training step (forward + backward + AdamW step) of a 1D tokenizer
config's model for several `flextok.prefixes_per_example`, with the plan's FLOPs per step and the fp32 matmul
GFLOP/s measured in this process (before and after the timings: the machines are noisy).

    python benchmarks/bench_tail_supervision.py [--config configs/1d_tiny.yaml] [--batch 32] [--steps 20] \
        [--prefixes 1 2 4] [overrides ...]

The model is the config's, on random images (the speed does not depend on them), with a randomly initialized
frozen autoencoder built from the config's `grid` section (input: latents), so no earlier stage has to exist.
fp32, no autocast, one process: the objective alone, without the trainer's data loading, EMA or logging.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import matmul_gflops, peak_rss_mib  # noqa: E402

from base.config import load_config  # noqa: E402
from base.plan import step_flops  # noqa: E402
from flextok.model import FlexTok, FlexTokObjective  # noqa: E402
from flextok.plan import planned_tokenizer, tokenizer_workloads  # noqa: E402
from flextok.schema import TokenizerRunConfig  # noqa: E402


def build(cfg: TokenizerRunConfig, device: torch.device) -> FlexTokObjective:
    """The config's 1D tokenizer, its frozen autoencoder (input: latents) random from the grid section, and
    the objective's optional terms as configured (`pixel_loss`, `prior_loss`)."""
    ae = dataclasses.asdict(dataclasses.replace(cfg.grid, bottleneck="kl")) if cfg.flextok.input == "latents" else None
    torch.manual_seed(cfg.seed)
    model = FlexTok(cfg.flextok, cfg.data.resolution, autoencoder_config=ae)
    return FlexTokObjective(model, pixel_loss=cfg.pixel_loss, prior_loss=cfg.prior_loss).to(device)


def seconds_per_step(objective: FlexTokObjective, images: torch.Tensor, lr: float, steps: int,
                     warmup: int) -> list[float]:
    """Wall seconds of each timed optimizer step (after `warmup` untimed ones)."""
    opt = torch.optim.AdamW(objective.parameters(), lr=lr)
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times = []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss, _ = objective(images, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/1d_tiny.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--prefixes", type=int, nargs="+", default=[1, 2, 4], help="prefixes_per_example values")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    before = matmul_gflops()
    rows, base = [], None
    for n in args.prefixes:
        cfg = load_config(args.config, [*args.overrides, f"flextok.prefixes_per_example={n}"], cls=TokenizerRunConfig)
        res = cfg.data.resolution
        images = (torch.rand(args.batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
        times = seconds_per_step(build(cfg, device), images, cfg.train.lr, args.steps, args.warmup)
        median = statistics.median(times)
        base = base or median
        flops = step_flops(tokenizer_workloads(cfg, planned_tokenizer(cfg)), args.batch)
        rows.append(f"  prefixes_per_example={n}: {median:.4f} s/step median of {len(times)} "
                    f"(min {min(times):.4f}), {median / base:.2f}x n={args.prefixes[0]}, "
                    f"{args.batch / median:.1f} img/s, plan {flops / 1e9:.2f} GFLOP/step = "
                    f"{flops / median / 1e9:.1f} GFLOP/s achieved")
    after = matmul_gflops()
    print(f"{args.config} {' '.join(args.overrides)}: batch {args.batch}, device {device}, "
          f"threads {torch.get_num_threads()}, fp32")
    print("\n".join(rows))
    print(f"  matmul {before:.1f} GFLOP/s before, {after:.1f} after | peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
