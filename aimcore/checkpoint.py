"""Reading, checking and writing checkpoints. Key surgery lives here and in aimcore.layouts (the layout adapters:
Apple / transformers / timm keys -> ours).

Formats read:
- ml-aim's released `.pth` pickles (backbone, head, or merged), through `torch.load(weights_only=True)` only;
- our self-describing safetensors (weights + config, preprocessing, provenance and labels in the metadata);
- plain safetensors in the reference key layout (e.g. a Hugging Face `PyTorchModelHubMixin` push with a
  `config.json` beside it).
Any of those in transformers' `Aimv2VisionModel` or timm's AIMv2 key names is renamed to ours first (layouts.py).
Loading is strict: every missing, unexpected or mis-shaped key is named. A checkpoint without any `head.*` key
loads as a bare trunk (no head), and the log says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimcore.config import FLAVORS, AimConfig
from aimcore.fsio import save_safetensors
from aimcore.layouts import LayoutError, convert_to_ours
from aimcore.model import AimModel, build_model
from aimcore.preprocess import PreprocessConfig, default_preprocess_config, from_hf_preprocessor

__all__ = [
    "FORMAT_NAME",
    "CheckpointError",
    "LoadedCheckpoint",
    "check_state_dict",
    "clean_state_dict",
    "infer_config",
    "load_model_from_files",
    "load_state_dict_strict",
    "read_weights",
    "save_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "aimcore"
FORMAT_VERSION = "1"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HEAD_PREFIX = "head."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match the model."""


@dataclass
class LoadedCheckpoint:
    """Weights and whatever metadata the files carried."""

    state_dict: dict[str, Tensor]
    files: list[Path]
    config: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def clean_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Unwrap common containers ({"model": ...}, {"state_dict": ...}) and strip wrapper prefixes added by DDP
    (`module.`) and torch.compile (`_orig_mod.`)."""
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            state = inner
            break
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix) :]
        name = name.replace("._orig_mod.", ".")
        if name in out:
            raise CheckpointError(f"key {name!r} appears twice after removing wrapper prefixes")
        out[name] = value
    return out


def read_weights(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Read one weights file. Pickles are only ever opened with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        loaded = LoadedCheckpoint(state_dict=clean_state_dict(tensors), files=[path])
        if meta.get("format") == FORMAT_NAME:
            loaded.config = _json_field(meta, "config", path)
            loaded.preprocess = _json_field(meta, "preprocess", path)
            loaded.provenance = _json_field(meta, "provenance", path) or {}
            loaded.labels = _json_field(meta, "labels", path)
        return loaded
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Old (non-zipfile) torch.save format cannot be memory-mapped; still weights-only.
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refusals are UnpicklingError
            raise CheckpointError(f"cannot read {path} as a tensor-only checkpoint: {exc}") from exc
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{path} holds a {type(raw).__name__}, expected a state dict")
        return LoadedCheckpoint(state_dict=clean_state_dict(raw), files=[path])
    raise CheckpointError(f"unsupported checkpoint file type {path.suffix!r} ({path}); expected {WEIGHT_SUFFIXES}")


def _json_field(meta: Mapping[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata field {key!r} of {path} is not valid JSON: {exc}") from exc


def merge_checkpoints(parts: list[LoadedCheckpoint]) -> LoadedCheckpoint:
    """Merge a backbone and a head (or more parts); overlapping keys are refused, as in the reference."""
    merged = LoadedCheckpoint(state_dict={}, files=[])
    for part in parts:
        overlap = sorted(set(merged.state_dict) & set(part.state_dict))
        if overlap:
            raise CheckpointError(f"{part.files[0]} repeats keys already loaded from {merged.files}: {overlap[:5]}")
        merged.state_dict.update(part.state_dict)
        merged.files.extend(part.files)
        merged.config = merged.config or part.config
        merged.preprocess = merged.preprocess or part.preprocess
        merged.provenance = merged.provenance or part.provenance
        merged.labels = merged.labels or part.labels
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Config inference and checks
# ----------------------------------------------------------------------------------------------------------------
def infer_config(state: Mapping[str, Tensor], *, base: AimConfig | None = None) -> AimConfig:
    """Rebuild an AimConfig from reference-layout weights alone.

    Width, patch, channels, depth and classes come from the shapes; the head count assumes ml-aim's head dim of 128
    (every released size) unless a known flavor or `base` matches the width and depth.
    """
    try:
        proj = state["preprocessor.patchifier.proj.weight"]  # (D, C, P, P)
    except KeyError as exc:
        raise CheckpointError(
            "cannot infer the architecture: 'preprocessor.patchifier.proj.weight' is missing; pass a config"
        ) from exc
    dim, channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    block_ids = {int(k.split(".")[2]) for k in state if k.startswith("trunk.blocks.")}
    depth = max(block_ids) + 1 if block_ids else 0
    if block_ids != set(range(depth)):
        raise CheckpointError(f"trunk block indices are not contiguous from 0: {sorted(block_ids)}")
    template = base
    if template is None or (template.embed_dim, template.depth) != (dim, depth):
        template = next(
            (f for f in FLAVORS.values() if (f.embed_dim, f.depth, f.patch_size) == (dim, depth, patch)), None
        )
    if template is None:
        heads = max(dim // 128, 1)
        best = tuple(range(max(depth - 6, 0), depth))
        template = AimConfig(
            name="custom",
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            patch_size=patch,
            img_size=patch * 16,
            probe_layers=best,
            best_probe_layers=best,
        )
    # AIMv2: SwiGLU's fc3, and a weight-only RMSNorm in the patch embedding (v1's LayerNorm has a bias).
    if "trunk.blocks.0.mlp.fc3.weight" in state or "preprocessor.patchifier.norm.bias" not in state:
        return _infer_v2(state, dim, depth, patch, channels, base)
    head_w = state.get("head.linear.weight")
    return template.replace(
        embed_dim=dim,
        depth=depth,
        patch_size=patch,
        num_channels=channels,
        num_classes=int(head_w.shape[0]) if head_w is not None else 0,
        head_linear_bias="head.linear.bias" in state,
    )


def _infer_v2(
    state: Mapping[str, Tensor], dim: int, depth: int, patch: int, channels: int, base: AimConfig | None
) -> AimConfig:
    """AIMv2 from the shapes: SwiGLU width from fc1, grid from the learned table (none: native)."""
    fc1 = state.get("trunk.blocks.0.mlp.fc1.weight")
    hidden = int(fc1.shape[0]) if fc1 is not None else 0
    pos = state.get("preprocessor.pos_embed")
    native = pos is None
    img = base.img_size if base is not None else 224
    if pos is not None:
        side = round(int(pos.shape[1]) ** 0.5)
        if side * side != int(pos.shape[1]):
            raise CheckpointError(f"preprocessor.pos_embed has {pos.shape[1]} positions, not a square grid")
        img = side * patch
    shape = dict(embed_dim=dim, depth=depth, patch_size=patch, mlp_hidden_dim=hidden, native=native)
    template = base if base is not None and base.is_v2 else None
    if template is None or any(getattr(template, k) != v for k, v in shape.items()):
        template = next(
            (
                f
                for f in FLAVORS.values()
                if f.is_v2 and f.img_size == img and all(getattr(f, k) == v for k, v in shape.items())
            ),
            None,
        )
    if template is None:
        last = (max(depth - 1, 0),)
        template = AimConfig(
            name="custom-aimv2",
            family="aimv2",
            embed_dim=dim,
            depth=depth,
            num_heads=max(dim // 128, 1),  # head dim 128 in every released AIMv2 (AIMV2_FACTS §1)
            patch_size=patch,
            img_size=img,
            probe_layers=last,
            best_probe_layers=last,
            num_classes=0,
            head_linear_bias=True,
            norm_eps=1e-5,
        )
    head_w = state.get("head.linear.weight")
    return template.replace(
        img_size=img,
        num_channels=channels,
        num_classes=int(head_w.shape[0]) if head_w is not None else 0,
        head_linear_bias="head.linear.bias" in state if head_w is not None else template.head_linear_bias,
        **shape,
    )


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Every way `state` differs from `model.state_dict()`: missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            problems.append(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
            )
    return problems


def load_state_dict_strict(model: AimModel, state: Mapping[str, Tensor], *, assign: bool = False) -> None:
    problems = check_state_dict(model, state)
    if problems:
        raise CheckpointError(f"checkpoint does not match {model.config.name!r}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)


# ----------------------------------------------------------------------------------------------------------------
# Building a model from files
# ----------------------------------------------------------------------------------------------------------------
def load_model_from_files(
    parts: list[LoadedCheckpoint],
    config: AimConfig | None = None,
    *,
    probe_layers: str | tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
    hf_preprocessor: Mapping[str, Any] | None = None,
    preprocess: PreprocessConfig | None = None,
) -> AimModel:
    """Merge the parts, rename their keys to ours, decide the config, build on the meta device and load strictly.

    Preprocessing, first match wins: `preprocess` (the operator's override), the recipe in our own file's
    metadata, a Hugging Face `preprocessor_config.json` (`hf_preprocessor`), Apple's transform for the config.
    """
    loaded = merge_checkpoints(parts)
    try:
        state, layout = convert_to_ours(loaded.state_dict)
    except LayoutError as exc:
        raise CheckpointError(f"{[str(f) for f in loaded.files]}: {exc}") from exc
    if config is None:
        config = AimConfig.from_dict(loaded.config) if loaded.config is not None else infer_config(state)
    if config.is_v2 and config.native != ("preprocessor.pos_embed" not in state):
        # The weights decide: a learned table means fixed resolution, none means native (Apple's native config.json
        # has the same fields as the fixed ones).
        config = infer_config(state, base=config)
    # A head file of ours (head keys only, written with include_trunk=False) knows the probe layers it was trained
    # on; they win over the trunk's defaults. An explicit `probe_layers` still wins over both (below).
    head_part = next((p for p in parts if p.config and any(k.startswith(HEAD_PREFIX) for k in p.state_dict)), None)
    if head_part is not None and head_part is not parts[0] and "probe_layers" in head_part.config:
        config = config.replace(probe_layers=tuple(head_part.config["probe_layers"]))
    head_keys = [k for k in state if k.startswith(HEAD_PREFIX)]
    if not head_keys and config.has_head:
        expected_head = [k for k in build_model(config, device="meta").state_dict() if k.startswith(HEAD_PREFIX)]
        logger.warning(
            "backbone-only checkpoint %s: head keys missing (%s); the model has no classification head",
            [str(f) for f in loaded.files],
            ", ".join(expected_head),
        )
        config = config.replace(num_classes=0)
    elif head_keys and "head.linear.weight" in state:
        # The head decides the class count: a bare trunk's config says 0 classes, a separate head file knows better.
        config = config.replace(
            num_classes=int(state["head.linear.weight"].shape[0]), head_linear_bias="head.linear.bias" in state
        )
    elif head_keys:
        config = config.replace(head_linear_bias="head.linear.bias" in state)
    if probe_layers is not None:
        config = config.with_probe_layers(probe_layers if isinstance(probe_layers, str) else tuple(probe_layers))

    model = build_model(config, device="meta")
    load_state_dict_strict(model, state, assign=True)
    model = model.to(device)
    model.eval()
    model.checkpoint_files = list(loaded.files)  # type: ignore[attr-defined]
    model.provenance = dict(loaded.provenance)  # type: ignore[attr-defined]
    model.labels = loaded.labels  # type: ignore[attr-defined]
    model.layout = layout  # type: ignore[attr-defined]
    if preprocess is not None:
        model.preprocess_config = dataclasses.replace(preprocess, origin=preprocess.origin or "override")
    elif loaded.preprocess:
        model.preprocess_config = PreprocessConfig.from_dict(loaded.preprocess)
    elif hf_preprocessor is not None:
        model.preprocess_config = from_hf_preprocessor(hf_preprocessor, config)
    else:
        model.preprocess_config = default_preprocess_config(config)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    model: AimModel,
    path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any] | None = None,
    preprocess: PreprocessConfig | None = None,
    labels: list[str] | None = None,
    include_head: bool = True,
    include_trunk: bool = True,
) -> Path:
    """Write our self-describing safetensors file atomically (temp file, fsync, rename).

    The metadata carries the config, the preprocessing, provenance and optional labels, so the file alone rebuilds
    the model and its input pipeline. `include_trunk=False` writes a head file (only `head.*` keys, the released
    head layout) whose metadata still holds the full config: `load_model(trunk, head=that_file)` takes it.
    """
    path = Path(path)
    if not (include_head or include_trunk):
        raise ValueError("nothing to save: include_head and include_trunk are both False")
    if not include_trunk and model.head is None:
        raise ValueError(f"model {model.config.name!r} has no head to save (include_trunk=False)")
    config = model.config if include_head else model.config.replace(num_classes=0)
    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if (include_head or not k.startswith(HEAD_PREFIX)) and (include_trunk or k.startswith(HEAD_PREFIX))
    }
    if labels is None:
        labels = getattr(model, "labels", None)
    if labels is not None and config.has_head and len(labels) != config.num_classes:
        raise ValueError(f"{len(labels)} labels for a head with {config.num_classes} classes")
    prep = preprocess or getattr(model, "preprocess_config", None) or default_preprocess_config(config)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "preprocess": json.dumps(prep.to_dict()),
        "provenance": json.dumps(dict(provenance or {}), default=str),
    }
    if labels is not None and config.has_head:
        meta["labels"] = json.dumps(list(labels))
    save_safetensors(tensors, path, metadata=meta)  # byte-deterministic: same weights, same sha256
    return path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
