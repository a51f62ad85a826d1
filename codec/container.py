"""The compressed file: a fixed binary header, the range coder's payload, and a CRC-32 trailer.

Layout (little-endian), `HEADER_BYTES` + payload + 4 bytes:

    magic "FTKc", format version, stream kind, output mode, decode mode,
    first 8 bytes of the tokenizer's, prior's and BPE codec's SHA-256 fingerprints (zeros: no codec),
    image width and height, tile side, padding rule, k (tokens per tile, or the longest allowed),
    threads and tiles per chunk of the prior pass, decoder steps, guidance scale and seed,
    CRC-32 of the coded tokens, payload bytes;
    then the payload, then CRC-32 of everything before it.

Eight bytes of a fingerprint are enough to tell models apart (a 2^-64 chance of two colliding), not to
authenticate them. The token CRC lets `decompress` notice that the prior's probabilities came out
differently on the decoding machine, instead of writing a wrong image.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from base.errors import UserError

__all__ = ["DECODES", "FINGERPRINT_BYTES", "HEADER_BYTES", "Header", "MAGIC", "OVERHEAD_BYTES", "STREAMS",
           "VERSION", "fingerprint_bytes", "pack", "tokens_crc", "unpack"]

MAGIC = b"FTKc"
VERSION = 1
STREAMS = ("fixed", "eos", "pow2")  # how each tile's length is known: header k, the prior's EOS, coded 1, 2, 4, ...
DECODES = ("mean", "sample")
PADDINGS = ("replicate",)  # edge tiles repeat the image's last row and column
FINGERPRINT_BYTES = 8
_LAYOUT = struct.Struct("<4sBBBB8s8s8sIIHBHBHHfIII")
HEADER_BYTES = _LAYOUT.size
OVERHEAD_BYTES = HEADER_BYTES + 4  # header and CRC trailer: every file's bytes beyond its payload


@dataclass(frozen=True)
class Header:
    stream: str  # one of STREAMS
    gray: bool  # the input was grayscale: the PNG is written in mode L
    decode: str  # one of DECODES: the posterior mean (one unguided step) or a sample
    tokenizer: bytes  # fingerprint prefixes (`fingerprint_bytes`)
    prior: bytes
    bpe: bytes
    width: int
    height: int
    tile: int  # tile side in pixels: the tokenizer's resolution
    k: int  # fixed: tokens per tile; pow2: the longest length; eos: the most tokens before EOS
    threads: int  # torch threads of the prior pass (its float results depend on them)
    chunk: int  # tiles per prior batch and per decoder batch
    steps: int  # decoder steps when sampling
    guidance_scale: float
    seed: int
    tokens_crc: int
    padding: str = PADDINGS[0]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return -(-self.height // self.tile), -(-self.width // self.tile)

    @property
    def num_tiles(self) -> int:
        rows, cols = self.grid
        return rows * cols


def fingerprint_bytes(fingerprint: str | None) -> bytes:
    """The header's form of a hex SHA-256 fingerprint: its first 8 bytes (zeros for none)."""
    return bytes.fromhex(fingerprint[: 2 * FINGERPRINT_BYTES]) if fingerprint else bytes(FINGERPRINT_BYTES)


def tokens_crc(streams) -> int:
    """CRC-32 over every tile's length and tokens, in tile order."""
    crc = 0
    for tokens in streams:
        crc = zlib.crc32(struct.pack("<I", len(tokens)), crc)
        crc = zlib.crc32(bytes(memoryview(tokens.astype("<i4"))), crc)
    return crc


def pack(header: Header, payload: bytes) -> bytes:
    h = header
    body = _LAYOUT.pack(
        MAGIC, VERSION, STREAMS.index(h.stream), int(h.gray), DECODES.index(h.decode), h.tokenizer, h.prior, h.bpe,
        h.width, h.height, h.tile, PADDINGS.index(h.padding), h.k, h.threads, h.chunk, h.steps, h.guidance_scale,
        h.seed, h.tokens_crc, len(payload),
    ) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, name: str = "input") -> tuple[Header, bytes]:
    """Header and payload of a file's bytes; a UserError naming `name` if it is not a whole, intact file."""
    if data[:4] != MAGIC:
        raise UserError(f"{name}: not a compressed image (wrong magic {data[:4]!r}, expected {MAGIC!r})")
    if len(data) > 4 and data[4] != VERSION:
        raise UserError(f"{name}: format version {data[4]} is not supported (this codec reads version {VERSION})")
    if len(data) < OVERHEAD_BYTES:
        raise UserError(f"{name}: truncated ({len(data)} bytes, a header alone is {OVERHEAD_BYTES})")
    fields = _LAYOUT.unpack_from(data)
    payload_bytes = fields[-1]
    if len(data) != OVERHEAD_BYTES + payload_bytes:
        raise UserError(f"{name}: truncated or padded ({len(data)} bytes, the header says "
                        f"{OVERHEAD_BYTES + payload_bytes})")
    (stored,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != stored:
        raise UserError(f"{name}: corrupted (CRC-32 mismatch)")
    (_, _, stream, gray, decode, tok, prior, bpe, width, height, tile, padding, k, threads, chunk, steps, guidance,
     seed, crc, _) = fields
    try:
        header = Header(STREAMS[stream], bool(gray), DECODES[decode], tok, prior, bpe, width, height, tile, k,
                        threads, chunk, steps, guidance, seed, crc, PADDINGS[padding])
    except IndexError:
        raise UserError(f"{name}: corrupted (a header field is out of range)") from None
    if min(width, height, tile, k, threads, chunk, steps) < 1:
        raise UserError(f"{name}: corrupted (a header size field is 0)")
    return header, data[HEADER_BYTES:-4]
