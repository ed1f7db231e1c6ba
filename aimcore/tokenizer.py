"""The LiT text tower's tokenizer: CLIP byte-level BPE (AIMV2_FACTS §2), through the `tokenizers` library.

Contract (what the text tower was trained on): NFC, whitespace collapsed, lower-cased; ids are
`[BOS] + bpe(text) + [EOS]`, truncated so EOS always survives, then padded after EOS to the context length (77).
The tower pools the first EOS, and its attention is causal, so pad ids never reach the pooled vector.

Sources: a checkpoint folder's `tokenizer.json` (the fast-tokenizer file Hugging Face ships) or its
`vocab.json` + `merges.txt` (the CLIP pair). `tokenizers` is imported lazily: only text users need it.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "EmptyTextError", "TextTokenizer", "clean_text"]

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenisation split: specials, contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WS = re.compile(r"\s+")


class EmptyTextError(ValueError):
    """A text with no tokens (empty or only whitespace): refused rather than embedded as BOS+EOS alone."""


def clean_text(text: str) -> str:
    """NFC, collapse whitespace, strip, lower-case: CLIP's text cleaning (ftfy aside)."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()


class TextTokenizer:
    """Texts -> (B, context_length) int64 token ids for the LiT text tower."""

    def __init__(self, tokenizer: Any, *, context_length: int = 77, pad_id: int = 0) -> None:
        self._tok = tokenizer
        # Specials are added here, not by the file's post-processor, so truncation can keep EOS.
        self._tok.no_truncation()
        self._tok.no_padding()
        # User text is never parsed for special tokens: a literal "<|endoftext|>" typed into a query would otherwise
        # become EOS mid-text, and the tower pools the first EOS, so the rest of the text would be silently ignored
        # (prompt injection into the vector). With this flag the literal is BPE-encoded as the characters it is.
        # BOS/EOS are placed by `tokenize` by id, never through the text.
        self._tok.encode_special_tokens = True
        bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
        if bos is None or eos is None:
            raise ValueError(f"the tokenizer has no {BOS_TOKEN} / {EOS_TOKEN} tokens: not a CLIP BPE vocabulary")
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (BOS, one token, EOS), got {context_length}")
        self.bos_id, self.eos_id = int(bos), int(eos)
        self.context_length = context_length
        self.pad_id = pad_id
        self.vocab_size = int(tokenizer.get_vocab_size())

    # ----- construction -----
    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], **kwargs: Any) -> TextTokenizer:
        """CLIP's pipeline over a byte-level vocabulary whose word-final pieces end in `</w>`."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        bpe = models.BPE(dict(vocab), list(merges), unk_token=EOS_TOKEN, end_of_word_suffix="</w>")
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
        return cls(tok, **kwargs)

    @classmethod
    def from_dir(cls, folder: str | Path, *, context_length: int | None = None) -> TextTokenizer:
        """A checkpoint folder's tokenizer: tokenizer.json, else vocab.json + merges.txt. The context length and
        pad token come from tokenizer_config.json when it states them (default 77, pad id 0)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        ctx = context_length or int(cfg.get("model_max_length") or 77)
        if ctx > 10_000:  # transformers writes a huge sentinel when the length is unset
            ctx = 77
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            out = cls(tok, context_length=ctx)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text())
            merges = []
            for line in (folder / "merges.txt").read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#version"):
                    merges.append((parts[0], parts[1]))
            out = cls.from_vocab(vocab, merges, context_length=ctx)
        else:
            raise FileNotFoundError(f"{folder} has no tokenizer.json nor vocab.json + merges.txt")
        pad = cfg.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and out._tok.token_to_id(pad) is not None:
            out.pad_id = int(out._tok.token_to_id(pad))
        return out

    # ----- use -----
    def tokenize(self, text: str) -> list[int]:
        """One text -> [BOS, ..., EOS] (no padding), at most context_length ids; EOS is kept under truncation."""
        cleaned = clean_text(text)
        ids = self._tok.encode(cleaned, add_special_tokens=False).ids if cleaned else []
        if not ids:
            raise EmptyTextError("the text is empty (or only whitespace): nothing to embed")
        return [self.bos_id, *ids[: self.context_length - 2], self.eos_id]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(B,) texts -> (B, context_length) int64, padded with pad_id after EOS."""
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if i not in (self.bos_id, self.eos_id)], skip_special_tokens=True)
