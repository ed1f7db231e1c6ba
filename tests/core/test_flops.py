"""Analytic parameter and FLOP counts against PyTorch's own counters."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aimcore import build_model, count_flops, count_params, flavor_names, get_flavor


@pytest.mark.parametrize("name", flavor_names())
def test_param_counts_match_the_module(name: str) -> None:
    cfg = get_flavor(name)
    model = build_model(cfg, device="meta")
    counts = count_params(cfg)
    assert counts.backbone == model.num_params(include_head=False)
    assert counts.total == model.num_params()


def measured_flops(model: torch.nn.Module, x: torch.Tensor, **kwargs: object) -> int:
    # The math SDPA backend runs attention as plain matmuls, which the counter sees (the fused CPU kernel it
    # does not count).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.features(x, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("outputs", [None, ("logits",)], ids=["full", "early-exit"])
def test_forward_flops_match_torch_counter(outputs) -> None:
    cfg = get_flavor("aim-debug")
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    got = measured_flops(model, x, outputs=outputs)
    blocks = None if outputs is None else max(cfg.probe_layers) + 1
    expected = count_flops(cfg, blocks=blocks).forward * 2
    assert got == expected


def test_released_sizes_are_plausible() -> None:
    f600 = count_flops(get_flavor("aim-600M"))
    # Trunk forward ≈ 2 · params · tokens for a ViT at 256 tokens, plus attention.
    approx = 2 * count_params(get_flavor("aim-600M")).backbone * 256
    assert 0.95 < f600.forward / approx < 1.1
    early = count_flops(get_flavor("aim-600M"), blocks=20)
    assert early.trunk / f600.trunk == pytest.approx(20 / 24)
    # The pre-training decoder is 12 blocks at width 2048: ~0.41 B parameters (AIM_FACTS §7).
    assert 0.40e9 < count_params(get_flavor("aim-600M")).decoder < 0.42e9
    assert f600.pretrain_step == 3 * (f600.patch_embed + f600.trunk + f600.decoder)
