"""The LiT tokenizer's contract (CLIP BPE): BOS/EOS placement, truncation keeping EOS, lower-casing, unicode, pad
after EOS, empty texts refused. The vocabulary is built in the test (tests/lit/tokenizer_support.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aimcore.tokenizer import EmptyTextError, TextTokenizer
from tests.lit.tokenizer_support import small_tokenizer, small_vocab

pytest.importorskip("tokenizers")


def test_bos_words_eos_then_padding() -> None:
    tok = small_tokenizer()
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == np.int64
    row = ids[0].tolist()
    words = [tok._tok.id_to_token(i) for i in row[1:6]]
    assert words == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert row[0] == tok.bos_id and row[6] == tok.eos_id
    assert row[7:] == [tok.pad_id] * 70
    assert tok.eos_id == tok.vocab_size - 1  # CLIP's layout: EOS is the last id


def test_lower_case_and_whitespace_are_normalised() -> None:
    tok = small_tokenizer()
    a, b = tok(["A  PHOTO of\ta Cat", "a photo of a cat"])
    assert a.tolist() == b.tolist()


def test_truncation_keeps_eos() -> None:
    tok = small_tokenizer(context_length=8)
    ids = tok(["cat " * 50])[0].tolist()
    assert len(ids) == 8
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == [tok._tok.token_to_id("cat</w>")] * 6
    # Exactly full: no padding and EOS last.
    full = tok(["cat " * 6])[0].tolist()
    assert full[-1] == tok.eos_id and tok.pad_id not in full[1:-1]


def test_unicode_bytes_round_trip() -> None:
    tok = small_tokenizer()
    text = "café ünïcode 東京 🙂"
    ids = tok.tokenize(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids).replace("</w>", " ").split() == text.lower().split()
    # NFC: a decomposed é tokenises like the composed one.
    assert tok.tokenize("cafe\u0301") == tok.tokenize("caf\u00e9")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_texts_are_refused(text: str) -> None:
    with pytest.raises(EmptyTextError):
        small_tokenizer()(["cat", text])


def test_folder_sources_agree(tmp_path) -> None:
    """tokenizer.json and vocab.json + merges.txt give the same ids; tokenizer_config.json sets length and pad."""
    vocab, merges = small_vocab()
    tok = TextTokenizer.from_vocab(vocab, merges)
    a = tmp_path / "a"
    a.mkdir()
    tok._tok.save(str(a / "tokenizer.json"))
    b = tmp_path / "b"
    b.mkdir()
    (b / "vocab.json").write_text(json.dumps(vocab))
    (b / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{x} {y}" for x, y in merges) + "\n")
    (b / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "pad_token": "!"}))
    texts = ["A photo of a DOG.", "sneaker, boot & bag"]
    from_json = TextTokenizer.from_dir(a)(texts)
    from_pair = TextTokenizer.from_dir(b)(texts)
    assert from_json.shape == (2, 77) and from_pair.shape == (2, 16)
    assert from_pair[:, :16].tolist() == np.where(from_json[:, :16] == 0, vocab["!"], from_json[:, :16]).tolist()
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_dir(tmp_path)


def test_special_tokens_typed_in_user_text_are_plain_text() -> None:
    """A literal `<|endoftext|>` in a query must not become EOS (the tower pools the first EOS, so everything after
    it would be dropped from the vector): it is encoded as characters, and the only EOS is the one we place."""
    tok = small_tokenizer()
    for text in ("a cat <|endoftext|> dog", "<|startoftext|>a cat", "a cat<|endoftext|>"):
        row = tok([text])[0].tolist()
        body = row[1 : row.index(tok.eos_id)]
        assert tok.eos_id not in body and tok.bos_id not in body, text
        assert row[0] == tok.bos_id and row.count(tok.eos_id) == 1
    injected = tok(["a cat <|endoftext|> dog"])[0].tolist()
    plain = tok(["a cat"])[0].tolist()
    assert injected != plain  # the words after the literal still reach the tower
