"""Random prefix lengths and the prefix-causal attention mask (AIM_FACTS §3).

Each image gets its own prefix length, uniform in [1, N-1] (ml-l3m's `RandomRasterMasking(prefix_range=(1,
N-1))`, confirmed in ml-aim issue #32). The prefix always starts at token 0.

Unlike ml-l3m, whose mask generator is seeded identically in every rank and data worker (so they all draw the same
prefix sequence), the length here comes from a counter-based generator keyed by (seed, global sample index): every
image of the run has its own draw, whatever the number of ranks and workers, and a resumed run draws exactly what
the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from aimcore.layers import prefix_causal_attn_mask, prefix_mask_from_lengths

__all__ = ["build_attention_mask", "flex_prefix_block_mask", "prefix_mask_from_lengths", "sample_prefix_length"]

# Stream tags keep the prefix draws independent of the augmentation draws made from the same sample index.
PREFIX_STREAM = 0x5052_4546  # "PREF"


def sample_prefix_length(seed: int, sample_index: int, num_tokens: int) -> int:
    """Prefix length of one image: uniform in [1, num_tokens - 1], a pure function of (seed, sample index)."""
    if num_tokens < 2:
        raise ValueError(f"a prefix needs at least 2 tokens, got {num_tokens}")
    rng = np.random.default_rng([seed, PREFIX_STREAM, sample_index])
    return int(rng.integers(1, num_tokens))  # high is exclusive: [1, N-1]


def flex_prefix_block_mask(prefix_lens: Tensor, num_tokens: int) -> Any:
    """FlexAttention BlockMask for the prefix-causal rule, one per batch (prefix_lens: (B,) int on the device).

    Predicate (same as the SDPA mask): key index <= query index, or the key lies inside the sample's prefix.
    Broadcast over heads (H=None); built once per step and shared by every block.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    lens = prefix_lens.to(torch.int32)

    def prefix_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) | (kv_idx < lens[b])

    return create_block_mask(
        prefix_causal, B=lens.shape[0], H=None, Q_LEN=num_tokens, KV_LEN=num_tokens, device=lens.device
    )


def build_attention_mask(prefix_lens: Tensor, num_tokens: int, kernel: str) -> tuple[Tensor, Any]:
    """(B,) prefix lengths -> ((B, N) bool mask with True = non-prefix, the mask the attention kernel takes).

    kernel "sdpa": a (B, 1, N, N) bool tensor (True = may attend); "flex": a FlexAttention BlockMask.
    """
    mask = prefix_mask_from_lengths(prefix_lens, num_tokens)  # (B, N)
    if kernel == "flex":
        return mask, flex_prefix_block_mask(prefix_lens, num_tokens)
    if kernel == "sdpa":
        return mask, prefix_causal_attn_mask(mask)
    raise ValueError(f"attention kernel must be 'sdpa' or 'flex', got {kernel!r}")
