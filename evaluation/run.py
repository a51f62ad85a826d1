"""`run_evaluation`: every configured tokenizer and prior measured side by side, failures recorded as
error rows instead of stopping the run.

Every number is cached under a hash of what produced it: the checkpoint's fingerprint (its weights and
config, not its path), the held-out pixels, the token mode (k or adaptive target), the decoding or
sampling settings, and for FID the backbone's name. So adding a tokenizer computes only its rows, a
retrained checkpoint never reuses a stale number, and FIDs from two backbones never meet in one report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm import tqdm

from base.errors import UserError

from .codec_rows import run_codec
from .context import EvalContext
from .prior_rows import evaluate_prior
from .rows import EvaluationResult
from .schema import ExperimentConfig
from .tokenizer_rows import evaluate_mode, open_tokenizer

__all__ = ["run_evaluation"]


def describe_run(cfg: ExperimentConfig, ctx: EvalContext) -> dict[str, Any]:
    settings = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("tokenizers", "priors")}
    return {
        "name": cfg.name, "seed": cfg.seed, "device": str(ctx.device), "torch_threads": torch.get_num_threads(),
        "data": {"source": cfg.data.source, "resolution": cfg.data.resolution, "eval_split": cfg.data.eval_split,
                 "train_split": cfg.data.train_split, "held_out_images": len(ctx.held_out.images)},
        "fid": ctx.backbone_info(), "settings": settings,
        "lpips": None if ctx.lpips is None else {"weights": ctx.lpips_weights, "fingerprint": ctx.lpips[1]},
    }


def run_evaluation(cfg: ExperimentConfig, progress: bool = True) -> EvaluationResult:
    """Measure every configured tokenizer and prior; failures become error rows, never a crash."""
    if not cfg.eval.tokenizers and not cfg.eval.priors:
        raise UserError("eval: list at least one entry under eval.tokenizers or eval.priors")
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    torch.manual_seed(cfg.seed)
    ctx = EvalContext(cfg, progress)
    result = EvaluationResult(describe_run(cfg, ctx), ctx.held_out.images[ctx.preview_index])
    opened = []
    for entry in cfg.eval.tokenizers:
        try:
            opened.append(open_tokenizer(entry, ctx))
        except Exception as err:  # noqa: BLE001 - any failure of one entry is reported, the rest still run
            result.fail("tokenizer", entry.name, entry.path, err)
    total = sum(len(tested.modes()) for tested in opened) + len(cfg.eval.priors)
    with tqdm(total=total, desc="evaluate", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for tested in opened:
            for mode in tested.modes():
                bar.set_postfix_str(f"{tested.entry.name} {mode.label}")
                try:
                    row, preview = evaluate_mode(tested, mode, ctx)
                    result.tokenizer_rows.append(row)
                    result.previews[(tested.entry.name, mode.label)] = preview
                except Exception as err:  # noqa: BLE001
                    result.fail("tokenizer", tested.entry.name, tested.entry.path, err, mode.label)
                bar.update()
        for entry in cfg.eval.priors:
            bar.set_postfix_str(f"prior {entry.name}")
            try:
                row, samples, labels = evaluate_prior(entry, ctx)
                result.prior_rows.append(row)
                result.samples[entry.name] = (samples, labels)
            except Exception as err:  # noqa: BLE001
                result.fail("prior", entry.name, entry.path, err)
            bar.update()
    run_codec(ctx, result)  # whole images through each prior's codec, against JPEG and WebP
    return result
