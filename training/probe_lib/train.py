"""Training the attentive probe: AdamW with linear warmup then cosine decay, on cached features or through the trunk.

Both paths draw the same batches (a permutation of the training set seeded per epoch), so with augmentation off
they train the same head up to float rounding: the cache only saves the trunk's repeated work.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimcore import AimModel
from aimcore.heads import AttentionPoolingClassifier
from training.probe_lib.features import trunk_features

__all__ = ["ProbeConfig", "build_head", "epoch_order", "lr_at", "predict", "train_head"]

logger = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """The probe's budget and optimiser. The defaults are a small-scale choice for CPU runs, not the paper's
    ImageNet settings (those are in its appendix, not reproduced here)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # of all optimiser steps
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    linear_bias: bool = False  # the current ml-aim head has none (AIM_FACTS §9.1)
    augment: bool = False  # random resized crop + flip; forces the uncached path
    cache: bool = True  # run the trunk once per image (only without augmentation)
    seed: int = 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def uses_cache(self) -> bool:
        return self.cache and not self.augment

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(step: int, total: int, cfg: ProbeConfig) -> float:
    """Linear warmup from lr/warmup to lr over the first warmup_fraction of steps, then cosine to min_lr."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_head(trunk: AimModel, num_classes: int, cfg: ProbeConfig) -> AttentionPoolingClassifier:
    """The released head layout at the trunk's width and head count. Small linear init, as linear probes use.

    AIMv2 trunk: the same attention pooling over post_trunk_norm(mean of the probe layers), with no BatchNorm (the
    tokens are already RMS-normalised; AIMv2's own pooling head has none) and a bias on the output linear, as in
    AIMv2's released pooling head (AIMV2_FACTS §2)."""
    c = trunk.config
    head = AttentionPoolingClassifier(
        c.embed_dim,
        num_classes,
        c.num_heads,
        linear_bias=cfg.linear_bias or c.is_v2,
        eps=c.norm_eps,
        batch_norm=c.head_batch_norm,
    )
    nn.init.trunc_normal_(head.linear.weight, std=0.01)
    if head.linear.bias is not None:
        nn.init.zeros_(head.linear.bias)
    return head


def epoch_order(n: int, epoch: int, seed: int) -> Tensor:
    """The training order of one epoch: the same for the cached and uncached paths."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _param_groups(head: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on the learned query and biases (vectors); decay on the k, v and linear matrices.
    decay = [p for n, p in head.named_parameters() if p.ndim >= 2 and n != "cls_token"]
    rest = [p for n, p in head.named_parameters() if not (p.ndim >= 2 and n != "cls_token")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_head(
    head: nn.Module,
    batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    cfg: ProbeConfig,
    device: torch.device,
) -> list[dict[str, float]]:
    """Train `head` in place. `batches(epoch)` yields (features (B, ...) float32, labels (B,)): (B, N, D) tokens
    for the attentive head, (B, F) pixels for the linear baseline. Returns per-epoch mean loss, accuracy and lr."""
    head.to(device).train()
    opt = torch.optim.AdamW(_param_groups(head, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    total = cfg.epochs * steps_per_epoch
    step = 0
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for feats, labels in batches(epoch):
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            feats, labels = feats.to(device), labels.to(device)
            logits = head(feats)  # (B, C); BN uses batch statistics and updates its running ones
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
        record = {"epoch": epoch, "loss": loss_sum / seen, "train_top1": correct / seen, "lr": lr}
        history.append(record)
        logger.info(
            "probe epoch %d/%d: loss %.4f, train top-1 %.3f, lr %.2e (%.1f s)",
            epoch + 1,
            cfg.epochs,
            record["loss"],
            record["train_top1"],
            lr,
            time.perf_counter() - start,
        )
    head.eval()
    return history


def trunk_batches(
    trunk: AimModel, loader_for: Callable[[Tensor], torch.utils.data.DataLoader], n: int, cfg: ProbeConfig
) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """The uncached path: `loader_for(order)` gives a loader over images in that order; the trunk runs per batch."""

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in loader_for(epoch_order(n, epoch, cfg.seed)):
            yield trunk_features(trunk, images), torch.as_tensor(labels, dtype=torch.int64)

    return batches


@torch.no_grad()
def predict(head: nn.Module, features: Tensor, device: torch.device, batch_size: int = 512) -> Tensor:
    """(n, ...) cached features -> (n, C) float32 logits on the CPU, head in eval mode (running BN statistics)."""
    head.eval()
    return torch.cat([head(chunk.to(device).float()).float().cpu() for chunk in features.split(batch_size)])
