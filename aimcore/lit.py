"""AIMv2-LiT: an AIMv2 image tower with an attention-pooling head and a causal text tower, both projected into
one space (AIMV2_FACTS §2; `aimv2-large-patch14-224-lit`, 77.0 % zero-shot on ImageNet-1k).

Parameter names are Apple's (`image_encoder.*`, `text_encoder.*`, `image_projector`, `text_projector`,
`log_logit_scale`); transformers' `Aimv2Model` keys are mapped at load time (aimcore.lit_layouts).

The image tower is the v2 AimModel itself: its head is the pooling head (one query, no BatchNorm, bias-free k/v,
output linear D -> D with bias) reading post_trunk_norm of the last block, so `logits` of that model is the pooled
image vector. The text tower is a second trunk in the same style (the same RMSNorm / SwiGLU Block) with a causal
mask, pooled at the first EOS token.

Shapes: B batch, L context (77), Dv / Dt tower widths, P projection width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimcore.config import AimConfig, get_flavor
from aimcore.layers import Block, init_linears_and_norms, make_norm
from aimcore.model import AimModel

__all__ = ["LIT_FLAVORS", "LitConfig", "LitModel", "TextConfig", "TextEncoder", "build_lit_model", "get_lit_flavor"]


@dataclass(frozen=True)
class TextConfig:
    """The LiT text tower (released: 12 blocks, width 768, 6 heads, SwiGLU 2048, CLIP vocabulary)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 6
    mlp_hidden_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    eos_token_id: int = 49407
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            problems.append(f"eos_token_id {self.eos_token_id} is outside the vocabulary ({self.vocab_size})")
        if self.depth < 1 or self.context_length < 2:
            problems.append("depth must be >= 1 and context_length >= 2")
        if problems:
            raise ValueError("invalid TextConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class LitConfig:
    """Both towers and the shared space. `vision` is a v2 AimConfig whose head is the pooling head
    (num_classes == embed_dim, head_linear_bias, probe layer = the last block)."""

    name: str
    vision: AimConfig
    text: TextConfig = TextConfig()
    projection_dim: int = 768
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        v = self.vision
        if not (v.num_classes == v.embed_dim and v.head_linear_bias and v.probe_layers == (v.depth - 1,)):
            raise ValueError(
                "invalid LitConfig: the image tower's head must be the LiT pooling head "
                f"(num_classes == embed_dim {v.embed_dim}, head_linear_bias, probe_layers ({v.depth - 1},)), got "
                f"num_classes {v.num_classes}, head_linear_bias {v.head_linear_bias}, probe_layers {v.probe_layers}"
            )
        if getattr(v, "family", "aimv2") != "aimv2":
            raise ValueError("invalid LitConfig: the image tower is an AIMv2 trunk (family='aimv2')")

    @staticmethod
    def image_tower(vision: AimConfig) -> AimConfig:
        """A v2 vision config turned into the LiT image tower's (its pooling head added)."""
        return dataclasses.replace(
            vision,
            num_classes=vision.embed_dim,
            head_linear_bias=True,
            probe_layers=(vision.depth - 1,),
            best_probe_layers=(vision.depth - 1,),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "lit",
            "name": self.name,
            "vision": self.vision.to_dict(),
            "text": dataclasses.asdict(self.text),
            "projection_dim": self.projection_dim,
            "max_logit_scale": self.max_logit_scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LitConfig:
        return cls(
            name=str(data["name"]),
            vision=AimConfig.from_dict(data["vision"]),
            text=TextConfig(**data["text"]),
            projection_dim=int(data["projection_dim"]),
            max_logit_scale=float(data.get("max_logit_scale", 100.0)),
        )


def _lit_flavors() -> dict[str, LitConfig]:
    large = LitConfig.image_tower(get_flavor("aimv2-large-patch14-224"))
    debug = LitConfig.image_tower(get_flavor("aimv2-debug"))
    return {
        "aimv2-large-patch14-224-lit": LitConfig(
            "aimv2-large-patch14-224-lit", dataclasses.replace(large, name="aimv2-large-patch14-224-lit")
        ),
        # Seconds on a CPU; SwiGLU hidden not a multiple of the width, odd vocabulary, short context, as a test
        # should exercise.
        "aimv2-lit-debug": LitConfig(
            "aimv2-lit-debug",
            dataclasses.replace(debug, name="aimv2-lit-debug"),
            TextConfig(
                embed_dim=48,
                depth=2,
                num_heads=2,
                mlp_hidden_dim=112,
                vocab_size=600,
                context_length=16,
                eos_token_id=599,
            ),
            projection_dim=32,
        ),
    }


LIT_FLAVORS: dict[str, LitConfig] = _lit_flavors()


def get_lit_flavor(name: str) -> LitConfig:
    key = name.split("/", 1)[1] if name.lower().startswith("apple/") else name
    for flavor, cfg in LIT_FLAVORS.items():
        if flavor.lower() == key.lower():
            return cfg
    raise KeyError(f"unknown LiT flavor {name!r}; choose from {sorted(LIT_FLAVORS)}")


class TextPreprocessor(nn.Module):
    """Token embedding plus the learned positions (Apple: `positional_embedding` (L, Dt), not an nn.Embedding)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.text_embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.embed_dim))

    def forward(self, ids: Tensor) -> Tensor:  # (B, L) int -> (B, L, Dt)
        n = ids.shape[1]
        if n > self.positional_embedding.shape[0]:
            raise ValueError(f"{n} tokens is more than the context length {self.positional_embedding.shape[0]}")
        return self.text_embedding(ids) + self.positional_embedding[:n].unsqueeze(0)


class TextTrunk(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim, cfg.num_heads, 4, cfg.norm_eps, norm="rmsnorm", ffn="swiglu", hidden=cfg.mlp_hidden_dim
            )
            for _ in range(cfg.depth)
        )
        self.post_trunk_norm = make_norm("rmsnorm", cfg.embed_dim, cfg.norm_eps)


class TextEncoder(nn.Module):
    """(B, L) token ids -> (B, Dt): causal trunk, post_trunk_norm, the first EOS token's vector."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.preprocessor = TextPreprocessor(cfg)
        self.trunk = TextTrunk(cfg)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.preprocessor(ids)  # (B, L, Dt)
        n = x.shape[1]
        # Causal, as Apple's text tower (True = may attend): a token sees itself and what precedes it, so the
        # padding after EOS never reaches the pooled vector. Built from shapes only, so ONNX keeps it symbolic.
        idx = torch.arange(n, device=ids.device)
        causal = (idx[None, :] <= idx[:, None])[None, None]  # (1, 1, L, L)
        for block in self.trunk.blocks:
            x = block(x, causal)
        x = self.trunk.post_trunk_norm(x)
        # First EOS per row (argmax of the first maximum), as Apple's ExtractEOS; a row with no EOS pools token 0.
        # (float: ONNX ArgMax keeps the first maximum too, select_last_index=0)
        eos = (ids == self.config.eos_token_id).to(x.dtype).argmax(dim=1)  # (B,)
        return x.gather(1, eos[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)  # (B, Dt)


class LitModel(nn.Module):
    """Apple's AIMv2LiT: encode_image / encode_text give projected, unnormalised (B, P) vectors."""

    def __init__(self, config: LitConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = AimModel(config.vision)
        self.text_encoder = TextEncoder(config.text)
        self.image_projector = nn.Linear(config.vision.embed_dim, config.projection_dim, bias=False)
        self.text_projector = nn.Linear(config.text.embed_dim, config.projection_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))

    def init_weights(self) -> None:
        self.image_encoder.init_weights()
        init_linears_and_norms(self.text_encoder)
        nn.init.normal_(self.text_encoder.preprocessor.text_embedding.weight, std=0.02)
        nn.init.normal_(self.text_encoder.preprocessor.positional_embedding, std=0.01)
        for proj in (self.image_projector, self.text_projector):
            nn.init.xavier_uniform_(proj.weight)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, P)."""
        pooled = self.image_encoder.features(pixels, outputs=("logits",)).logits  # (B, Dv): the head's output
        assert pooled is not None
        return self.image_projector(pooled)

    def encode_text(self, ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, P)."""
        return self.text_projector(self.text_encoder(ids))

    @property
    def logit_scale(self) -> Tensor:
        """exp(clamp(log_logit_scale, 0, log max_logit_scale)), a scalar."""
        return self.log_logit_scale.clamp(0.0, math.log(self.config.max_logit_scale)).exp()

    def forward(self, pixels: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), as Apple's forward."""
        img = F.normalize(self.encode_image(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        per_text = (self.logit_scale * txt) @ img.t()
        return per_text.t(), per_text


def build_lit_model(
    config: LitConfig | str, *, device: torch.device | str | None = None, init: bool = True
) -> LitModel:
    cfg = get_lit_flavor(config) if isinstance(config, str) else config
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LitModel(cfg)
        if init and torch.device(device or "cpu").type != "meta":
            model.init_weights()
    return model.eval()
