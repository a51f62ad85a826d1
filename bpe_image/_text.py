"""Codes <-> private-use characters, the alphabet the string BPE backends work on.

Code `i` becomes `chr(0xF0000 + i)` (Supplementary Private Use Area-A). Nothing in a
real text pipeline normalizes or splits these characters, so a string BPE library sees
exactly one symbol per code. The plane has 65,534 usable code points, hence the cap on K.
"""

from __future__ import annotations

import numpy as np

CODE_BASE = 0xF0000
MAX_CODEBOOK_SIZE = 65534


def codes_to_text(codes: np.ndarray) -> str:
    """Map a 1D code array to one string; a single bulk decode, no per-code Python work."""
    return (np.asarray(codes, dtype=np.int64) + CODE_BASE).astype("<u4").tobytes().decode("utf-32-le")


def text_to_codes(text: str) -> np.ndarray:
    """Inverse of `codes_to_text`; returns int64 codes (negative or huge if foreign)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64) - CODE_BASE


def alphabet(codebook_size: int) -> list[str]:
    """All K characters, in code order, so backends can be told the full base vocabulary."""
    return list(codes_to_text(np.arange(codebook_size)))
