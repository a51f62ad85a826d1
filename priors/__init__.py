"""LLM-style priors over image tokens: a GPT over token ids, a rectified-flow prior over KL latents,
cached token datasets, fast guided sampling, and DeepSpeed training (`train_prior.py`)."""

from .discrete import DiscretePrior
from .flow import FlowPrior
from .generate import generate_images
from .kv_decoder import KVCacheDecoder
from .sampling import filter_and_sample, sample_tokens
from .token_dataset import (
    TokenDataset,
    TokenizerMismatch,
    TokenSpec,
    build_token_dataset,
    fingerprint_model,
)

__all__ = [
    "DiscretePrior",
    "FlowPrior",
    "KVCacheDecoder",
    "TokenDataset",
    "TokenSpec",
    "TokenizerMismatch",
    "build_token_dataset",
    "filter_and_sample",
    "fingerprint_model",
    "generate_images",
    "sample_tokens",
]
