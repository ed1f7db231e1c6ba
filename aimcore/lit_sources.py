"""Loading and saving LiT checkpoints with no config argument.

Sources: a transformers `Aimv2Model` folder (config.json with nested towers + *.safetensors), a folder or file in
Apple's layout (its shapes name a flavor, or our own metadata carries the config), or a Hugging Face id
(`apple/aimv2-large-patch14-224-lit`, fetched through aimcore.sources' hub helper). The checkpoint's tokenizer files
(tokenizer.json, or vocab.json + merges.txt) travel with the model as `model.tokenizer_dir`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimcore.checkpoint import WEIGHT_SUFFIXES, CheckpointError, read_weights
from aimcore.fsio import save_safetensors
from aimcore.lit import LIT_FLAVORS, LitConfig, LitModel, build_lit_model
from aimcore.lit_layouts import detect_lit_layout, is_lit_hf_config, lit_config_from_hf, lit_from_transformers
from aimcore.preprocess import PreprocessConfig, default_preprocess_config, from_hf_preprocessor

__all__ = ["LIT_FORMAT", "is_lit_source", "load_lit_model", "save_lit_checkpoint"]

logger = logging.getLogger(__name__)

LIT_FORMAT = "aim-lit-v1"


def _folder_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_lit_source(source: str | os.PathLike[str]) -> bool:
    """Cheap check (config or key names, no weights read) used by aimcore.load_model to dispatch."""
    path = Path(source)
    if path.is_dir():
        cfg = _folder_config(path)
        if cfg is not None:
            return is_lit_hf_config(cfg) or cfg.get("kind") == "lit"
        files = _weight_files(path)
        return bool(files) and _file_is_lit(files[0])
    if path.is_file():
        return _file_is_lit(path)
    return str(source).lower().removeprefix("apple/") in {k.lower() for k in LIT_FLAVORS}


def _file_is_lit(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return detect_lit_layout(f.keys()) is not None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _infer_config(sd: dict[str, Tensor]) -> LitConfig:
    """A released flavor whose shapes match every tensor (no config file beside Apple's weights)."""
    for cfg in LIT_FLAVORS.values():
        expected = build_lit_model(cfg, device="meta", init=False).state_dict()
        if set(expected) == set(sd) and all(expected[k].shape == sd[k].shape for k in sd):
            return cfg
    raise CheckpointError("the LiT weights match no known flavor's shapes and carry no config: pass a config.json")


def load_lit_model(source: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> LitModel:
    """A LiT model in eval mode, strictly loaded (every key, every shape)."""
    path = Path(source)
    if not path.exists():
        from aimcore.sources import _snapshot_from_hub

        path = _snapshot_from_hub(str(source) if "/" in str(source) else f"apple/{source}")
    folder = path if path.is_dir() else path.parent
    files = _weight_files(path) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    sd: dict[str, Tensor] = {}
    meta_config: dict[str, Any] | None = None
    meta_preprocess: dict[str, Any] | None = None
    for f in files:  # sharded transformers exports: model-0000x-of-0000n.safetensors
        part = read_weights(f)
        sd.update(part.state_dict)
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device="cpu") as h:
                meta = h.metadata() or {}
            if meta.get("format") == LIT_FORMAT:
                meta_config = json.loads(meta["config"])
                meta_preprocess = json.loads(meta["preprocess"]) if meta.get("preprocess") else None
    layout = detect_lit_layout(sd)
    if layout is None:
        raise CheckpointError(f"{path} is not a LiT checkpoint (no text tower / logit scale keys)")
    if layout == "transformers":
        sd = lit_from_transformers(sd)
    folder_cfg = _folder_config(folder) if path.is_dir() else None
    if meta_config is not None:
        cfg = LitConfig.from_dict(meta_config)
    elif folder_cfg is not None and is_lit_hf_config(folder_cfg):
        cfg = lit_config_from_hf(folder_cfg, name=folder.name)
    else:
        cfg = _infer_config(sd)
    model = build_lit_model(cfg, device="meta", init=False)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and expected[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"LiT checkpoint {path} does not fit {cfg.name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True, assign=True)
    model = model.to(device).eval()
    model.source = str(source)  # type: ignore[attr-defined]
    model.checkpoint_files = files  # type: ignore[attr-defined]  # the recipe's model_sha256 digests them
    model.preprocess_config = _preprocess(folder, cfg, meta_preprocess)  # type: ignore[attr-defined]
    tok = folder if any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json")) else None
    model.tokenizer_dir = tok  # type: ignore[attr-defined]
    logger.info("loaded LiT %s from %s (%s layout), tokenizer %s", cfg.name, path, layout, tok)
    return model


def _preprocess(folder: Path, cfg: LitConfig, stored: dict[str, Any] | None) -> PreprocessConfig:
    """The image tower's preprocessing: our metadata's, else the folder's preprocessor_config.json (CLIP mean/std
    for the released LiT), else Apple's transform (AIMV2_FACTS §4)."""
    if stored is not None:
        return PreprocessConfig.from_dict(stored)
    hf = folder / "preprocessor_config.json"
    if hf.is_file():
        return from_hf_preprocessor(json.loads(hf.read_text()), cfg.vision)
    return default_preprocess_config(cfg.vision)


def save_lit_checkpoint(model: LitModel, path: str | os.PathLike[str]) -> Path:
    """Apple-layout safetensors with the config in the metadata: `load_lit_model(path)` rebuilds it alone."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": LIT_FORMAT, "config": json.dumps(model.config.to_dict())}
    prep = getattr(model, "preprocess_config", None)
    if prep is not None:
        meta["preprocess"] = json.dumps(prep.to_dict())
    save_safetensors(tensors, path, metadata=meta)
    return path
