"""An image codec driven by the priors: images are tiled at a tokenizer's resolution, tokenized, and the
tokens range-coded (constriction) with the prior's next-token probabilities. On files: `image_codec.py`.

Layer: after `priors`, before `evaluation`; imports flextok, bpe_image and priors only."""

from .container import HEADER_BYTES, MAGIC, OVERHEAD_BYTES, VERSION, Header
from .core import CodecSettings, ImageCodec
from .entropy import Layout, decode_streams, encode_streams
from .measure import (
    CodecMeasurement,
    codec_size_vs_nll,
    measure_image,
    prior_nll_bits,
    summarize,
)

__all__ = [
    "HEADER_BYTES", "MAGIC", "OVERHEAD_BYTES", "VERSION", "CodecMeasurement", "CodecSettings", "Header", "ImageCodec",
    "Layout", "codec_size_vs_nll", "decode_streams", "encode_streams", "measure_image", "prior_nll_bits",
    "summarize",
]
