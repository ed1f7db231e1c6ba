"""Model configuration: one frozen dataclass and the named flavors.

The released shapes and probe layers follow ml-aim v1 (AIM_FACTS §2, §5); the AIMv2 vision encoders follow
AIMV2_FACTS §1-§2 (`family="aimv2"`: RMSNorm, SwiGLU, learned or native sin-cos positions). The pre-training
decoder shape (`decoder_dim`, `decoder_depth`) follows ml-l3m's AIMv1 config (AIM_FACTS §7); inference never
builds it, but it lives here so FLOP counts and the pre-training code read one source of truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAMILIES", "FLAVORS", "MAX_NATIVE_PATCHES", "AimConfig", "flavor_names", "get_flavor"]

# "aim": AIM v1 (LayerNorm, GELU MLP, fixed sin-cos table). "aimv2": AIMv2 (RMSNorm, SwiGLU, learned
# `preprocessor.pos_embed`, or the sin-cos table of the input's own grid when `native`).
FAMILIES = ("aim", "aimv2")
# The native AIMv2 encoder was evaluated from 112 to 4096 patches (AIMV2_FACTS §1); beyond that we refuse.
MAX_NATIVE_PATCHES = 4096


@dataclass(frozen=True)
class AimConfig:
    """Architecture of an AIM v1 or AIMv2 model: `family` picks the norm, the FFN and the position table.

    `probe_layers` are 0-based block indices whose raw outputs are averaged for the attention-pooling head.
    `num_classes == 0` means the model has no head (a bare trunk).
    `mlp_hidden_dim` 0 means `embed_dim * mlp_ratio` (v1); AIMv2's SwiGLU widths are explicit (2816 for 1024).
    `native` (AIMv2 only): no learned table; any H x W multiple of the patch, up to MAX_NATIVE_PATCHES patches.
    """

    name: str = "custom"
    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1536
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: int = 4
    num_channels: int = 3
    probe_layers: tuple[int, ...] = (14, 15, 16, 17, 18, 19)
    # The flavor's "best" probe layers; the "last" ones are always the last `len(best)` blocks.
    best_probe_layers: tuple[int, ...] = (14, 15, 16, 17, 18, 19)
    num_classes: int = 1000
    head_linear_bias: bool = False
    norm_eps: float = 1e-6
    decoder_dim: int = 2048
    decoder_depth: int = 12
    family: str = "aim"
    mlp_hidden_dim: int = 0
    native: bool = False
    # Free-form, e.g. {"labels": "imagenet-1k"}; kept out of equality so two configs compare by architecture.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Tuples for hashing and JSON round trips (lists come back from JSON).
        object.__setattr__(self, "probe_layers", tuple(int(i) for i in self.probe_layers))
        object.__setattr__(self, "best_probe_layers", tuple(int(i) for i in self.best_probe_layers))
        problems: list[str] = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.native and self.family != "aimv2":
            problems.append("native resolution is an AIMv2 feature (family='aimv2')")
        if self.mlp_hidden_dim < 0:
            problems.append(f"mlp_hidden_dim must be >= 0 (0 = embed_dim * mlp_ratio), got {self.mlp_hidden_dim}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by 4 for the 2D sin-cos table")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.depth < 1:
            problems.append(f"depth must be >= 1, got {self.depth}")
        for name in ("probe_layers", "best_probe_layers"):
            layers = getattr(self, name)
            if not layers:
                problems.append(f"{name} must name at least one block")
            elif min(layers) < 0 or max(layers) >= self.depth:
                problems.append(f"{name} {layers} must be block indices in [0, {self.depth - 1}]")
            elif len(set(layers)) != len(layers):
                problems.append(f"{name} {layers} has duplicates")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        if self.decoder_dim % 4:
            problems.append(f"decoder_dim {self.decoder_dim} must be divisible by 4 for the 2D sin-cos table")
        if problems:
            raise ValueError("invalid AimConfig: " + "; ".join(problems))

    # ----- derived shapes -----
    @property
    def num_blocks(self) -> int:
        """ml-aim's name for `depth`."""
        return self.depth

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch (P·P·C), the pre-training target width."""
        return self.patch_size**2 * self.num_channels

    @property
    def is_v2(self) -> bool:
        return self.family == "aimv2"

    @property
    def norm(self) -> str:
        """Norm kind: "layernorm" (v1, with bias) or "rmsnorm" (v2, weight only)."""
        return "rmsnorm" if self.is_v2 else "layernorm"

    @property
    def ffn(self) -> str:
        """FFN kind: "gelu" (v1: fc1 -> GELU -> fc2) or "swiglu" (v2: fc2(silu(fc1 x) * fc3 x))."""
        return "swiglu" if self.is_v2 else "gelu"

    @property
    def pos_embed(self) -> str:
        """Position table: "sincos" (v1), "learned" (v2 `preprocessor.pos_embed`) or "native_sincos" (v2 native)."""
        if not self.is_v2:
            return "sincos"
        return "native_sincos" if self.native else "learned"

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden_dim or self.embed_dim * self.mlp_ratio

    @property
    def head_batch_norm(self) -> bool:
        """v1's probe head normalises its input with BatchNorm; AIMv2's pooling head has none (its tokens are
        already RMS-normalised by `post_trunk_norm`)."""
        return not self.is_v2

    @property
    def fixed_resolution(self) -> bool:
        """True when the model has a learned position table for exactly one grid (AIMv2 224/336/448). v1's sin-cos
        table is defined for any grid, as in ml-aim v1, so v1 takes other sizes (and non-square ones)."""
        return self.pos_embed == "learned"

    def check_grid(self, h: int, w: int) -> None:
        """Refuse a patch grid this model cannot take: a fixed-resolution model only its own grid (never a silent
        slice of its position table), a native one at most MAX_NATIVE_PATCHES patches."""
        if not self.fixed_resolution and not self.native:
            return
        if self.native:
            if h * w > MAX_NATIVE_PATCHES:
                raise ValueError(
                    f"{self.name}: {h}x{w} = {h * w} patches is more than the native maximum {MAX_NATIVE_PATCHES}"
                )
            return
        g = self.grid_size
        if (h, w) != (g, g):
            p = self.patch_size
            raise ValueError(
                f"{self.name} is a fixed-resolution model: it takes {self.img_size}x{self.img_size} inputs "
                f"({g}x{g} patches), got {h * p}x{w * p} ({h}x{w} patches); preprocess with model.preprocess(image) "
                "or preprocess(image, model.preprocess_config)"
            )

    @property
    def has_head(self) -> bool:
        return self.num_classes > 0

    @property
    def last_probe_layers(self) -> tuple[int, ...]:
        k = len(self.best_probe_layers)
        return tuple(range(self.depth - k, self.depth))

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop: ceil(img_size / 0.875), 256 for 224 (AIM_FACTS §4)."""
        return math.ceil(self.img_size / 0.875)

    # ----- variants -----
    def replace(self, **changes: Any) -> AimConfig:
        return dataclasses.replace(self, **changes)

    def with_probe_layers(self, layers: str | Sequence[int]) -> AimConfig:
        """`"best"`, `"last"`, or explicit block indices."""
        if isinstance(layers, str):
            if layers == "best":
                return self.replace(probe_layers=self.best_probe_layers)
            if layers == "last":
                return self.replace(probe_layers=self.last_probe_layers)
            raise ValueError(f"probe layers must be 'best', 'last' or a list of block indices, got {layers!r}")
        return self.replace(probe_layers=tuple(layers))

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["probe_layers"] = list(self.probe_layers)
        out["best_probe_layers"] = list(self.best_probe_layers)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AimConfig:
        """Also accepts ml-aim / Hugging Face spellings: num_blocks (depth), probe_layers as a count (last k)."""
        data = dict(data)
        if "num_blocks" in data:
            depth = data.pop("num_blocks")
            if data.setdefault("depth", depth) != depth:
                raise ValueError(f"num_blocks {depth} and depth {data['depth']} disagree")
        for key in ("probe_layers", "best_probe_layers"):
            if isinstance(data.get(key), int):  # ml-aim's factories take probe_layers=6 to mean "the last 6"
                data[key] = tuple(range(data["depth"] - data[key], data["depth"]))
        if "probe_layers" in data and "best_probe_layers" not in data:
            data["best_probe_layers"] = data["probe_layers"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AimConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))


def _released(name: str, dim: int, depth: int, heads: int, best: range) -> AimConfig:
    return AimConfig(
        name=name,
        img_size=224,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        probe_layers=tuple(best),
        best_probe_layers=tuple(best),
        num_classes=1000,
        decoder_dim=2048,
        decoder_depth=12,
    )


def _released_v2(name: str, dim: int, heads: int, hidden: int, img: int, native: bool = False) -> AimConfig:
    depth = 24
    # AIMv2 reports its attentive probe on the last block's normed tokens; our probe keeps that by default.
    last = (depth - 1,)
    return AimConfig(
        name=name,
        img_size=img,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_hidden_dim=hidden,
        probe_layers=last,
        best_probe_layers=last,
        num_classes=0,
        head_linear_bias=True,
        norm_eps=1e-5,
        family="aimv2",
        native=native,
        decoder_dim=2048,
        decoder_depth=12,
    )


def _v2_flavors() -> dict[str, AimConfig]:
    """Every released AIMv2 vision encoder (AIMV2_FACTS §1), named after its hub id `apple/<name>`."""
    out: dict[str, AimConfig] = {}
    for size, dim, heads, hidden in (
        ("large", 1024, 8, 2816),
        ("huge", 1536, 12, 4096),
        ("1B", 2048, 16, 5632),
        ("3B", 3072, 24, 8192),
    ):
        for img in (224, 336, 448):
            name = f"aimv2-{size}-patch14-{img}"
            out[name] = _released_v2(name, dim, heads, hidden, img)
    for img in (224, 336):
        name = f"aimv2-large-patch14-{img}-distilled"
        out[name] = _released_v2(name, 1024, 8, 2816, img)
    # The native model's img_size is only its default (training-time) resolution; it takes any grid.
    out["aimv2-large-patch14-native"] = _released_v2("aimv2-large-patch14-native", 1024, 8, 2816, 224, native=True)
    return out


FLAVORS: dict[str, AimConfig] = {
    # Released ml-aim v1 shapes; head dim 128 everywhere (AIM_FACTS §5), "best" layers from constants.LAYERS_BEST.
    "aim-600M": _released("aim-600M", 1536, 24, 12, range(14, 20)),
    "aim-1B": _released("aim-1B", 2048, 24, 16, range(12, 18)),
    "aim-3B": _released("aim-3B", 3072, 24, 24, range(12, 18)),
    "aim-7B": _released("aim-7B", 4096, 32, 32, range(14, 20)),
    # Tiny, same code path: seconds on a CPU in tests. Probe layers end before the last block so early exit is
    # exercised exactly as for the released sizes.
    "aim-debug": AimConfig(
        name="aim-debug",
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=2,
        probe_layers=(1, 2),
        best_probe_layers=(1, 2),
        num_classes=10,
        decoder_dim=64,
        decoder_depth=2,
    ),
    # Small enough to pre-train on 2 CPU cores in about half an hour: 112 px with the released 14 px patch gives an
    # 8x8 grid (64 tokens). ~3.6 M trunk parameters; head dim 64.
    "aim-demo": AimConfig(
        name="aim-demo",
        img_size=112,
        patch_size=14,
        embed_dim=192,
        depth=8,
        num_heads=3,
        probe_layers=(4, 5, 6),
        best_probe_layers=(4, 5, 6),
        num_classes=10,
        decoder_dim=256,
        decoder_depth=4,
    ),
    **_v2_flavors(),
    # AIMv2-shaped and tiny: seconds on a CPU. SwiGLU hidden 160 is not a multiple of the width, as released.
    "aimv2-debug": AimConfig(
        name="aimv2-debug",
        img_size=28,
        patch_size=14,
        embed_dim=64,
        depth=4,
        num_heads=2,
        mlp_hidden_dim=160,
        # Before the last block, so early exit is exercised as for v1's debug flavor.
        probe_layers=(1, 2),
        best_probe_layers=(1, 2),
        num_classes=0,
        head_linear_bias=True,
        norm_eps=1e-5,
        family="aimv2",
        decoder_dim=64,
        decoder_depth=2,
    ),
}

# Lower-case aliases, including ml-aim's factory and arch names, resolve to the same flavors.
_ALIASES: dict[str, str] = {
    "aim_600m": "aim-600M",
    "aim-600m-2b-imgs": "aim-600M",
    "aim_1b": "aim-1B",
    "aim-1b-5b-imgs": "aim-1B",
    "aim_3b": "aim-3B",
    "aim-3b-5b-imgs": "aim-3B",
    "aim_7b": "aim-7B",
    "aim-7b-5b-imgs": "aim-7B",
    "aim_debug": "aim-debug",
    "aim_demo": "aim-demo",
    "aimv2_debug": "aimv2-debug",
}


def flavor_names() -> list[str]:
    return list(FLAVORS)


def canonical_flavor(name: str) -> str | None:
    """The flavor key for `name` (case-insensitive, ml-aim aliases and `apple/aimv2-*` hub ids accepted), or None."""
    if name.lower().startswith("apple/aimv2-"):
        name = name.split("/", 1)[1]
    for key in FLAVORS:
        if key.lower() == name.lower():
            return key
    return _ALIASES.get(name.lower())


def get_flavor(name: str) -> AimConfig:
    key = canonical_flavor(name)
    if key is None:
        raise KeyError(f"unknown AIM flavor {name!r}; known flavors: {', '.join(FLAVORS)}")
    return FLAVORS[key]
