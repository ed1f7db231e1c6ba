"""Checkpoint key layouts -> ours, in one place (AIMV2_FACTS §3). Our keys are Apple's (ml-aim v1 and aim.v2).

Each `Layout` says how to recognise a state dict by its keys and how to rename it to ours and back:
- "aimcore": ours = Apple's own keys (v1 and v2), the identity;
- "transformers-aimv2-vision": transformers' `Aimv2VisionModel` (split q/k/v, gate/up/down_proj, squeezed
  position table);
- "timm-aimv2": timm's `aimv2_*` ViTs (`trunk.`/`preprocessor.` dropped, fc1 -> fc1_g, fc3 -> fc1_x).
A key no rule of the detected layout maps is refused by name, never dropped. A new layout (e.g. the LiT model's
`image_encoder.*`/`text_encoder.*`, or transformers' `Aimv2Model`) is one more `Layout` appended to `LAYOUTS`
(or passed to `register_layout`), tried in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "Layout",
    "LayoutError",
    "convert_from_ours",
    "convert_to_ours",
    "detect_layout",
    "register_layout",
]


class LayoutError(ValueError):
    """Keys no known layout maps. (aimcore.checkpoint re-raises it as a CheckpointError.)"""


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Collection[str]], bool]
    to_ours: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    from_ours: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# Renaming tables: (our pattern, their pattern); `{i}` is a block index. Applied whole-key, both directions.
# ----------------------------------------------------------------------------------------------------------------
_TRANSFORMERS_RENAMES: tuple[tuple[str, str], ...] = (
    ("preprocessor.patchifier.proj.weight", "embeddings.patch_embed.weight"),
    ("preprocessor.patchifier.proj.bias", "embeddings.patch_embed.bias"),
    ("preprocessor.patchifier.norm.weight", "embeddings.rms_norm.weight"),
    ("trunk.blocks.{i}.attn.proj.weight", "encoder.layers.{i}.attention.out_proj.weight"),
    ("trunk.blocks.{i}.norm_1.weight", "encoder.layers.{i}.rms_norm1.weight"),
    ("trunk.blocks.{i}.norm_2.weight", "encoder.layers.{i}.rms_norm2.weight"),
    ("trunk.blocks.{i}.mlp.fc1.weight", "encoder.layers.{i}.ffn.gate_proj.weight"),
    ("trunk.blocks.{i}.mlp.fc3.weight", "encoder.layers.{i}.ffn.up_proj.weight"),
    ("trunk.blocks.{i}.mlp.fc2.weight", "encoder.layers.{i}.ffn.down_proj.weight"),
    ("trunk.post_trunk_norm.weight", "rms_norm.weight"),
)
_TF_POS = "embeddings.position_embedding.weight"  # (N, D); ours is (1, N, D)
_TF_QKV = re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.weight")

_TIMM_RENAMES: tuple[tuple[str, str], ...] = (
    ("preprocessor.patchifier.proj.weight", "patch_embed.proj.weight"),
    ("preprocessor.patchifier.proj.bias", "patch_embed.proj.bias"),
    ("preprocessor.patchifier.norm.weight", "patch_embed.norm.weight"),
    ("preprocessor.pos_embed", "pos_embed"),
    ("trunk.blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("trunk.blocks.{i}.attn.proj.weight", "blocks.{i}.attn.proj.weight"),
    ("trunk.blocks.{i}.norm_1.weight", "blocks.{i}.norm1.weight"),
    ("trunk.blocks.{i}.norm_2.weight", "blocks.{i}.norm2.weight"),
    ("trunk.blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1_g.weight"),
    ("trunk.blocks.{i}.mlp.fc3.weight", "blocks.{i}.mlp.fc1_x.weight"),
    ("trunk.blocks.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.weight"),
    ("trunk.post_trunk_norm.weight", "norm.weight"),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _rename(
    state: Mapping[str, Tensor], table: tuple[tuple[str, str], ...], *, forward: bool, layout: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename every key by `table` (ours -> theirs when forward, else theirs -> ours); return the keys no rule
    matched, untouched, for the caller's special cases."""
    src_i, dst_i = (0, 1) if forward else (1, 0)
    rules = [(_pattern(row[src_i]), row[dst_i]) for row in table]
    out: dict[str, Tensor] = {}
    left: list[str] = []
    for key, value in state.items():
        for pat, target in rules:
            m = pat.match(key)
            if m:
                name = target.replace("{i}", m.group("i")) if "{i}" in target else target
                if name in out:
                    raise LayoutError(f"{layout}: two keys map to {name!r}")
                out[name] = value
                break
        else:
            left.append(key)
    return out, left


def _refuse(layout: str, keys: list[str]) -> None:
    if keys:
        raise LayoutError(
            f"checkpoint looks like the {layout} layout but {len(keys)} key(s) cannot be mapped to aimcore's: "
            + ", ".join(sorted(keys))
        )


# ----- transformers Aimv2VisionModel -----
def _transformers_to_ours(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, left = _rename(state, _TRANSFORMERS_RENAMES, forward=False, layout="transformers")
    qkv: dict[int, dict[str, Tensor]] = {}
    unexpected: list[str] = []
    for key in left:
        m = _TF_QKV.match(key)
        if m:
            qkv.setdefault(int(m.group(1)), {})[m.group(2)] = state[key]
        elif key == _TF_POS:
            out["preprocessor.pos_embed"] = state[key].unsqueeze(0)  # (N, D) -> (1, N, D)
        else:
            unexpected.append(key)  # e.g. head.* of use_head=True: not an AIMv2 vision-encoder weight we know
    for i, parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            unexpected.extend(f"encoder.layers.{i}.attention.{p}_proj.weight (missing)" for p in missing)
            continue
        # Apple's fused qkv rows are [q | k | v] (AIMV2_FACTS §3).
        out[f"trunk.blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    _refuse("transformers Aimv2VisionModel", unexpected)
    return out


def _ours_to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, left = _rename(state, _TRANSFORMERS_RENAMES, forward=True, layout="transformers")
    unexpected: list[str] = []
    for key in left:
        m = re.match(r"trunk\.blocks\.(\d+)\.attn\.qkv\.weight$", key)
        if m:
            q, k, v = state[key].chunk(3, dim=0)
            for name, part in zip("qkv", (q, k, v), strict=True):
                out[f"encoder.layers.{m.group(1)}.attention.{name}_proj.weight"] = part.contiguous()
        elif key == "preprocessor.pos_embed":
            out[_TF_POS] = state[key][0]
        else:
            unexpected.append(key)
    _refuse("transformers Aimv2VisionModel (as a target)", unexpected)
    return out


# ----- timm -----
def _timm_to_ours(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, left = _rename(state, _TIMM_RENAMES, forward=False, layout="timm")
    _refuse("timm aimv2", left)
    return out


def _ours_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, left = _rename(state, _TIMM_RENAMES, forward=True, layout="timm")
    _refuse("timm aimv2 (as a target)", left)
    return out


def _identity(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(state)


def _is_ours(keys: Collection[str]) -> bool:
    """Our (Apple's) keys: a preprocessor or trunk key, or a head file alone (`head.*` only)."""
    return any(k.startswith(("preprocessor.", "trunk.")) for k in keys) or (
        bool(keys) and all(k.startswith("head.") for k in keys)
    )


LAYOUTS: list[Layout] = [
    Layout("aimcore", _is_ours, _identity, _identity),
    Layout(
        "transformers-aimv2-vision",
        lambda keys: any(k.startswith(("embeddings.patch_embed.", "encoder.layers.")) for k in keys),
        _transformers_to_ours,
        _ours_to_transformers,
    ),
    Layout(
        "timm-aimv2",
        lambda keys: "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys),
        _timm_to_ours,
        _ours_to_timm,
    ),
]


def register_layout(layout: Layout) -> None:
    """Add a layout (tried after the built-in ones); a name can be registered once."""
    if any(existing.name == layout.name for existing in LAYOUTS):
        raise ValueError(f"layout {layout.name!r} is already registered")
    LAYOUTS.append(layout)


def detect_layout(keys: Collection[str]) -> Layout:
    for layout in LAYOUTS:
        if layout.detect(keys):
            return layout
    shown = ", ".join(sorted(keys)[:12])
    raise LayoutError(
        f"unknown checkpoint layout: none of {[lay.name for lay in LAYOUTS]} recognises these keys "
        f"({len(keys)} in all): {shown}"
    )


def convert_to_ours(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """(state dict in our keys, the name of the layout it came in)."""
    layout = detect_layout(list(state))
    return layout.to_ours(state), layout.name


def convert_from_ours(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Our state dict in another layout's keys (round trips, and writing folders other tools read)."""
    for candidate in LAYOUTS:
        if candidate.name == layout:
            return candidate.from_ours(state)
    raise ValueError(f"unknown layout {layout!r}; known: {[lay.name for lay in LAYOUTS]}")
