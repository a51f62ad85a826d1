"""`ImageCodec`: image files <-> compressed files through a tokenizer and the prior over its tokens.

An image is cut into tiles at the tokenizer's resolution (edge tiles padded), each tile tokenized exactly
as the prior's token cache was built (`priors.token_dataset`: full, prefix, adaptive or BPE ids), and the
token streams range-coded with the prior's probabilities (`codec.entropy`). Decompressing restores the
same tokens, checks them against the encoder's CRC, decodes them (the posterior mean by default) and
returns a PNG of the original size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from base.errors import TokenizerMismatch, UserError
from base.fingerprint import fingerprint_model
from bpe_image import BPECodec, open_codec
from flextok import FlexTok, load_tokenizer
from priors import DiscretePrior, PriorConfig, load_prior
from priors.pairing import check_tokenizer
from priors.token_dataset import tokenize_for_prior

from .container import DECODES, Header, fingerprint_bytes, pack, tokens_crc, unpack
from .entropy import Layout, decode_streams, encode_streams
from .images import png_bytes, read_image, tile, untile

__all__ = ["CodecSettings", "ImageCodec"]


@dataclass(frozen=True)
class CodecSettings:
    """What `compress` may choose. The defaults code the prior's own token stream and ask for the mean decode."""

    k: int | None = None  # tokens per tile of an ordered 1D stream; default: the prior's stream length
    target_psnr: float | None = None  # adaptive length per tile; default: an adaptive prior's own target
    decode: str = "mean"  # "mean": one unguided step from t = 1, E[x0 | tokens]; "sample": the decoder's sampler
    steps: int | None = None  # sampler steps; default: the tokenizer's `sampling.steps`
    guidance_scale: float | None = None  # default: the tokenizer's `sampling.guidance_scale`
    seed: int = 0  # the decoder's noise
    chunk: int = 64  # tiles per batch (prior pass, tokenizer, decoder)
    threads: int = 1  # torch threads of the prior pass, recorded: the decoder must use the same

    def __post_init__(self):
        if self.decode not in DECODES:
            raise UserError(f"decode: must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.k is not None and self.target_psnr is not None:
            raise UserError("give k or target_psnr, not both")
        for name in ("k", "steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.chunk < 2**16 or not 1 <= self.threads < 256 or not 0 <= self.seed < 2**32 or (
                self.steps or 1) >= 2**16:
            raise UserError(f"chunk, threads, seed, steps: out of range ({self.chunk}, {self.threads}, {self.seed}, "
                            f"{self.steps})")


class ImageCodec:
    """A tokenizer, the discrete prior over its tokens and (for BPE priors) the BPE codec, with their
    fingerprints. `compress` and `decompress` work on bytes; `image_codec.py` writes the files."""

    def __init__(self, tokenizer: torch.nn.Module, prior: DiscretePrior, bpe: BPECodec | None = None,
                 bpe_fingerprint: str | None = None, device: str = "cpu", names: tuple[str, str] = ("", "")):
        if not isinstance(prior, DiscretePrior):
            raise UserError(f"{names[1] or 'the prior'}: a {type(prior).__name__} models continuous latents; the "
                            "codec needs a discrete prior over token ids")
        if isinstance(tokenizer, FlexTok) and tokenizer.target_scale == 0:
            raise UserError(f"{names[0] or 'the tokenizer'}: untrained (no target scale): tokenizing would change it")
        self.tokenizer, self.prior = tokenizer.eval().to(device), prior.float().eval()  # the prior stays on the CPU
        self.bpe, self.device, self.names = bpe, device, names
        tokenizer_fingerprint = fingerprint_model(tokenizer)
        check_tokenizer(prior, tokenizer_fingerprint, names[0] or "the tokenizer")
        vocab = bpe.vocab_size if bpe is not None else tokenizer.vocab_size
        if prior.vocab_size != vocab:
            raise TokenizerMismatch(f"the prior models {prior.vocab_size} ids, its tokens have {vocab}")
        self.fingerprints = tuple(map(fingerprint_bytes, (tokenizer_fingerprint, fingerprint_model(prior),
                                                          bpe_fingerprint)))

    @classmethod
    def open(cls, prior: str | Path, tokenizer: str | Path | None = None, device: str = "cpu") -> ImageCodec:
        """Load a saved prior (folder, or hf:owner/name), its tokenizer (default: the one its config names)
        and BPE codec."""
        loaded = load_prior(prior)
        tokenizer = tokenizer or loaded.config.tokenizer
        if not tokenizer:
            raise UserError(f"{prior}: its config names no tokenizer: give one")
        bpe, bpe_fingerprint = open_codec(loaded.config.bpe) if loaded.config.tokens == "bpe" else (None, None)
        return cls(load_tokenizer(tokenizer), loaded, bpe, bpe_fingerprint, device, (str(tokenizer), str(prior)))

    # --- compress ---

    def plan(self, settings: CodecSettings) -> tuple[PriorConfig, Layout]:
        """The token mode to tokenize with (a `prior.tokens` config) and the layout of the streams."""
        config, s = self.prior.config, settings
        chunking = {"chunk": s.chunk, "threads": s.threads}
        if config.tokens in ("adaptive", "bpe"):  # the prior ends each tile with EOS
            if s.k is not None or (s.target_psnr is not None and config.tokens == "bpe"):
                raise UserError(f"k, target_psnr: a prior over {config.tokens} tokens codes each tile's own length")
            tokens = config if s.target_psnr is None else dataclasses.replace(config, target_psnr=s.target_psnr)
            return tokens, Layout("eos", self.tokenizer.tokens_per_image, **chunking)
        length = self.prior.max_length
        if s.target_psnr is not None:  # a fixed-length prior: the length 1, 2, 4, ... goes in the payload
            return dataclasses.replace(config, tokens="adaptive", target_psnr=s.target_psnr), Layout("pow2", length,
                                                                                                     **chunking)
        k = length if s.k is None else s.k
        if k > length:
            raise UserError(f"k: the prior models streams of at most {length} tokens, got {k}")
        tokens = config if k == length else dataclasses.replace(config, tokens="prefix", prefix_length=k)
        return tokens, Layout("fixed", k, **chunking)

    def tokenize(self, image: torch.Tensor, settings: CodecSettings) -> tuple[list[np.ndarray], Layout]:
        """One token stream per tile of `image` [3, H, W], and their layout."""
        tokens, layout = self.plan(settings)
        streams = []
        for tiles in tile(image, self.tokenizer.resolution).split(layout.chunk):
            batch = tokenize_for_prior(self.tokenizer, tiles.to(self.device), tokens, self.bpe)
            streams += [np.asarray(s, dtype=np.int64) for s in batch]
        if layout.stream == "pow2":  # a prefix prior shorter than the tokenizer: the longest length it models
            streams = [s[: max(k for k in layout.lengths if k <= len(s))] for s in streams]
        return streams, layout

    def compress_with_tokens(self, path: str | Path,
                             settings: CodecSettings = CodecSettings()) -> tuple[bytes, list[np.ndarray]]:
        """The compressed file's bytes for the image at `path`, and the token streams they hold."""
        return self.compress_image(*read_image(path), settings)

    def compress_image(self, image: torch.Tensor, gray: bool = False,
                       settings: CodecSettings = CodecSettings()) -> tuple[bytes, list[np.ndarray]]:
        """`compress_with_tokens` for an image already read: [3, H, W] in [-1, 1] (`gray`: write an L PNG)."""
        streams, layout = self.tokenize(image, settings)
        payload = encode_streams(self.prior, streams, layout)
        sampling = getattr(self.tokenizer.config, "sampling", None)
        steps = settings.steps or (sampling.steps if sampling else 1)
        guidance = settings.guidance_scale if settings.guidance_scale is not None else (
            sampling.guidance_scale if sampling else 1.0)
        header = Header(layout.stream, gray, settings.decode, *self.fingerprints, image.shape[2], image.shape[1],
                        self.tokenizer.resolution, layout.k, layout.threads, layout.chunk, steps, guidance,
                        settings.seed, tokens_crc(streams))
        return pack(header, payload), streams

    def compress(self, path: str | Path, settings: CodecSettings = CodecSettings()) -> bytes:
        return self.compress_with_tokens(path, settings)[0]

    # --- decompress ---

    def read(self, data: bytes, name: str = "input") -> tuple[Header, list[np.ndarray]]:
        """The header and the token streams of a compressed file's bytes, verified against the encoder's CRC."""
        header, payload = unpack(data, name)
        found_all = (header.tokenizer, header.prior, header.bpe)
        for what, found, mine, path in zip(("tokenizer", "prior", "BPE codec"), found_all, self.fingerprints,
                                           (*self.names, "")):
            if found != mine:
                raise TokenizerMismatch(f"{name}: made with {what} {_hex(found)}, not with "
                                        f"{path or 'this one'} ({_hex(mine)})")
        if header.tile != self.tokenizer.resolution:
            raise UserError(f"{name}: tiles of {header.tile} px, the tokenizer's resolution is "
                            f"{self.tokenizer.resolution}")
        layout = Layout(header.stream, header.k, header.chunk, header.threads)
        streams = decode_streams(self.prior, payload, header.num_tiles, layout)
        if tokens_crc(streams) != header.tokens_crc:
            raise UserError(f"{name}: the decoded tokens differ from the encoder's (CRC-32): the prior's "
                            "probabilities came out differently here (another CPU, BLAS, torch or constriction "
                            "version); decode where it was encoded")
        return header, streams

    def decompress(self, data: bytes, name: str = "input", *, decode: str | None = None, steps: int | None = None,
                   seed: int | None = None) -> bytes:
        """PNG bytes of a compressed file, decoded as its header says unless `decode` / `steps` / `seed` say
        otherwise."""
        header, streams = self.read(data, name)
        return png_bytes(self.render(header, streams, name, decode=decode, steps=steps, seed=seed), header.gray)

    def render(self, header: Header, streams: list[np.ndarray], name: str = "input", *, decode: str | None = None,
               steps: int | None = None, seed: int | None = None) -> torch.Tensor:
        """The image [3, H, W] in [-1, 1] that `read`'s tokens decode to (see `decompress`)."""
        decode = decode or header.decode
        if decode not in DECODES:
            raise UserError(f"decode: must be one of {', '.join(DECODES)}, got {decode!r}")
        codes = [torch.from_numpy(c).long() for c in self._codes(streams, name)]
        sampling = {"steps": 1, "guidance_scale": 1.0} if decode == "mean" else {
            "steps": steps or header.steps, "guidance_scale": header.guidance_scale}
        tiles = []
        for start in range(0, len(codes), header.chunk):  # the batches adaptive lengths were chosen in
            batch = codes[start : start + header.chunk]
            if isinstance(self.tokenizer, FlexTok):
                tiles.append(self.tokenizer.detokenize(batch, seed=header.seed if seed is None else seed, **sampling))
            else:
                tiles.append(self.tokenizer.detokenize(batch))
        return untile(torch.cat(tiles).cpu().float(), header.height, header.width)

    def _codes(self, streams: list[np.ndarray], name: str) -> list[np.ndarray]:
        """The tokenizer's codes of each stream (BPE ids decoded)."""
        if self.bpe is None:
            return streams
        codes = [np.asarray(self.bpe.decode(s)).reshape(-1) for s in streams]
        if any(len(c) != self.tokenizer.tokens_per_image for c in codes):
            raise UserError(f"{name}: corrupted (BPE ids spell the wrong number of codes)")
        return codes


def _hex(fingerprint: bytes) -> str:
    return fingerprint.hex() if any(fingerprint) else "none"
