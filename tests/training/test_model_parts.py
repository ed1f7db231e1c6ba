"""Prefix sampling, attention masks (SDPA vs FlexAttention), the pixel head and the optimizer schedule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from aimcore import count_params, get_flavor, prefix_causal_attn_mask
from training.decoder import DecoderBlock, PretrainModel, build_pretrain_model
from training.distributed import apply_activation_checkpointing, apply_compile
from training.loss import pixel_loss
from training.masking import build_attention_mask, prefix_mask_from_lengths, sample_prefix_length
from training.optim import build_optimizer, lr_at, no_decay, warmup_steps

DEBUG = get_flavor("aim-debug").replace(num_classes=0)


# ----- prefix lengths and masks -----
def test_prefix_lengths_cover_1_to_n_minus_1_uniformly_and_deterministically() -> None:
    n = 16
    draws = [sample_prefix_length(7, s, n) for s in range(6000)]
    assert min(draws) == 1 and max(draws) == n - 1
    counts = np.bincount(draws, minlength=n)[1:]
    assert counts.min() > 6000 / 15 * 0.75  # roughly uniform over the 15 values
    assert draws[:50] == [sample_prefix_length(7, s, n) for s in range(50)]  # a pure function of (seed, sample)
    assert draws[:50] != [sample_prefix_length(8, s, n) for s in range(50)]


def test_sdpa_mask_is_aimcores_prefix_causal_rule() -> None:
    lens = torch.tensor([1, 5, 15])
    mask, attn = build_attention_mask(lens, 16, "sdpa")
    assert mask.tolist() == prefix_mask_from_lengths(lens, 16).tolist()
    assert not mask[1, :5].any() and mask[1, 5:].all()  # False = prefix, True = non-prefix
    assert torch.equal(attn, prefix_causal_attn_mask(mask))


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex on the CPU warns that it is unfused; expected
def test_flex_attention_matches_sdpa_through_the_whole_model_forward() -> None:
    """FlexAttention runs forward only on the CPU in torch 2.13; the same trunk + head with either mask agrees."""
    torch.manual_seed(0)
    model = build_pretrain_model(DEBUG, decoder_style="l3m", decoder_eps=1e-5, seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    lens = torch.tensor([1, 6, 15])
    _, sdpa = build_attention_mask(lens, 16, "sdpa")
    _, flex = build_attention_mask(lens, 16, "flex")
    with torch.no_grad():
        torch.testing.assert_close(model(x, flex), model(x, sdpa), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_attention_matches_sdpa_forward_and_backward_on_cuda() -> None:
    cfg = get_flavor("aim-demo").replace(num_classes=0)
    model = build_pretrain_model(cfg, decoder_style="l3m", decoder_eps=1e-5, seed=0).cuda()
    x = torch.randn(4, 3, cfg.img_size, cfg.img_size, device="cuda")
    lens = torch.tensor([1, 20, 40, 63], device="cuda")
    outs, grads = [], []
    for kernel in ("sdpa", "flex"):
        model.zero_grad()
        _, attn = build_attention_mask(lens, cfg.num_patches, kernel)
        out = model(x, attn)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(model.aim.trunk.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)


# ----- pixel head -----
def test_head_shapes_keys_and_parameter_count() -> None:
    model = PretrainModel(DEBUG)
    model.init_weights()
    out = model(torch.randn(2, 3, 32, 32), None)
    assert out.shape == (2, 16, 8 * 8 * 3)
    keys = list(model.state_dict())
    assert not any("pos_embed" in k for k in keys)  # the fixed tables are neither parameters nor buffers
    assert {k[4:] for k in keys if k.startswith("aim.")} == set(model.aim.state_dict())
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    assert decoder_params == count_params(DEBUG).decoder  # aimcore counts the l3m form: two LayerNorms a block


def test_released_head_is_twelve_blocks_at_2048_with_588_outputs() -> None:
    cfg = get_flavor("aim-600M")
    with torch.device("meta"):
        model = PretrainModel(cfg)
    dec = model.decoder
    assert len(dec.decoder_blocks) == 12 and dec.decoder_projection.out_features == 2048
    assert dec.decoder_projection.bias is not None and dec.decoder_pred.bias is not None
    assert dec.decoder_pred.out_features == 588
    assert dec.decoder_blocks[0].mlp.fc1.out_features == 8192 and dec.decoder_blocks[0].mlp.fc1.bias is None
    assert sum(p.numel() for p in dec.parameters()) == pytest.approx(0.41e9, rel=0.02)  # AIM_FACTS §7


def test_decoder_block_forms() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    l3m, plain = DecoderBlock(16, 4, 1e-5, "l3m"), DecoderBlock(16, 4, 1e-5, "plain")
    plain.load_state_dict({k: v for k, v in l3m.state_dict().items() if not k.startswith("norm_1")})
    y = x + l3m.norm_1(x)  # identity attention branch, then the MLP branch
    torch.testing.assert_close(l3m(x), y + l3m.mlp(l3m.norm_2(y)))
    torch.testing.assert_close(plain(x), x + plain.mlp(plain.norm_2(x)))


# ----- optimizer and schedule -----
def test_schedule_warmup_then_cosine_to_zero() -> None:
    total, peak = 1000, 1e-3
    warm = warmup_steps(total, 0.025)
    assert warm == 25
    assert lr_at(0, total_steps=total, peak_lr=peak) == pytest.approx(1e-6)
    assert lr_at(12, total_steps=total, peak_lr=peak) == pytest.approx(1e-6 + (peak - 1e-6) * 12 / 25)
    assert lr_at(warm, total_steps=total, peak_lr=peak) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, total_steps=total, peak_lr=peak) == pytest.approx(peak / 2, rel=5e-3)
    assert lr_at(total, total_steps=total, peak_lr=peak) == pytest.approx(0.0, abs=1e-15)
    lrs = [lr_at(s, total_steps=total, peak_lr=peak) for s in range(total)]
    assert all(a < b for a, b in itertools.pairwise(lrs[: warm + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[warm:]))
    assert lr_at(total - 1, total_steps=total, peak_lr=peak) == pytest.approx(peak * (1 - math.cos(math.pi / 975)) / 2)


def test_weight_decay_only_on_matrices() -> None:
    model = PretrainModel(DEBUG)
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    keep = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert "aim.preprocessor.patchifier.proj.weight" in decay and "decoder.decoder_pred.weight" in decay
    assert all(("norm" in n or "bias" in n) for n in keep)
    assert {"aim.trunk.post_trunk_norm.weight", "decoder.decoder_projection.bias"} <= keep
    assert decay | keep == set(names.values()) and not decay & keep
    assert no_decay("x.pos_embed", torch.zeros(4, 4)) and no_decay("w", torch.zeros(4))


# ----- wrappers applied from outside the model -----
def _grads_and_keys(wrap: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask, attn = build_attention_mask(torch.tensor([1, 3, 8, 15]), 16, "sdpa")
    model = build_pretrain_model(DEBUG, decoder_style="l3m", decoder_eps=1e-5, seed=0)
    if "ac" in wrap:
        apply_activation_checkpointing(model.blocks())
    if "compile" in wrap:
        apply_compile(model.blocks(), backend="eager")  # dynamo tracing without needing inductor's C++ build
    pixel_loss(model(x, attn), x, mask, 8).backward()
    return {n: p.grad for n, p in model.named_parameters()}, list(model.state_dict())


def test_activation_checkpointing_recomputes_bit_identically_and_keeps_keys() -> None:
    (plain, keys), (ac, ac_keys) = _grads_and_keys("none"), _grads_and_keys("ac")
    assert keys == ac_keys
    for name, grad in plain.items():
        assert torch.equal(ac[name], grad), name


@pytest.mark.slow
def test_compiled_blocks_trace_with_activation_checkpointing_and_keep_keys() -> None:
    (plain, keys), (compiled, compiled_keys) = _grads_and_keys("none"), _grads_and_keys("ac+compile")
    assert keys == compiled_keys
    for name, grad in plain.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7)
