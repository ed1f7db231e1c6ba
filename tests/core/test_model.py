"""Architecture: reference keys, shapes and parameter counts; attention masks; early exit; sin-cos layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aimcore import (
    AimConfig,
    build_model,
    count_params,
    get_flavor,
    prefix_causal_attn_mask,
    prefix_mask_from_lengths,
    sincos_pos_embed_2d,
)

# AIM_FACTS §5: (width, depth, heads, backbone params, head params with 1000 classes).
REFERENCE = {
    "aim-600M": (1536, 24, 12, 680_535_552, 6_256_128),
    "aim-1B": (2048, 24, 16, 1_209_370_624, 10_438_656),
    "aim-3B": (3072, 24, 24, 2_720_025_600, 21_949_440),
    "aim-7B": (4096, 32, 32, 6_445_404_160, 37_654_528),
}
BEST = {"aim-600M": range(14, 20), "aim-1B": range(12, 18), "aim-3B": range(12, 18), "aim-7B": range(14, 20)}


def reference_keys(dim: int, depth: int, patch: int = 14, classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """The ml-aim v1 state-dict template of AIM_FACTS §1, in order."""
    keys = [
        ("preprocessor.patchifier.proj.weight", (dim, 3, patch, patch)),
        ("preprocessor.patchifier.proj.bias", (dim,)),
        ("preprocessor.patchifier.norm.weight", (dim,)),
        ("preprocessor.patchifier.norm.bias", (dim,)),
    ]
    for i in range(depth):
        p = f"trunk.blocks.{i}."
        keys += [
            (p + "attn.qkv.weight", (3 * dim, dim)),
            (p + "attn.proj.weight", (dim, dim)),
            (p + "norm_1.weight", (dim,)),
            (p + "norm_1.bias", (dim,)),
            (p + "mlp.fc1.weight", (4 * dim, dim)),
            (p + "mlp.fc2.weight", (dim, 4 * dim)),
            (p + "norm_2.weight", (dim,)),
            (p + "norm_2.bias", (dim,)),
        ]
    keys += [
        ("trunk.post_trunk_norm.weight", (dim,)),
        ("trunk.post_trunk_norm.bias", (dim,)),
        ("head.cls_token", (1, 1, dim)),
        ("head.k.weight", (dim, dim)),
        ("head.v.weight", (dim, dim)),
        ("head.linear.weight", (classes, dim)),
        ("head.bn.running_mean", (dim,)),
        ("head.bn.running_var", (dim,)),
        ("head.bn.num_batches_tracked", ()),
    ]
    return keys


@pytest.mark.parametrize("name", list(REFERENCE))
def test_released_flavor_matches_reference_layout(name: str) -> None:
    dim, depth, heads, backbone, head = REFERENCE[name]
    cfg = get_flavor(name)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.head_dim) == (dim, depth, heads, 128)
    assert (cfg.img_size, cfg.patch_size, cfg.num_patches) == (224, 14, 256)
    assert cfg.probe_layers == tuple(BEST[name])
    assert cfg.last_probe_layers == tuple(range(depth - 6, depth))
    model = build_model(cfg, device="meta")
    state = model.state_dict()
    got = [(k, tuple(v.shape)) for k, v in state.items()]
    assert got == reference_keys(dim, depth)
    assert len(state) == (269 if name == "aim-7B" else 205)
    assert state["head.bn.num_batches_tracked"].dtype == torch.int64
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert model.num_params(include_head=False) == backbone
    assert model.num_params() - backbone == head
    counts = count_params(cfg)
    assert (counts.backbone, counts.head) == (backbone, head)


def test_module_semantics_match_reference() -> None:
    model = build_model(get_flavor("aim-debug"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 and m.bias is not None and m.elementwise_affine for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    bn = model.head.bn
    assert not bn.affine and bn.eps == 1e-6
    assert model.head.linear.bias is None
    assert model.preprocessor.patchifier.proj.bias is not None
    # The trunk has no bias anywhere except its LayerNorms.
    for name, _ in model.trunk.named_parameters():
        assert not name.endswith(".bias") or "norm" in name, name
    assert not [n for n, _ in model.named_buffers() if not n.startswith("head.bn")]


def test_sincos_layout_and_values() -> None:
    h, w, dim = 3, 5, 16
    table = sincos_pos_embed_2d(h, w, dim).numpy()
    assert table.shape == (h * w, dim) and table.dtype == np.float32
    q = dim // 4
    omega = 10000.0 ** (-np.arange(q) / q)
    for row in range(h):
        for col in range(w):
            expected = np.concatenate(
                [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
            )
            np.testing.assert_allclose(table[row * w + col], expected, atol=2e-6)


def test_model_adds_the_table_after_the_patch_norm(debug_images: torch.Tensor) -> None:
    model = build_model(get_flavor("aim-debug")).eval()
    pre = model.preprocessor
    with torch.no_grad():
        tokens = pre.patchifier.norm(pre.patchifier.proj(debug_images).flatten(2).transpose(1, 2))
        expected = tokens + sincos_pos_embed_2d(4, 4, 64)
        torch.testing.assert_close(pre(debug_images), expected, rtol=0, atol=0)


def test_non_square_inputs_use_the_real_grid() -> None:
    model = build_model(get_flavor("aim-debug")).eval()
    x = torch.randn(2, 3, 16, 40)  # 2x5 grid
    with torch.no_grad():
        out = model.features(x, outputs=("tokens",)).tokens
    assert out.shape == (2, 10, 64)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.features(torch.randn(1, 3, 30, 32))


def manual_attention(x: torch.Tensor, attn: torch.nn.Module, allowed: torch.Tensor | None) -> torch.Tensor:
    """Independent attention: explicit softmax(QK^T/sqrt(hd)) V with a boolean allow-mask."""
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).split(d, dim=-1)
    q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, d))


def test_prefix_mask_semantics() -> None:
    mask = prefix_mask_from_lengths(torch.tensor([2, 4]), 5)
    assert mask.tolist() == [[False, False, True, True, True], [False, False, False, False, True]]
    allowed = prefix_causal_attn_mask(mask)[:, 0]
    # Sample 0, prefix {0, 1}: prefix queries see both prefix keys and nothing else.
    assert allowed[0, 0].tolist() == [True, True, False, False, False]
    assert allowed[0, 1].tolist() == [True, True, False, False, False]
    # A non-prefix query sees the prefix plus non-prefix keys up to itself.
    assert allowed[0, 3].tolist() == [True, True, True, True, False]
    assert allowed[1, 4].tolist() == [True] * 5


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    model = build_model(get_flavor("aim-debug")).eval()
    attn = model.trunk.blocks[0].attn
    x = torch.randn(2, 16, 64)
    mask = prefix_mask_from_lengths(torch.tensor([3, 9]), 16)
    allowed = prefix_causal_attn_mask(mask)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), manual_attention(x, attn, None), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x, allowed), manual_attention(x, attn, allowed), rtol=1e-5, atol=1e-5)


def test_all_prefix_mask_equals_bidirectional(debug_model, debug_images) -> None:
    mask = torch.zeros(3, 16, dtype=torch.bool)  # every token is prefix
    with torch.no_grad():
        plain = debug_model.features(debug_images)
        masked = debug_model.features(debug_images, mask=mask)
    for a, b in zip(plain.blocks, masked.blocks, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.logits, masked.logits, rtol=0, atol=1e-6)


def test_later_tokens_never_change_earlier_outputs(debug_model) -> None:
    """Perturb the image patch at token t (outside the prefix): outputs at positions < t must not move, while
    positions >= t must (the mask is not trivially blocking everything)."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    prefix = torch.tensor([4, 6])
    mask = prefix_mask_from_lengths(prefix, 16)
    t = 9  # row 2, col 1 of the 4x4 grid
    y = x.clone()
    y[:, :, 16:24, 8:16] += torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = debug_model.features(x, mask=mask, outputs=("tokens", "blocks"))
        b = debug_model.features(y, mask=mask, outputs=("tokens", "blocks"))
    for out_a, out_b in [*zip(a.blocks, b.blocks, strict=True), (a.tokens, b.tokens)]:
        torch.testing.assert_close(out_a[:, :t], out_b[:, :t], rtol=0, atol=0)
        assert (out_a[:, t:] - out_b[:, t:]).abs().amax() > 1e-3
    # Without a mask (bidirectional) the change reaches every position.
    with torch.no_grad():
        full_a = debug_model.features(x, outputs=("tokens",)).tokens
        full_b = debug_model.features(y, outputs=("tokens",)).tokens
    assert (full_a[:, :t] - full_b[:, :t]).abs().amax() > 1e-3


def test_prefix_tokens_ignore_all_non_prefix_tokens(debug_model) -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 3, 32, 32)
    mask = prefix_mask_from_lengths(torch.tensor([8]), 16)  # first two grid rows are the prefix
    y = x.clone()
    y[:, :, 16:, :] = torch.randn(1, 3, 16, 32)  # replace every non-prefix patch
    with torch.no_grad():
        a = debug_model.features(x, mask=mask, outputs=("tokens",)).tokens
        b = debug_model.features(y, mask=mask, outputs=("tokens",)).tokens
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)


def test_features_fields_and_reference_semantics(debug_model, debug_images) -> None:
    with torch.no_grad():
        f = debug_model.features(debug_images)
        assert len(f.blocks) == 4 and all(b.shape == (3, 16, 64) for b in f.blocks)
        torch.testing.assert_close(f.probe_average, (f.blocks[1] + f.blocks[2]) / 2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f.tokens, debug_model.trunk.post_trunk_norm(f.blocks[-1]))
        # Independent head: BN with running stats, one learned query, no q/out projection.
        head = debug_model.head
        x = (f.probe_average - head.bn.running_mean) / torch.sqrt(head.bn.running_var + 1e-6)
        k = head.k(x).view(3, 16, 2, 32).transpose(1, 2)
        v = head.v(x).view(3, 16, 2, 32).transpose(1, 2)
        q = head.cls_token.view(1, 2, 1, 32)
        att = (q @ k.transpose(-1, -2) / math.sqrt(32)).softmax(-1) @ v  # (3, 2, 1, 32)
        pooled = att.transpose(1, 2).reshape(3, 64)
        torch.testing.assert_close(f.pooled, pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.logits, pooled @ head.linear.weight.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(debug_model(debug_images), f.logits, rtol=0, atol=0)


def test_early_exit_runs_fewer_blocks_and_gives_identical_outputs(debug_model, debug_images) -> None:
    ran: list[int] = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, _o, i=i: ran.append(i))
        for i, blk in enumerate(debug_model.trunk.blocks)
    ]
    try:
        with torch.no_grad():
            full = debug_model.features(debug_images)
            ran.clear()
            early = debug_model.features(debug_images, outputs=("probe_average", "pooled", "logits"))
            assert ran == [0, 1, 2]  # probe layers (1, 2): block 3 never runs
            ran.clear()
            debug_model(debug_images)
            assert ran == [0, 1, 2]
    finally:
        for h in hooks:
            h.remove()
    assert early.tokens is None and early.blocks == []
    for name in ("probe_average", "pooled", "logits"):
        torch.testing.assert_close(getattr(early, name), getattr(full, name), rtol=0, atol=0)


def test_embed_pooling_options(debug_model, debug_images) -> None:
    with torch.no_grad():
        f = debug_model.features(debug_images)
        mean = debug_model.embed(debug_images, pooling="mean")
        probe = debug_model.embed(debug_images, pooling="probe", normalize=False)
    torch.testing.assert_close(mean, F.normalize(f.tokens.mean(1), dim=-1))
    torch.testing.assert_close(probe, f.pooled)
    with pytest.raises(ValueError, match="pooling"):
        debug_model.embed(debug_images, pooling="max")


def test_headless_model() -> None:
    model = build_model(get_flavor("aim-debug").replace(num_classes=0)).eval()
    assert model.head is None and not any(k.startswith("head.") for k in model.state_dict())
    with torch.no_grad():
        f = model.features(torch.randn(1, 3, 32, 32))
    assert f.pooled is None and f.logits is None and f.tokens is not None
    with pytest.raises(RuntimeError, match="no classification head"):
        model(torch.randn(1, 3, 32, 32))


def test_config_validation_and_round_trip() -> None:
    cfg = get_flavor("aim-600M")
    assert AimConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.with_probe_layers("last").probe_layers == tuple(range(18, 24))
    assert get_flavor("aim-7B").with_probe_layers("last").probe_layers == tuple(range(26, 32))
    assert get_flavor("aim_600M") == cfg  # ml-aim factory name accepted
    with pytest.raises(ValueError, match="divisible by num_heads"):
        AimConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="block indices"):
        cfg.replace(probe_layers=(30,))
    with pytest.raises(ValueError, match="unknown AimConfig fields"):
        AimConfig.from_dict({"width": 3})
    with pytest.raises(KeyError, match="known flavors"):
        get_flavor("aim-12B")


def test_demo_flavor_is_small() -> None:
    cfg = get_flavor("aim-demo")
    assert 112 <= cfg.img_size <= 224
    assert count_params(cfg).backbone < 10_000_000  # ≤ 25 MB shipped with its head (issue: bundled demo)
