"""Tokenizer speed: grid autoencoders (train / data loader / encode+decode) and the 1D tokenizer at the
shared configuration of ANCHORS.md §A. Prints each figure beside this process's matmul GFLOP/s.

    python benchmarks/bench_tokenizers.py [--threads 2] [--only grid|flextok] [--compile] [--guidance-interval 0 1]

--compile runs the 1D tokenizer's trunks through torch.compile (`module.compile()`, available to any user);
each batch shape compiles once, in the untimed warm-up call.
"""

from __future__ import annotations

import argparse
import os

import torch
from machine import matmul_gflops, peak_rss_mib, throughput

from base.config import load_config
from base.data import train_loader
from base.schema import SamplingConfig
from flextok.model import FlexTok
from flextok.schema import FlexTokConfig, TokenizerRunConfig
from grid.autoencoder import GridAutoencoder
from grid.objectives import GridObjective
from grid.schema import GridConfig, QuantizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ANCHORS.md §A: apple/ml-flextok, random init, its own tokenize/detokenize, matmul ~140-177 GFLOP/s
REFERENCE = {"tokenize": 95.5, "detokenize": 12.7, "detokenize_cfg": 6.44}
REFERENCE_MATMUL = (140 + 177) / 2
TARGET = {"tokenize": 1.2, "detokenize": 1.5, "detokenize_cfg": 1.5}


def bench_grid(cfg: TokenizerRunConfig, batch: int = 32) -> dict[str, float]:
    model = GridAutoencoder(cfg.grid, cfg.data.resolution)
    objective = GridObjective(model, cfg.loss)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1

    def train_step():
        loss, _ = objective(images, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def encode_decode():
        with torch.no_grad():
            model.eval().detokenize(model.tokenize(images))

    loader = train_loader(cfg.data, batch, cfg.seed, 0, 20)  # built once: the timing is the per-batch work

    def load_batches():
        for _ in loader:
            pass

    return {
        "train_img_s": throughput(train_step, batch),
        "encode_decode_img_s": throughput(encode_decode, batch),
        "data_loader_img_s": throughput(load_batches, 20 * batch, repeats=2),
    }


def anchor_flextok() -> tuple[FlexTok, torch.Tensor]:
    """ANCHORS §A: latents [32, 16, 8, 8], patch 1, 32 registers, FSQ [8,5,5,5], width 256, depth 4, 4 heads."""
    ae = GridConfig(downsample=8, latent_channels=16)
    cfg = FlexTokConfig(
        input="latents", patch_size=1, num_registers=32, dim=256, depth=4, heads=4, decoder_dim=256,
        decoder_depth=4, decoder_heads=4, quantizer=QuantizerConfig(fsq_levels=[8, 5, 5, 5]), decoder="rectified_flow",
        sampling=SamplingConfig(steps=8),
    )
    from dataclasses import asdict

    model = FlexTok(cfg, resolution=64, autoencoder_config=asdict(ae)).eval()
    model.target_scale.fill_(1.0)
    return model, torch.randn(32, 8 * 8, 16)  # latent patches: the autoencoder is excluded from timing


def bench_flextok(compile_trunks: bool = False, interval: tuple[float, float] = (0.0, 1.0),
                  steps: int = 8) -> dict[str, float]:
    model, x0 = anchor_flextok()
    plain = model.decoding(steps=steps, guidance_scale=1.0)
    guided = model.decoding(steps=steps, guidance_scale=7.5, guidance_interval=list(interval))
    if compile_trunks:
        model.encoder.trunk.compile()
        model.decoder.trunk.compile()
    with torch.no_grad():
        tokens = list(model.encode_targets(x0)[1].unbind(0))

        def tokenize():
            model.encode_targets(x0)

        return {
            "tokenize": throughput(tokenize, len(x0)),
            "detokenize": throughput(lambda: model.sample_targets(tokens, plain), len(x0), 2),
            "detokenize_cfg": throughput(lambda: model.sample_targets(tokens, guided), len(x0), 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["grid", "flextok"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the 1D tokenizer's trunks")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=(0.3, 0.7), metavar=("LOW", "HIGH"),
                        help="guided decoding guides only at noise levels t in [LOW, HIGH] (default: FlexTok's)")
    parser.add_argument("--steps", type=int, default=8,
                        help="Euler steps of our decoding; the reference's figures are always its 8-step ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gflops = matmul_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads, matmul 2048^3 fp32: {gflops:.1f} GFLOP/s")
    if args.only in (None, "grid"):
        for name in ("grid_kl", "grid_vq"):
            cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), cls=TokenizerRunConfig)
            r = bench_grid(cfg)
            print(
                f"{name:8s} {cfg.data.resolution}px f{cfg.grid.downsample} c{cfg.grid.latent_channels}: "
                f"train {r['train_img_s']:.0f} img/s | data loader {r['data_loader_img_s']:.0f} img/s | "
                f"encode+decode {r['encode_decode_img_s']:.0f} img/s"
            )
    if args.only in (None, "flextok"):
        r = bench_flextok(args.compile, tuple(args.guidance_interval), args.steps)
        mode = "torch.compile" if args.compile else "eager"
        mode += f", guidance interval {list(args.guidance_interval)}, {args.steps} steps (reference: 8)"
        print(f"1D tokenizer at ANCHORS §A, {mode} (per matmul-GFLOP/s, vs the reference at ~158 GFLOP/s):")
        for key, value in r.items():
            ours, ref = value / gflops, REFERENCE[key] / REFERENCE_MATMUL
            verdict = "meets" if ours / ref >= TARGET[key] else "misses"
            print(
                f"  {key:15s} {value:7.1f} img/s  ({ours:.3f}/GFLOP/s; reference {REFERENCE[key]} img/s = "
                f"{ref:.3f}) -> {ours / ref:.2f}x, {verdict} the {TARGET[key]}x target"
            )
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
