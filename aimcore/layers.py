"""Trunk building blocks with ml-aim v1 / AIMv2 parameter names (AIM_FACTS §1-§3, AIMV2_FACTS §2).

v1 and v2 share every module; `make_norm` and `make_ffn` pick LayerNorm/GELU-MLP (v1) or RMSNorm/SwiGLU (v2).

Shapes: B batch, N tokens (h*w grid in raster order), D width, H heads, hd = D/H.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "PatchEmbed",
    "RMSNorm",
    "SwiGLU",
    "attend",
    "init_linears_and_norms",
    "make_ffn",
    "make_norm",
    "prefix_causal_attn_mask",
    "prefix_mask_from_lengths",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_2d_traced",
]


def sincos_pos_embed_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos table, (h*w, dim) float32 on the CPU.

    Channel layout per token t = row*w + col: [sin(col*ω), cos(col*ω), sin(row*ω), cos(row*ω)], each D/4 wide,
    ω_k = 10000^(-k/(D/4)). Computed in float32 with the same operation order as the reference so the table is
    bit-identical (the reference rebuilds it in float32 on the CPU every forward).
    """
    if dim % 4:
        raise ValueError(f"sin-cos width must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32)
    omega /= quarter
    omega = 1.0 / 10000**omega  # (D/4,)

    def encode(pos: Tensor) -> Tensor:  # (M,) -> (M, D/2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)  # (h*w,) row index of each token
    cols = torch.arange(w, dtype=torch.float32).repeat(h)  # (h*w,) column index of each token
    return torch.cat([encode(cols), encode(rows)], dim=1)


def sincos_pos_embed_2d_traced(h: Any, w: Any, dim: int, device: torch.device) -> Tensor:
    """`sincos_pos_embed_2d` with the grid built by broadcasting instead of repeat/repeat_interleave, so that h and
    w stay symbolic when traced for ONNX (dynamic H x W). The same float32 arithmetic per element."""
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32, device=device)
    omega /= quarter
    omega = 1.0 / 10000**omega  # (D/4,)
    ones = torch.ones(h, w, dtype=torch.float32, device=device)
    rows = (torch.arange(h, dtype=torch.float32, device=device)[:, None] * ones).reshape(-1)  # (h*w,)
    cols = (torch.arange(w, dtype=torch.float32, device=device)[None, :] * ones).reshape(-1)  # (h*w,)
    col_angles, row_angles = cols[:, None] * omega[None, :], rows[:, None] * omega[None, :]
    return torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1)


def init_linears_and_norms(root: nn.Module) -> None:
    """ml-l3m's AIMv1 init for every Linear and LayerNorm under `root`: xavier-uniform weights, zero biases,
    unit/zero norms. Shared by the trunk and the pre-training pixel decoder."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm | nn.RMSNorm):
            nn.init.ones_(module.weight)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, weight only (AIMv2's norm; key `weight`, as
    `nn.RMSNorm`). Written with elementary ops, statistics in float32, because the ONNX exporter has no
    `aten::rms_norm` below opset 23."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., D)
        return (x32 * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A "layernorm" (weight + bias, v1) or "rmsnorm" (weight only, v2)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


class PatchEmbed(nn.Module):
    """Conv patchifier (with bias) + LayerNorm or RMSNorm: (B, C, H, W) -> (B, N, D), tokens in raster order."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, eps: float, norm: str = "layernorm") -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.norm = make_norm(norm, embed_dim, eps)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.ndim != 4 or x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"expected images (B, C, H, W) with H and W multiples of {p}, got {tuple(x.shape)}")
        x = self.proj(x)  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return self.norm(x)


def prefix_mask_from_lengths(prefix_lens: Tensor, num_tokens: int) -> Tensor:
    """(B,) prefix lengths -> (B, N) bool mask in the reference convention: False = prefix, True = non-prefix."""
    positions = torch.arange(num_tokens, device=prefix_lens.device)
    return positions[None, :] >= prefix_lens[:, None]


def prefix_causal_attn_mask(mask: Tensor) -> Tensor:
    """(B, N) bool (True = non-prefix) -> (B, 1, N, N) bool SDPA mask, True = may attend.

    A query may attend to a key when the key is not after it, or when the key is a prefix token. Prefix tokens
    therefore see the whole prefix and never a non-prefix token; an all-False mask is full bidirectional attention.
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"prefix mask must be a (B, N) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device)
    causal = idx[None, :] <= idx[:, None]  # (N_q, N_k): key index <= query index
    key_is_prefix = ~mask[:, None, :]  # (B, 1, N_k)
    return (causal[None] | key_is_prefix)[:, None]  # (B, 1, N_q, N_k)


_COMPILED_FLEX: Any = None


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None) -> Tensor:
    """Scaled dot-product attention over (B, H, N, hd) tensors, dispatched on the mask's type.

    None or a bool tensor (True = may attend) goes to SDPA, as in the reference. A FlexAttention `BlockMask`
    (built by the pre-training code for the prefix-causal mask on CUDA) goes to `flex_attention`, compiled once
    on CUDA unless we are already inside a compiled region (eager flex materialises the full score matrix).
    """
    if attn_mask is None or isinstance(attn_mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if not isinstance(attn_mask, BlockMask):
        raise TypeError(f"attn_mask must be None, a bool tensor or a FlexAttention BlockMask, got {type(attn_mask)}")
    global _COMPILED_FLEX
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention)
        fn = _COMPILED_FLEX
    return fn(q, k, v, block_mask=attn_mask)


class Attention(nn.Module):
    """Multi-head self-attention with one fused, bias-free qkv projection ([q | k | v] rows, head-major)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, attn_mask: Any = None) -> Tensor:
        """attn_mask: None (bidirectional), a (B, 1, N, N) bool SDPA mask, or a FlexAttention BlockMask."""
        b, n, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        out = attend(q, k, v, attn_mask)  # (B, H, N, hd)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class MLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, no biases."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """AIMv2's FFN: fc2(silu(fc1 x) * fc3 x), no biases. fc1 is the gate, fc3 the up projection."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


def make_ffn(kind: str, dim: int, hidden: int) -> nn.Module:
    """A "gelu" (v1 MLP) or "swiglu" (v2)."""
    if kind == "gelu":
        return MLP(dim, hidden)
    if kind == "swiglu":
        return SwiGLU(dim, hidden)
    raise ValueError(f"unknown ffn {kind!r}; expected 'gelu' or 'swiglu'")


class Block(nn.Module):
    """Pre-norm transformer block. Submodules are assigned in the reference order (attn, norm_1, mlp, norm_2)
    so `state_dict()` lists keys in the reference order too."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: int,
        eps: float,
        *,
        norm: str = "layernorm",
        ffn: str = "gelu",
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm_1 = make_norm(norm, dim, eps)
        self.mlp = make_ffn(ffn, dim, hidden or dim * mlp_ratio)
        self.norm_2 = make_norm(norm, dim, eps)

    def forward(self, x: Tensor, attn_mask: Any = None) -> Tensor:
        x = x + self.attn(self.norm_1(x), attn_mask)
        return x + self.mlp(self.norm_2(x))
