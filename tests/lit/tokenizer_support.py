"""A small CLIP-style BPE vocabulary built in the test (no download): the 256 byte-level symbols, each also as a
word-final `</w>` piece, a few merges that spell test words, and the two specials last, as in CLIP."""

from __future__ import annotations

from aimcore.tokenizer import BOS_TOKEN, EOS_TOKEN, TextTokenizer

WORDS = ("cat", "dog", "photo", "of", "a", "shoe", "bag", "coat", "trouser", "sneaker", "dress", "shirt", "boot")


def small_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merged = piece + right
            if merged not in vocab:
                merges.append((piece, right))
                vocab[merged] = len(vocab)
            piece = merged
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def small_tokenizer(context_length: int = 77) -> TextTokenizer:
    vocab, merges = small_vocab()
    return TextTokenizer.from_vocab(vocab, merges, context_length=context_length)
