"""Model configuration: one frozen dataclass and the named flavors.

The released shapes and probe layers follow ml-aim v1 (AIM_FACTS §2, §5). The pre-training decoder shape
(`decoder_dim`, `decoder_depth`) follows ml-l3m's AIMv1 config (AIM_FACTS §7); inference never builds it, but it
lives here so FLOP counts and the pre-training code read one source of truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FLAVORS", "AimConfig", "flavor_names", "get_flavor"]


@dataclass(frozen=True)
class AimConfig:
    """Architecture of an AIM v1 model.

    `probe_layers` are 0-based block indices whose raw outputs are averaged for the attention-pooling head.
    `num_classes == 0` means the model has no head (a bare trunk).
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
    # Free-form, e.g. {"labels": "imagenet-1k"}; kept out of equality so two configs compare by architecture.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Tuples for hashing and JSON round trips (lists come back from JSON).
        object.__setattr__(self, "probe_layers", tuple(int(i) for i in self.probe_layers))
        object.__setattr__(self, "best_probe_layers", tuple(int(i) for i in self.best_probe_layers))
        problems: list[str] = []
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
}


def flavor_names() -> list[str]:
    return list(FLAVORS)


def canonical_flavor(name: str) -> str | None:
    """The flavor key for `name` (case-insensitive, ml-aim aliases accepted), or None."""
    for key in FLAVORS:
        if key.lower() == name.lower():
            return key
    return _ALIASES.get(name.lower())


def get_flavor(name: str) -> AimConfig:
    key = canonical_flavor(name)
    if key is None:
        raise KeyError(f"unknown AIM flavor {name!r}; known flavors: {', '.join(FLAVORS)}")
    return FLAVORS[key]
