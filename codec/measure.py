"""How close the codec comes to its prior: file bytes against the prior's NLL of the same tokens, and speed.

The NLL is `DiscretePrior.nll_bits` (the held-out measure of `evaluation.prior_rows`, under the null
condition) summed over an image's tiles, plus, for `pow2` streams, the uniform cost of each tile's length
(the prior does not model it). The payload's overhead over it is the range coder's: integer quantization of
the probabilities and up to a couple of 32-bit words to end the stream; the header is `OVERHEAD_BYTES`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from priors import DiscretePrior

from .container import OVERHEAD_BYTES, unpack
from .core import CodecSettings, ImageCodec
from .images import read_image

__all__ = ["CodecMeasurement", "codec_size_vs_nll", "measure_image", "prior_nll_bits", "summarize"]


@dataclass
class CodecMeasurement:
    image: str
    pixels: int
    tiles: int
    tokens: int
    file_bytes: int
    payload_bytes: int
    nll_bits: float  # the prior's NLL of the file's tokens
    length_bits: float  # pow2 streams: log2(#lengths) per tile; else 0
    encode_s: float  # read, tokenize, entropy-code, pack
    decode_s: float | None  # unpack, entropy-decode, check, detokenize (None: not decoded; the PNG not written)
    round_trip_exact: bool | None = None  # the decoded tokens equal the coded ones (None: not decoded)

    @property
    def model_bits(self) -> float:
        return self.nll_bits + self.length_bits

    @property
    def overhead_bits(self) -> float:
        """Payload bits beyond what the prior says the tokens cost (the header not included)."""
        return 8 * self.payload_bytes - self.model_bits


def prior_nll_bits(prior: DiscretePrior, streams: list[np.ndarray], batch: int = 256) -> float:
    """The prior's NLL in bits of every stream, unconditionally; a fixed-length prior scores each stream as
    the prefix it is (streams of one length batched together)."""
    total = 0.0
    with torch.no_grad():
        groups = [streams] if prior.variable_length else [[s for s in streams if len(s) == n]
                                                          for n in sorted({len(s) for s in streams})]
        for group in groups:
            for start in range(0, len(group), batch):
                part = group[start : start + batch]
                lengths = torch.tensor([len(s) for s in part])
                tokens = torch.zeros(len(part), int(lengths.max()), dtype=torch.long)
                for row, s in enumerate(part):
                    tokens[row, : len(s)] = torch.from_numpy(s)
                total += prior.nll_bits(tokens, lengths=lengths if prior.variable_length else None).sum().item()
    return total


def measure_image(codec: ImageCodec, image: torch.Tensor, gray: bool = False,
                  settings: CodecSettings = CodecSettings(), name: str = "image",
                  decode: bool = True) -> tuple[CodecMeasurement, torch.Tensor | None]:
    """One image [3, H, W] in [-1, 1]: its compressed bytes, the prior's NLL bits of the same tokens,
    encode/decode seconds and, when decoding, whether the tokens came back bit-exact and the decoded image."""
    started = time.perf_counter()
    data, streams = codec.compress_image(image, gray, settings)
    encode_s = time.perf_counter() - started
    decode_s = decoded_image = exact = None
    if decode:
        started = time.perf_counter()
        header, decoded = codec.read(data, name)  # raises unless the tokens' CRC matches
        decoded_image = codec.render(header, decoded, name)
        decode_s = time.perf_counter() - started
        exact = len(decoded) == len(streams) and all(np.array_equal(a, b) for a, b in zip(decoded, streams))
    header, layout = unpack(data, name)[0], codec.plan(settings)[1]
    measurement = CodecMeasurement(
        image=name, pixels=header.height * header.width, tiles=len(streams), tokens=sum(map(len, streams)),
        file_bytes=len(data), payload_bytes=len(data) - OVERHEAD_BYTES, nll_bits=prior_nll_bits(codec.prior, streams),
        length_bits=len(streams) * math.log2(len(layout.lengths)) if layout.stream == "pow2" else 0.0,
        encode_s=encode_s, decode_s=decode_s, round_trip_exact=exact,
    )
    return measurement, decoded_image


def codec_size_vs_nll(codec: ImageCodec, images: list[str | Path], settings: CodecSettings = CodecSettings(),
                      decode: bool = True) -> list[CodecMeasurement]:
    """`measure_image` of each image file (decoding also checks the round trip: it fails unless the tokens
    come back bit-exact)."""
    return [measure_image(codec, *read_image(path), settings, str(path), decode)[0] for path in images]


def summarize(measurements: list[CodecMeasurement]) -> dict:
    """Totals over images: bytes, bits per pixel, payload overhead over the model's bits (fraction), exact
    round trips, and images and tiles per second (only meaningful when run alone on the machine)."""
    m = measurements
    tiles = sum(x.tiles for x in m)
    model_bits = sum(x.model_bits for x in m)
    payload_bits = 8 * sum(x.payload_bytes for x in m)
    decoded = [x.decode_s for x in m if x.decode_s is not None]
    return {
        "images": len(m), "file_bytes": sum(x.file_bytes for x in m), "header_bytes_per_file": OVERHEAD_BYTES,
        "bits_per_pixel": 8 * sum(x.file_bytes for x in m) / sum(x.pixels for x in m),
        "payload_bits": payload_bits, "model_bits": model_bits,
        "payload_overhead": payload_bits / model_bits - 1 if model_bits else None,
        "encode_images_per_s": len(m) / sum(x.encode_s for x in m),
        "decode_images_per_s": len(decoded) / sum(decoded) if decoded else None,
        "encode_tiles_per_s": tiles / sum(x.encode_s for x in m),
        "decode_tiles_per_s": tiles / sum(decoded) if len(decoded) == len(m) else None,
        "round_trip_exact": sum(bool(x.round_trip_exact) for x in m),
        "rows": [asdict(x) for x in m],
    }
