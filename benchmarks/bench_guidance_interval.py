"""What a guidance interval does to quality on a trained 1D tokenizer: the same held-out tokens decoded with
the same seed under full guidance and under each interval, through the evaluation (PSNR, SSIM, rFID, rKID on
the eval config's held-out images and FID backbone). Decoding speed: `bench_tokenizers.py --guidance-interval`.

    python benchmarks/bench_guidance_interval.py --config configs/eval_tiny.yaml \
        --tokenizer runs/quickstart/1d_tiny/final --scale 3.0 --interval 0.3 0.7 --interval 0.2 0.8
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import matmul_gflops

from base.config import load_config
from evaluation.run import run_evaluation
from evaluation.schema import ExperimentConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/eval_tiny.yaml", help="eval config: data, backbone, images")
    parser.add_argument("--tokenizer", default="runs/quickstart/1d_tiny/final")
    parser.add_argument("--scale", type=float, default=3.0, help="guidance scale")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=float, nargs=2, action="append", metavar=("LOW", "HIGH"),
                        help="noise levels t (1 = noise) that are guided; repeat for several")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul 2048^3 fp32: "
          f"{matmul_gflops():.1f} GFLOP/s")
    intervals = [[0.0, 1.0]] + [list(i) for i in args.interval or []]
    print(f"{args.tokenizer}: guidance {args.scale:g}, {args.steps} Euler steps, k = all registers")
    for interval in intervals:
        overrides = [
            "eval.priors=[]", f"eval.tokenizers=[{{name: 1d, path: {args.tokenizer}}}]", "eval.adaptive_psnr=null",
            f"eval.decoder_sampling.guidance_scale={args.scale}", f"eval.decoder_sampling.steps={args.steps}",
            f"eval.decoder_sampling.guidance_interval={interval}",
        ]
        cfg = load_config(args.config, overrides, cls=ExperimentConfig)
        started = time.perf_counter()
        result = run_evaluation(cfg, progress=False)
        seconds = time.perf_counter() - started
        row = max((r for r in result.tokenizer_rows if r.decoding == "sample"), key=lambda r: r.k)
        computed = "computed" if row.computed else "cached"
        print(f"  interval {interval}: PSNR {row.psnr:.2f} [{row.psnr_ci[0]:.2f}, {row.psnr_ci[1]:.2f}] dB, "
              f"SSIM {row.ssim:.3f}, rFID {row.rfid:.2f}, rKID {row.rkid:.3g} ± {row.rkid_std:.2g} "
              f"(evaluation of {len(result.tokenizer_rows)} rows, {computed}, {seconds:.1f} s)")


if __name__ == "__main__":
    main()
