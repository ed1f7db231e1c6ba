"""AdamW with AIM's weight-decay exclusions and the warmup + cosine schedule as a pure function (AIM_FACTS §7).

ml-l3m excludes from weight decay every parameter whose name matches `*bias*`, `*pos_embed*`, `*norm*` or
`*gamma*`. We apply the same name rule, and also exclude any parameter with fewer than 2 dimensions so a renamed
norm or bias can never slip into the decayed group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["build_optimizer", "lr_at", "no_decay", "param_groups", "set_lr", "warmup_steps"]

logger = logging.getLogger(__name__)

NO_DECAY_PATTERNS = ("bias", "pos_embed", "norm", "gamma")


def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(pattern in name for pattern in NO_DECAY_PATTERNS)


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (matrices and the patch conv) and not decayed (norms, biases, position tables)."""
    decay, keep = [], []
    decay_names, keep_names = [], []
    for name, param in named:
        if not param.requires_grad:
            continue
        if no_decay(name, param):
            keep.append(param)
            keep_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    logger.debug("weight decay on %d tensors, none on %d: %s", len(decay_names), len(keep_names), keep_names)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": keep, "weight_decay": 0.0, "group": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, fused: bool
) -> torch.optim.AdamW:
    """AdamW over `model.named_parameters()`; `fused` uses the single-kernel CUDA implementation."""
    groups = param_groups(model.named_parameters(), weight_decay)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return round(total_steps * warmup_fraction)


def lr_at(
    step: int,
    *,
    total_steps: int,
    peak_lr: float,
    warmup_fraction: float = 0.025,
    warmup_init_lr: float = 1e-6,
    end_lr: float = 0.0,
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from `warmup_init_lr` to `peak_lr` over the
    first `round(warmup_fraction * total_steps)` steps, then a half cosine from `peak_lr` to `end_lr` reached at
    `total_steps`. Pure: the whole schedule state is the step number."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warm = warmup_steps(total_steps, warmup_fraction)
    if step < warm:
        return warmup_init_lr + (peak_lr - warmup_init_lr) * step / warm
    decay_steps = max(total_steps - warm, 1)
    progress = min((step - warm) / decay_steps, 1.0)
    return end_lr + 0.5 * (peak_lr - end_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
