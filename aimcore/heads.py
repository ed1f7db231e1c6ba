"""The attention-pooling classifier ("attentive probe") in ml-aim v1's layout (AIM_FACTS §1, §2).

For AIMv2 the same head runs without BatchNorm (AIMV2_FACTS §2: AIMv2's pooling head has none; its input is
already RMS-normalised by `post_trunk_norm`) and with a bias on the output linear, as in AIMv2's released head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionPoolingClassifier"]


class AttentionPoolingClassifier(nn.Module):
    """BatchNorm (affine=False) -> one learned query attending over k/v projections -> linear.

    Input (B, N, D) is the average of the probe layers' raw outputs. There is no query or output projection: the
    query is `cls_token` itself, split into the trunk's H heads.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_heads: int,
        linear_bias: bool = False,
        eps: float = 1e-6,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=linear_bias)
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=eps) if batch_norm else None
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def pool(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, D), the vector the linear layer classifies."""
        b, n, d = x.shape
        h = self.num_heads
        if self.bn is not None:
            x = self.bn(x.transpose(-2, -1)).transpose(-2, -1)  # statistics per channel over batch and tokens
        q = self.cls_token.expand(b, -1, -1).reshape(b, 1, h, d // h).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k(x).reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, N, hd)
        v = self.v(x).reshape(b, n, h, d // h).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, hd)
        pooled = pooled.transpose(1, 2).reshape(b, 1, d)  # (B, 1, D)
        return pooled.mean(dim=1)  # one query; the mean keeps the reference's average_pool semantics

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.pool(x))
