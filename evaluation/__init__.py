"""The last stage: every tokenizer and prior measured side by side (`run_evaluation`), and the report
(`write_report`). Metrics beyond PSNR/SSIM live here: Fréchet statistics, the Inception port and the
dataset classifier."""

from .report import write_report
from .rows import ErrorRow, EvaluationResult, PriorRow, SamplerSettings, TokenizerRow
from .run import run_evaluation
from .schema import EvalConfig, EvalPriorConfig, EvalTokenizerConfig, ExperimentConfig

__all__ = [
    "ErrorRow", "EvalConfig", "EvalPriorConfig", "EvalTokenizerConfig", "EvaluationResult", "ExperimentConfig",
    "PriorRow", "SamplerSettings", "TokenizerRow", "run_evaluation", "write_report",
]
