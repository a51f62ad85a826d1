"""LLM-style priors over image tokens: a GPT over token ids, a rectified-flow prior over KL latents,
cached token datasets, fast guided sampling, and DeepSpeed training (`train_prior.py`).

Importing the package registers both prior models for `base.hub.load_model`."""

from base.hub import load_model

from .discrete import DiscretePrior
from .flow import FlowPrior
from .generate import generate_images
from .kv_decoder import KVCacheDecoder
from .sampling import filter_and_sample, sample_tokens
from .schema import PriorConfig, PriorRunConfig, PriorTrainConfig
from .token_dataset import TokenDataset, TokenSpec, build_token_dataset, token_cache_dir

__all__ = [
    "DiscretePrior",
    "FlowPrior",
    "KVCacheDecoder",
    "PriorConfig",
    "PriorRunConfig",
    "PriorTrainConfig",
    "TokenDataset",
    "TokenSpec",
    "build_token_dataset",
    "filter_and_sample",
    "generate_images",
    "load_prior",
    "sample_tokens",
    "token_cache_dir",
]


def load_prior(path, map_location: str = "cpu") -> DiscretePrior | FlowPrior:
    """Load a saved prior (discrete or flow) from a folder or hub id hf:owner/name."""
    return load_model(path, map_location, expect=(DiscretePrior, FlowPrior), what="a prior")
