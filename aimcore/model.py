"""AimModel: preprocessor (patchifier + position table), trunk, optional attention-pooling head.

One definition for both families (`config.family`): AIM v1 (LayerNorm, GELU MLP, fixed sin-cos) and AIMv2 (RMSNorm,
SwiGLU, learned `preprocessor.pos_embed`, or the sin-cos table of the input's own grid for the native encoder).
Parameter names are exactly ml-aim's (`preprocessor.patchifier.*`, `preprocessor.pos_embed`, `trunk.blocks.{i}.*`,
`trunk.post_trunk_norm.*`, `head.*`), so released v1 and v2 checkpoints load strictly with no renaming.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimcore.config import AimConfig
from aimcore.heads import AttentionPoolingClassifier
from aimcore.layers import (
    Block,
    PatchEmbed,
    init_linears_and_norms,
    make_norm,
    prefix_causal_attn_mask,
    sincos_pos_embed_2d,
    sincos_pos_embed_2d_traced,
)
from aimcore.preprocess import PreprocessConfig, default_preprocess_config
from aimcore.preprocess import preprocess as preprocess_image

__all__ = ["FEATURE_OUTPUTS", "AimFeatures", "AimModel", "build_model"]

FEATURE_OUTPUTS = ("blocks", "probe_average", "tokens", "pooled", "logits")


@dataclass
class AimFeatures:
    """What `AimModel.features` computed. Fields that were not asked for (or need a missing head) are None.

    blocks: raw outputs of every block that ran, each (B, N, D), before any norm.
    probe_average: mean of the probe layers' raw outputs, (B, N, D): what the head consumes. For AIMv2 it is
        post_trunk_norm of that mean: AIMv2's pooling head reads normed tokens and has no BatchNorm of its own.
    tokens: post_trunk_norm of the last block, (B, N, D) (transformers' `last_hidden_state` for AIMv2).
    pooled: the head's attention-pooled vector, (B, D), the input of its linear.
    logits: (B, num_classes).
    """

    blocks: list[Tensor] = field(default_factory=list)
    probe_average: Tensor | None = None
    tokens: Tensor | None = None
    pooled: Tensor | None = None
    logits: Tensor | None = None


class Preprocessor(nn.Module):
    """Patch embedding plus the position table.

    v1 and native v2: the fixed 2D sin-cos table of the input's grid (not a parameter or buffer: no state-dict key).
    Fixed-resolution v2: the learned `pos_embed` parameter (1, N, D); any other grid is refused, never sliced.
    """

    def __init__(self, config: AimConfig) -> None:
        super().__init__()
        self.config = config
        self.patchifier = PatchEmbed(
            config.patch_size, config.num_channels, config.embed_dim, config.norm_eps, norm=config.norm
        )
        self.embed_dim = config.embed_dim
        self.pos_embed: nn.Parameter | None = None
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.embed_dim))
        self._pos_cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def position_table(self, h: int, w: int, device: torch.device) -> Tensor:
        """(h*w, D) table added to the patch tokens of an h x w grid."""
        if self.pos_embed is not None:
            return self.pos_embed[0]
        if torch.jit.is_tracing():
            # ONNX export of a native model with a dynamic H x W: build the table in the graph from the traced
            # grid sizes (a cached table would be baked in as a constant of the example's grid).
            return sincos_pos_embed_2d_traced(h, w, self.embed_dim, device)
        key = (h, w, device)
        table = self._pos_cache.get(key)
        if table is None:
            table = sincos_pos_embed_2d(h, w, self.embed_dim).to(device)  # (h*w, D) float32
            self._pos_cache[key] = table
        return table

    def forward(self, x: Tensor) -> Tensor:
        p = self.patchifier.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if x.ndim == 4 and not (x.shape[-2] % p or x.shape[-1] % p):
            self.config.check_grid(h, w)
        tokens = self.patchifier(x)  # (B, N, D)
        pos = self.position_table(h, w, tokens.device)
        return tokens + pos.to(tokens.dtype)


class Trunk(nn.Module):
    def __init__(self, config: AimConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                config.norm_eps,
                norm=config.norm,
                ffn=config.ffn,
                hidden=config.hidden_dim,
            )
            for _ in range(config.depth)
        )
        self.post_trunk_norm = make_norm(config.norm, config.embed_dim, config.norm_eps)


class AimModel(nn.Module):
    """An AIM v1 or AIMv2 model. `model(x)` returns logits like the v1 reference; `features()` returns everything
    else; `preprocess(image)` applies the preprocessing this model's checkpoint carries."""

    def __init__(self, config: AimConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config)
        self.trunk = Trunk(config)
        self.head: AttentionPoolingClassifier | None = None
        if config.has_head:
            self.head = AttentionPoolingClassifier(
                config.embed_dim,
                config.num_classes,
                config.num_heads,
                linear_bias=config.head_linear_bias,
                eps=config.norm_eps,
                batch_norm=config.head_batch_norm,
            )
        # What `preprocess()` applies; loaders replace it with what the checkpoint carries.
        self.preprocess_config: PreprocessConfig = default_preprocess_config(config)

    # ----- init -----
    def init_weights(self) -> None:
        """Fresh-model init for pre-training: xavier-uniform linears (the patch conv treated as a linear over a
        flattened patch), unit/zero norms, as in ml-l3m's AIMv1 recipe."""
        init_linears_and_norms(self)
        proj = self.preprocessor.patchifier.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.preprocessor.pos_embed is not None:
            nn.init.trunc_normal_(self.preprocessor.pos_embed, std=0.02)
        if self.head is not None:
            nn.init.trunc_normal_(self.head.cls_token, std=0.02)

    # ----- forward paths -----
    def _last_block_needed(self, outputs: frozenset[str]) -> int:
        if outputs & {"tokens", "blocks"}:
            return self.config.depth - 1
        return max(self.config.probe_layers)

    def features(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        outputs: Iterable[str] | None = None,
        *,
        attn_mask: Any = None,
    ) -> AimFeatures:
        """Run the model on normalised images x (B, C, H, W).

        mask: optional (B, N) bool prefix mask (False = prefix, True = non-prefix) for prefix-causal attention;
        None is bidirectional attention, as at inference.
        outputs: the subset of FEATURE_OUTPUTS wanted (default: all). When neither "tokens" nor "blocks" is
        asked for, the trunk stops after the last probe layer: the blocks after it cannot change the head.
        attn_mask: optional prebuilt attention mask shared by every block, used instead of `mask` (give one or the
        other): a (B, 1, N, N) bool SDPA mask or a FlexAttention BlockMask (pre-training builds it once per step).
        """
        wanted = frozenset(FEATURE_OUTPUTS if outputs is None else outputs)
        unknown = wanted - set(FEATURE_OUTPUTS)
        if unknown:
            raise ValueError(f"unknown feature outputs {sorted(unknown)}; choose from {FEATURE_OUTPUTS}")
        if self.head is None:
            wanted -= {"pooled", "logits"}
        if attn_mask is not None and mask is not None:
            raise ValueError("pass either mask or attn_mask, not both")
        if mask is not None:
            attn_mask = prefix_causal_attn_mask(mask.to(x.device))

        h = self.preprocessor(x)  # (B, N, D)
        last = self._last_block_needed(wanted)
        probe = set(self.config.probe_layers)
        need_probe = bool(wanted & {"probe_average", "pooled", "logits"})
        keep_all = "blocks" in wanted
        result = AimFeatures()
        probe_outputs: dict[int, Tensor] = {}
        for i, block in enumerate(self.trunk.blocks[: last + 1]):
            h = block(h, attn_mask)
            if keep_all:
                result.blocks.append(h)
            if need_probe and i in probe:
                probe_outputs[i] = h
        if need_probe:
            # Stack on a new last axis and mean over it, as the reference's AverageLayers does, so the reduction
            # order (and so every float32 bit) matches: (B, N, D, L) -> (B, N, D).
            stacked = torch.stack([probe_outputs[i] for i in self.config.probe_layers], dim=-1)
            result.probe_average = stacked.mean(dim=-1)
            if self.config.is_v2:
                result.probe_average = self.trunk.post_trunk_norm(result.probe_average)
        if "tokens" in wanted:
            result.tokens = self.trunk.post_trunk_norm(h)
        if self.head is not None and wanted & {"pooled", "logits"}:
            assert result.probe_average is not None
            pooled = self.head.pool(result.probe_average)
            result.pooled = pooled
            if "logits" in wanted:
                result.logits = self.head.linear(pooled)
        if "probe_average" not in wanted:
            result.probe_average = None
        return result

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits (B, num_classes), like the reference `AIM.forward`."""
        if self.head is None:
            raise RuntimeError(
                f"model {self.config.name!r} has no classification head (num_classes=0): load a head checkpoint "
                "or use features()/embed()"
            )
        logits = self.features(x, mask, outputs=("logits",)).logits
        assert logits is not None
        return logits

    def embed(self, x: Tensor, pooling: str = "mean", normalize: bool = True) -> Tensor:
        """(B, C, H, W) -> (B, D) embeddings.

        pooling "mean": mean over tokens of post_trunk_norm(last block). "probe": the head's attention-pooled
        vector (needs a head; stops at the last probe layer).
        """
        if pooling == "mean":
            tokens = self.features(x, outputs=("tokens",)).tokens
            assert tokens is not None
            out = tokens.mean(dim=1)
        elif pooling == "probe":
            if self.head is None:
                raise RuntimeError(f"pooling='probe' needs a head; model {self.config.name!r} has none")
            pooled = self.features(x, outputs=("pooled",)).pooled
            assert pooled is not None
            out = pooled
        else:
            raise ValueError(f"pooling must be 'mean' or 'probe', got {pooling!r}")
        return F.normalize(out, dim=-1) if normalize else out

    def preprocess(self, image: Any) -> Tensor:
        """One PIL image -> (1, C, S, S) float32 tensor, with this model's own preprocessing (the checkpoint's)."""
        return torch.from_numpy(preprocess_image(image, self.preprocess_config))[None]

    # ----- bookkeeping -----
    def num_params(self, *, include_head: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if include_head or not n.startswith("head."))


def build_model(config: AimConfig, *, device: torch.device | str | None = None, init: bool = True) -> AimModel:
    """Build an AimModel. On the meta device no memory is allocated and no init runs (shape checks, FLOPs)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AimModel(config)
        if init and torch.device(device or "cpu").type != "meta":
            model.init_weights()
    return model
