"""Model FLOPs utilization of a finished prior run, from its logged training throughput.

    python benchmarks/prior_mfu.py --config configs/1d_256_mini.yaml --run runs/x/prior [overrides] [--ranks N]

MFU = (sequences/s x training FLOPs per sequence) / peak FLOP/s of all ranks. FLOPs per sequence are the
plan's (`priors.plan.prior_workload`: 6·W·s + 12·L·h·s²); sequences/s is the run's last logged
`tokens_per_s` (all ranks, training steps only) over the tokens it predicts per sequence. The peak is
the device's dense bf16 figure from its datasheet (CUDA), `--peak-tflops` when given, or on a CPU the
fp32 matmul GFLOP/s measured in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import matmul_gflops  # noqa: E402

from base.config import load_config
from evaluation.schema import ExperimentConfig  # noqa: E402
from priors.plan import planned_prior, prior_workload  # noqa: E402

DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_peak(ranks: int) -> tuple[float, str]:
    """Peak FLOP/s of all ranks' devices together, and where the figure comes from (CPU ranks share the
    machine whose matmul is measured, so their peak is that figure once)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in DENSE_BF16_TFLOPS.items():
            if key in name:
                return ranks * tflops * 1e12, f"{ranks} x {name}: {tflops:.0f} TFLOP/s dense bf16 (datasheet)"
        raise SystemExit(f"unknown peak for {name}: pass --peak-tflops")
    gflops = matmul_gflops()
    return gflops * 1e9, f"the CPU's fp32 matmul {gflops:.0f} GFLOP/s measured in this process"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", required=True, type=Path, help="the prior's run folder (with metrics.jsonl)")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device; overrides the lookup")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, cls=ExperimentConfig)
    planned = planned_prior(cfg)
    workload = prior_workload(cfg, planned)
    records = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1]
    predicted = planned.spec.max_length + int(planned.spec.variable_length)  # + EOS when lengths vary
    achieved = tokens_per_s / predicted * workload.train_flops
    if args.peak_tflops:
        peak, source = args.ranks * args.peak_tflops * 1e12, f"{args.ranks} x --peak-tflops {args.peak_tflops:g}"
    else:
        peak, source = device_peak(args.ranks)
    print(f"prior {planned.model.__class__.__name__} {sum(p.numel() for p in planned.model.parameters()) / 1e6:.1f}M "
          f"parameters: {tokens_per_s:,.0f} tokens/s on {args.ranks} rank(s) = {achieved / 1e12:.3f} TFLOP/s; "
          f"MFU {achieved / peak:.1%} of {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
