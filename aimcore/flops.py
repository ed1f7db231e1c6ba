"""Parameter and FLOP counts per image for any AimConfig, analytic (no model is built).

FLOPs count each multiply-add as 2 and include every matmul, the patch conv and the attention products; norms,
activations and softmax are left out (under 1 % at every released size). Backward is counted as twice the forward,
the usual convention for MFU (PaLM appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass

from aimcore.config import AimConfig

__all__ = ["FlopCounts", "ParamCounts", "count_flops", "count_params"]


@dataclass(frozen=True)
class ParamCounts:
    backbone: int  # preprocessor + trunk, as in AIM_FACTS §5
    head: int  # attention-pooling classifier (0 without a head)
    decoder: int  # pre-training pixel decoder

    @property
    def total(self) -> int:
        return self.backbone + self.head


@dataclass(frozen=True)
class FlopCounts:
    patch_embed: int
    trunk: int  # all `blocks` blocks
    head: int
    decoder: int

    @property
    def forward(self) -> int:
        return self.patch_embed + self.trunk + self.head

    @property
    def pretrain_step(self) -> int:
        """Forward + backward of trunk and pixel decoder, per image."""
        return 3 * (self.patch_embed + self.trunk + self.decoder)


def count_params(config: AimConfig) -> ParamCounts:
    d, p, c = config.embed_dim, config.patch_size, config.num_channels
    hidden = config.hidden_dim
    norm = d if config.norm == "rmsnorm" else 2 * d  # RMSNorm has a weight only, LayerNorm a weight and a bias
    ffn = (3 if config.ffn == "swiglu" else 2) * d * hidden  # fc1 (+ fc3) + fc2
    patch = d * c * p * p + d + norm  # conv weight + bias, norm
    pos = config.num_patches * d if config.pos_embed == "learned" else 0
    block = 3 * d * d + d * d + ffn + 2 * norm  # qkv, proj, FFN, two norms
    backbone = patch + pos + config.depth * block + norm  # + post_trunk_norm
    head = 0
    if config.has_head:
        head = d + 2 * d * d + config.num_classes * d + (config.num_classes if config.head_linear_bias else 0)
    dd = config.decoder_dim
    decoder_block = 2 * dd * dd * config.mlp_ratio + 4 * dd  # bias-free MLP + two LayerNorms
    decoder = (d * dd + dd) + config.decoder_depth * decoder_block + 2 * dd + (dd * config.patch_dim + config.patch_dim)
    return ParamCounts(backbone=backbone, head=head, decoder=decoder)


def count_flops(config: AimConfig, *, blocks: int | None = None, img_size: int | None = None) -> FlopCounts:
    """FLOPs per image. `blocks` limits the trunk to its first blocks (early exit); `img_size` overrides the
    resolution (tokens = (img_size / patch)^2)."""
    d = config.embed_dim
    side = (img_size or config.img_size) // config.patch_size
    n = side * side
    depth = config.depth if blocks is None else blocks
    hidden = config.hidden_dim
    ffn_mats = 3 if config.ffn == "swiglu" else 2
    patch_embed = 2 * n * config.patch_dim * d
    per_block = (
        2 * n * d * 3 * d + 2 * n * d * d + ffn_mats * 2 * n * d * hidden + 2 * 2 * n * n * d
    )  # qkv, proj, FFN, QK^T+AV
    head = 0
    if config.has_head:
        head = 2 * 2 * n * d * d + 2 * 2 * n * d + 2 * d * config.num_classes  # k, v; one query's QK^T and AV; linear
    dd = config.decoder_dim
    decoder = (
        2 * n * d * dd + config.decoder_depth * (2 * 2 * n * dd * dd * config.mlp_ratio) + 2 * n * dd * config.patch_dim
    )
    return FlopCounts(patch_embed=patch_embed, trunk=depth * per_block, head=head, decoder=decoder)
