"""The last stage: every tokenizer and prior measured side by side (`run_evaluation`), and the report
(`write_report`). Metrics beyond PSNR/SSIM live here: Fréchet statistics, the Inception port and the
dataset classifier.

The names below load their module on first use, so a script that only needs the experiment schema
(`evaluation.schema`) does not import the metrics and plotting stack."""

from __future__ import annotations

import importlib

_HOMES = {
    "write_report": "report", "run_evaluation": "run",
    **{name: "rows" for name in ("ErrorRow", "EvaluationResult", "PriorRow", "SamplerSettings", "TokenizerRow")},
    **{name: "schema" for name in ("EvalConfig", "EvalPriorConfig", "EvalTokenizerConfig", "ExperimentConfig")},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
