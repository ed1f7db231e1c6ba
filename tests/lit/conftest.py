"""LiT fixtures: a debug-size LiT model fine-tuned for a few CPU seconds so each Fashion-MNIST test image is the
nearest neighbour of its caption, saved as a checkpoint folder with a tokenizer built in the test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aimcore import preprocess
from aimcore.lit import LitConfig, TextConfig, build_lit_model, get_lit_flavor
from aimcore.lit_sources import save_lit_checkpoint
from service.backends.lit_backend import lit_preprocess_config
from tests.lit.tokenizer_support import small_tokenizer

FASHION = Path(__file__).resolve().parents[1] / "assets" / "fashion_mnist"


def caption(cls: str) -> str:
    return "a photo of a " + cls.replace("_", " ")


def fashion_pairs() -> list[tuple[str, Path]]:
    """One image per class (the first of each), with its class name."""
    seen: dict[str, Path] = {}
    for p in sorted(FASHION.glob("*.png")):
        seen.setdefault(p.name.split("__")[0], p)
    return sorted(seen.items())


@pytest.fixture(scope="session")
def lit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LiT checkpoint folder (lit.safetensors + tokenizer.json), contrastively fine-tuned on 10 caption/image
    pairs until every caption retrieves its own image (checked here, so a failing test is about the service)."""
    tok = small_tokenizer(context_length=16)
    base = get_lit_flavor("aimv2-lit-debug")
    cfg = LitConfig(
        "aimv2-lit-test",
        base.vision,
        dataclasses.replace(base.text, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, context_length=16),
        projection_dim=base.projection_dim,
    )
    assert isinstance(cfg.text, TextConfig)
    torch.manual_seed(0)
    model = build_lit_model(cfg)
    pairs = fashion_pairs()
    prep = lit_preprocess_config(model)
    pixels = torch.from_numpy(np.stack([preprocess(Image.open(p), prep) for _, p in pairs]))  # (10, 3, S, S)
    ids = torch.from_numpy(tok([caption(c) for c, _ in pairs]))  # (10, 16)
    # Built so that it holds, not trained (this shared CPU runs a training step in ~0.2 s): random towers, then
    # each projector solved by least squares so image i and caption i both project onto the same random unit
    # target t_i (10 orthonormal targets in 32 dims): every caption's nearest image is its own.
    with torch.no_grad():
        img_feats = model.image_encoder.features(pixels, outputs=("logits",)).logits.double()  # (10, Dv)
        txt_feats = model.text_encoder(ids).double()  # (10, Dt)
        targets = torch.linalg.qr(torch.randn(cfg.projection_dim, len(pairs), dtype=torch.float64))[0].t()  # (10, P)
        for proj, feats in ((model.image_projector, img_feats), (model.text_projector, txt_feats)):
            proj.weight.copy_((torch.linalg.pinv(feats) @ targets).t().float())  # (P, D): feats @ W.T = targets
        per_image, _ = model(pixels, ids)
    target = torch.arange(len(pairs))
    assert torch.equal(per_image.argmax(0), target), "the constructed model does not separate the captions"
    folder = tmp_path_factory.mktemp("lit") / "aimv2-lit-test"
    save_lit_checkpoint(model, folder / "lit.safetensors")
    tok._tok.save(str(folder / "tokenizer.json"))
    return folder
