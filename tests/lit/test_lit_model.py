"""The LiT model against transformers' `Aimv2Model` (random weights from a small config, text tower forced causal
as in Apple's code), the Apple <-> transformers round trip, and loading with no config."""

from __future__ import annotations

import json

import pytest
import torch

from aimcore.lit import build_lit_model, get_lit_flavor
from aimcore.lit_layouts import lit_config_to_hf, lit_from_transformers, lit_to_transformers
from aimcore.lit_sources import is_lit_source, load_lit_model, save_lit_checkpoint

transformers = pytest.importorskip("transformers")

CFG = get_lit_flavor("aimv2-lit-debug")


def _oracle(seed: int = 0):
    """A transformers Aimv2Model with random (non-trivial) weights; its text attention made causal."""
    torch.manual_seed(seed)
    config = transformers.Aimv2Config(**lit_config_to_hf(CFG))
    config._attn_implementation = "eager"
    hf = transformers.Aimv2Model(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "logit_scale":
                p.fill_(2.0)  # inside the clamp, so the logits test sees a real scale
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    # transformers 5.24 runs the text tower bidirectionally (is_causal False, no mask); Apple's is causal.
    for layer in hf.text_model.encoder.layers:
        layer.attention.is_causal = True
    return hf


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, CFG.vision.img_size, CFG.vision.img_size, generator=g)
    t = CFG.text
    ids = torch.randint(0, t.eos_token_id - 1, (4, t.context_length), generator=g)
    for row, length in enumerate((3, 7, t.context_length - 1, 1)):  # EOS at several places, padding after it
        ids[row, length] = t.eos_token_id
        ids[row, length + 1 :] = 0
    return pixels, ids


def _causal_hf_text(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers' text features with an explicit causal mask (SDPA/eager drop is_causal when mask is None)."""
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    x = hf.text_model.embeddings(ids)
    for layer in hf.text_model.encoder.layers:
        x = layer(x, attention_mask=mask)
        x = x[0] if isinstance(x, tuple) else x
    x = hf.text_model.rms_norm(x)
    eos = (ids == CFG.text.eos_token_id).int().argmax(-1)
    return hf.text_projection(x[torch.arange(len(ids)), eos])


def test_embeddings_and_logits_match_transformers() -> None:
    hf = _oracle()
    ours = build_lit_model(CFG, init=False)
    ours.load_state_dict(lit_from_transformers(hf.state_dict()), strict=True)
    pixels, ids = _inputs()
    with torch.no_grad():
        img_ref = hf.get_image_features(pixel_values=pixels).pooler_output
        txt_ref = _causal_hf_text(hf, ids)
        img, txt = ours.encode_image(pixels), ours.encode_text(ids)
        per_image, per_text = ours(pixels, ids)
    scale = img_ref.abs().max()
    assert (img - img_ref).abs().max() <= 2e-5 * max(1.0, float(scale))
    assert (txt - txt_ref).abs().max() <= 2e-5 * max(1.0, float(txt_ref.abs().max()))
    ref_logits = float(torch.tensor(2.0).exp()) * (
        torch.nn.functional.normalize(img_ref, dim=-1) @ torch.nn.functional.normalize(txt_ref, dim=-1).t()
    )
    assert torch.allclose(per_image, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(per_text, per_image.t())
    assert float(ours.logit_scale.detach()) == pytest.approx(float(torch.tensor(2.0).exp()))


def test_text_tower_is_causal_not_bidirectional() -> None:
    """Changing a token after EOS changes nothing; the uncorrected transformers tower disagrees with us."""
    hf = _oracle()
    ours = build_lit_model(CFG, init=False)
    ours.load_state_dict(lit_from_transformers(hf.state_dict()), strict=True)
    _, ids = _inputs()
    altered = ids.clone()
    altered[0, 5:] = 7  # row 0 has EOS at 3
    with torch.no_grad():
        assert torch.equal(ours.encode_text(ids)[0], ours.encode_text(altered)[0])
        for layer in hf.text_model.encoder.layers:
            layer.attention.is_causal = False
        bidirectional = hf.get_text_features(input_ids=ids).pooler_output
        assert (bidirectional - ours.encode_text(ids)).abs().max() > 1e-3


def test_logit_scale_is_clamped() -> None:
    model = build_lit_model(CFG)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
        assert float(model.logit_scale) == pytest.approx(100.0)
        model.log_logit_scale.fill_(-3.0)
        assert float(model.logit_scale) == 1.0


def test_apple_transformers_round_trip_is_identical() -> None:
    model = build_lit_model(CFG)
    apple = model.state_dict()
    hf_sd = lit_to_transformers(apple)
    hf = transformers.Aimv2Model(transformers.Aimv2Config(**lit_config_to_hf(CFG)))
    assert set(hf_sd) == set(hf.state_dict())  # every transformers key, nothing else
    back = lit_from_transformers(hf_sd)
    assert set(back) == set(apple) and all(torch.equal(back[k], apple[k]) for k in apple)


def test_loads_transformers_folder_with_no_config_argument(tmp_path) -> None:
    hf = _oracle()
    hf.save_pretrained(tmp_path / "hf")
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert data["model_type"] == "aimv2" and "text_config" in data
    assert is_lit_source(tmp_path / "hf")
    model = load_lit_model(tmp_path / "hf")
    pixels, ids = _inputs()
    with torch.no_grad():
        assert torch.allclose(
            model.encode_image(pixels), hf.get_image_features(pixel_values=pixels).pooler_output, atol=2e-5
        )
        assert torch.allclose(model.encode_text(ids), _causal_hf_text(hf, ids), atol=2e-5)
    # Our own Apple-layout file round-trips bit for bit.
    path = save_lit_checkpoint(model, tmp_path / "ours" / "lit.safetensors")
    again = load_lit_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_flat_remote_code_config_is_not_lit(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "aimv2", "hidden_size": 1024}))
    assert not is_lit_source(tmp_path)


def test_released_lit_shapes() -> None:
    """aimv2-large-patch14-224-lit (AIMV2_FACTS §2), on the meta device: Apple's keys and shapes."""
    sd = build_lit_model("aimv2-large-patch14-224-lit", device="meta", init=False).state_dict()
    assert sd["image_encoder.preprocessor.pos_embed"].shape == (1, 256, 1024)
    assert sd["image_encoder.trunk.blocks.23.mlp.fc1.weight"].shape == (2816, 1024)
    assert sd["image_encoder.head.linear.bias"].shape == (1024,) and "image_encoder.head.bn" not in str(list(sd))
    assert sd["text_encoder.preprocessor.text_embedding.weight"].shape == (49408, 768)
    assert sd["text_encoder.preprocessor.positional_embedding"].shape == (77, 768)
    assert sd["text_encoder.trunk.blocks.11.mlp.fc2.weight"].shape == (768, 2048)
    assert sd["image_projector.weight"].shape == (768, 1024) and sd["text_projector.weight"].shape == (768, 768)
    assert sd["log_logit_scale"].shape == ()
    assert not any(k.startswith("text_encoder.trunk.blocks.12.") for k in sd)


def test_hub_id_offline_names_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("huggingface_hub")
    from aimcore import ModelUnavailableError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="aimv2-large-patch14-224-lit"):
        load_model("apple/aimv2-large-patch14-224-lit")
