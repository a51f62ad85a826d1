"""String BPE backends (HF `tokenizers`, `sentencepiece`) behind one small interface.

The codec hands a backend one text per sequence: private-use characters, one per code,
with `BLOCK_SEPARATOR` between position blocks that merges must never cross. A
backend learns merges from such texts, encodes them into its own ids, and lists its
pieces so the codec can map backend ids to public ids.
"""

from __future__ import annotations

import io
import itertools
import os
from typing import ClassVar, Protocol

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ._arrays import split_by_counts

MIN_PAIR_COUNT = 2
"""A pair seen once is noise, not structure: merging it only wastes a vocabulary slot."""

BLOCK_SEPARATOR = chr(0x100000)
"""Marks a block edge. Plane-16 private use: never a code character (those are plane 15)."""


class Backend(Protocol):
    """What the codec needs from a string BPE library."""

    name: ClassVar[str]
    filename: ClassVar[str]

    @classmethod
    def train(
        cls, texts: list[str], alphabet: list[str], vocab_size: int, max_token_length: int, blocked: bool
    ) -> Backend:
        """Learn up to `vocab_size - len(alphabet)` merges, none across a separator.

        `blocked` says whether texts contain separators (1d) or not (flat).
        """

    @classmethod
    def from_bytes(cls, data: bytes) -> Backend:
        """Load a model written by `to_bytes`."""

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Backend ids (int64) of each text (separators emit nothing), using every core."""

    def pieces(self) -> list[str | None]:
        """Piece string for every backend id; None for ids that are not code strings."""

    def to_bytes(self) -> bytes:
        """Serialized model, the backend file of a saved codec."""


def _cores() -> int:
    """Threads for SentencePiece (HF tokenizers sizes its own rayon pool)."""
    return os.cpu_count() or 1


class TokenizersBackend:
    """HF `tokenizers` BPE: no normalizer, no unk, full base alphabet, `Fuse` decoder.

    Giving the trainer every code character as the initial alphabet (and no special
    tokens) makes base ids equal code ids and merged ids follow merge order. Flat mode
    has no pre-tokenizer; 1d mode's only pre-tokenizer splits at (and drops) block
    separators, which is how the library keeps merges inside blocks. That encodes
    exactly like passing pre-split word lists, and about 25% faster.
    """

    name: ClassVar[str] = "tokenizers"
    filename: ClassVar[str] = "tokenizer.json"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def train(
        cls, texts: list[str], alphabet: list[str], vocab_size: int, max_token_length: int, blocked: bool
    ) -> TokenizersBackend:
        """Learn up to `vocab_size - len(alphabet)` merges from `texts`."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.decoder = decoders.Fuse()
        if blocked:
            tokenizer.pre_tokenizer = pre_tokenizers.CharDelimiterSplit(BLOCK_SEPARATOR)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=MIN_PAIR_COUNT,
            show_progress=False,
            special_tokens=[],
            limit_alphabet=len(alphabet),
            initial_alphabet=alphabet,
            max_token_length=max_token_length,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tokenizer)

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenizersBackend:
        """Load a model written by `to_bytes`."""
        return cls(Tokenizer.from_str(data.decode("utf-8")))

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Batch encode in parallel (rayon), skipping offset bookkeeping we never read."""
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(encoding.ids, np.int64) for encoding in encodings]

    def pieces(self) -> list[str | None]:
        """Tokens ordered by id; the vocabulary must be contiguous from 0."""
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        pieces: list[str | None] = [None] * len(vocab)
        for token, token_id in vocab.items():
            if not 0 <= token_id < len(vocab) or pieces[token_id] is not None:
                raise ValueError(f"tokenizers vocabulary is not contiguous at id {token_id}")
            pieces[token_id] = token
        return pieces

    def to_bytes(self) -> bytes:
        """The tokenizer JSON."""
        return self._tokenizer.to_str().encode("utf-8")


class SentencePieceBackend:
    """SentencePiece BPE with every text-processing feature switched off.

    Identity normalization, no dummy prefix, no whitespace/script/number splitting and no
    byte fallback keep one code = one character. Each block is a separate sentence, so
    merges cannot cross blocks. Every code character is also fed once as its own
    sentence: with `character_coverage=1.0` that puts all K codes in the vocabulary,
    so codes unseen in training still encode losslessly (instead of to <unk>).
    SentencePiece has no minimum pair count: it merges until the vocabulary is full or
    no pair is left.
    """

    name: ClassVar[str] = "sentencepiece"
    filename: ClassVar[str] = "sentencepiece.model"

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        self._processor = processor

    @classmethod
    def train(
        cls, texts: list[str], alphabet: list[str], vocab_size: int, max_token_length: int, blocked: bool
    ) -> SentencePieceBackend:
        """Learn up to `vocab_size - len(alphabet)` merges (SentencePiece adds one <unk>)."""
        sentences = _blocks(texts) if blocked else texts
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain(sentences, alphabet),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size + 1,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_by_unicode_script=False,
            split_by_number=False,
            split_by_whitespace=False,
            split_digits=False,
            byte_fallback=False,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            max_sentencepiece_length=max_token_length,
            max_sentence_length=1 << 30,
            input_sentence_size=0,
            num_threads=_cores(),
            minloglevel=2,
        )
        return cls.from_bytes(model.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes) -> SentencePieceBackend:
        """Load a serialized model proto."""
        return cls(spm.SentencePieceProcessor(model_proto=data))

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Encode every block in one multi-threaded call, then regroup them per text."""
        blocks = [text.split(BLOCK_SEPARATOR) for text in texts]
        encoded = self._processor.encode(list(itertools.chain.from_iterable(blocks)), num_threads=_cores())
        block_lengths = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
        ids = np.fromiter(itertools.chain.from_iterable(encoded), np.int64, count=int(block_lengths.sum()))
        token_ends = np.concatenate([[0], np.cumsum(block_lengths)])
        text_ends = token_ends[np.cumsum(np.fromiter(map(len, blocks), np.int64, count=len(blocks)))]
        return split_by_counts(ids, np.diff(text_ends, prepend=0))

    def pieces(self) -> list[str | None]:
        """Pieces by id; <unk> and control pieces are not code strings."""
        sp = self._processor
        return [
            None if sp.is_unknown(i) or sp.is_control(i) else sp.id_to_piece(i) for i in range(sp.get_piece_size())
        ]

    def to_bytes(self) -> bytes:
        """The model proto."""
        return self._processor.serialized_model_proto()


def _blocks(texts: list[str]) -> list[str]:
    """All blocks of all texts, as separate strings."""
    return list(itertools.chain.from_iterable(text.split(BLOCK_SEPARATOR) for text in texts))


BACKENDS: dict[str, type[Backend]] = {
    TokenizersBackend.name: TokenizersBackend,
    SentencePieceBackend.name: SentencePieceBackend,
}
