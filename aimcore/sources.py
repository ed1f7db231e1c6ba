"""`load_model(source)`: from a local file or folder, the bundled demo model, or the Hugging Face hub.

Resolution order for `source`:
1. an existing file or folder on disk;
2. a bundled model name (`aim-demo`, shipped under `aimcore/assets/`);
3. a released flavor name (`aim-600M`, `aim-1B`, `aim-3B`, `aim-7B`): the backbone and head `.pth` files of the
   `apple/AIM` Hugging Face repo; an AIMv2 flavor (`aimv2-large-patch14-224`, ...) or its hub id
   (`apple/aimv2-large-patch14-224`): that repo's safetensors, config.json and preprocessor_config.json;
4. a Hugging Face repo id (`org/name`), e.g. `apple/AIM-600M`.
A folder may be in any layout of aimcore.layouts (Apple's keys, transformers' `Aimv2VisionModel`, timm); its
`config.json` (ours, `model_type: "aimv2"` or `"aimv2_vision_model"`) and `preprocessor_config.json` are read.
The hub is only touched in cases 3-4, through `huggingface_hub` (an optional dependency). When it is missing, or
offline (`HF_HUB_OFFLINE=1`, no network) and the files are not cached, the error names the id and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aimcore.checkpoint import (
    WEIGHT_SUFFIXES,
    CheckpointError,
    load_model_from_files,
    read_weights,
)
from aimcore.config import FLAVORS, AimConfig, canonical_flavor, get_flavor
from aimcore.model import AimModel
from aimcore.preprocess import PreprocessConfig

__all__ = ["BUNDLED_DIR", "RELEASED_FILES", "ModelUnavailableError", "load_model", "resolve_files"]

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "assets"
RELEASED_REPO = "apple/AIM"
# Flavor -> the tag in the released file names (AIM_FACTS §6).
RELEASED_FILES = {
    "aim-600M": "600m_2bimgs",
    "aim-1B": "1b_5bimgs",
    "aim-3B": "3b_5bimgs",
    "aim-7B": "7b_5bimgs",
}


class ModelUnavailableError(CheckpointError):
    """The source names something we cannot get here (not on disk, not cached, offline)."""


def load_model(
    source: str | os.PathLike[str],
    config: AimConfig | Mapping[str, Any] | str | None = None,
    *,
    head: str | os.PathLike[str] | None = None,
    probe_layers: str | tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
    preprocess: PreprocessConfig | Mapping[str, Any] | None = None,
) -> AimModel:
    """Load an AIM v1 or AIMv2 model in eval mode.

    source: a weights file (backbone, merged or ours), a folder holding them, `aim-demo`, a released flavor name
    or a Hugging Face repo id. config: an AimConfig, a dict of its fields, or a flavor name; None reads it from the
    file's metadata or a config.json, else infers it from the tensor shapes (assuming head dim 128, as released).
    head: an optional separate head file (released `..._head_best_layers.pth` or ours).
    probe_layers: "best", "last" or block indices, overriding what the files imply.
    preprocess: the operator's override of the checkpoint's preprocessing (recorded with origin "override").
    """
    from aimcore.lit_sources import is_lit_source, load_lit_model

    if config is None and head is None and is_lit_source(source):  # AIMv2-LiT: two towers, no config needed
        return load_lit_model(source, device=device)  # type: ignore[return-value]
    if isinstance(config, str):
        config = get_flavor(config)
    elif isinstance(config, Mapping):
        config = AimConfig.from_dict(config)
    if isinstance(preprocess, Mapping):
        preprocess = PreprocessConfig.from_dict(preprocess)
    files, implied_layers, hf_config = resolve_files(source, head=head, probe_layers=probe_layers)
    hf_preprocessor = _hf_preprocessor(source, files)
    parts = [read_weights(f) for f in files]
    if config is None and hf_config is not None and all(p.config is None for p in parts):
        config = hf_config
    # An explicit choice wins over what the head file's name implies ("..._head_last_layers.pth").
    layers = probe_layers if probe_layers is not None else implied_layers
    model = load_model_from_files(
        parts, config, probe_layers=layers, device=device, hf_preprocessor=hf_preprocessor, preprocess=preprocess
    )
    model.source = str(source)  # type: ignore[attr-defined]
    logger.info(
        "loaded %s from %s: %s, %d blocks, width %d, head=%s, probe layers %s",
        model.config.name,
        [str(f) for f in files],
        model.config.name,
        model.config.depth,
        model.config.embed_dim,
        model.head is not None,
        list(model.config.probe_layers),
    )
    return model


def resolve_files(
    source: str | os.PathLike[str],
    *,
    head: str | os.PathLike[str] | None = None,
    probe_layers: str | tuple[int, ...] | None = None,
) -> tuple[list[Path], str | None, AimConfig | None]:
    """The weight files for `source`, the probe-layer set their names imply ("best"/"last"), and a config from a
    Hugging Face `config.json` when there is one."""
    wanted = probe_layers if isinstance(probe_layers, str) else None
    path = Path(source)
    if path.exists():
        files, implied, hf_config = _files_in(path, wanted)
    else:
        text = str(source)
        flavor = canonical_flavor(text)
        if flavor is not None and (BUNDLED_DIR / flavor).is_dir():
            files, implied, hf_config = _files_in(BUNDLED_DIR / flavor, wanted)
        elif flavor in RELEASED_FILES:
            files, implied = _released_from_hub(flavor, wanted or "best")
            hf_config = get_flavor(flavor)
        elif flavor is not None and get_flavor(flavor).is_v2 and flavor != "aimv2-debug":
            files, implied, hf_config = _files_in(
                _snapshot_from_hub(f"apple/{flavor}", patterns=["*.json", "*.safetensors"]), wanted
            )
        elif flavor is not None:
            raise ModelUnavailableError(
                f"{text!r} is a flavor with no weights here: bundled weights would be in {BUNDLED_DIR / flavor}. "
                f"Build a random model with build_model(get_flavor({flavor!r})), or pass a checkpoint path"
            )
        elif _looks_like_repo_id(text):
            files, implied, hf_config = _files_in(_snapshot_from_hub(text), wanted)
        else:
            raise ModelUnavailableError(
                f"model source {text!r} is not an existing file or folder, a bundled model, a released flavor "
                f"({', '.join(RELEASED_FILES)}) or a Hugging Face id (org/name)"
            )
    if head is not None:
        head_path = Path(head)
        if not head_path.is_file():
            raise ModelUnavailableError(f"head file not found: {head_path}")
        files = [f for f in files if not _is_head_file(f)] + [head_path]
        implied = _layers_from_name(head_path.name) or implied
    return files, implied, hf_config


def _is_head_file(path: Path) -> bool:
    return "head" in path.stem.lower()


def _layers_from_name(name: str) -> str | None:
    lowered = name.lower()
    if "best_layers" in lowered or "best-layers" in lowered:
        return "best"
    if "last_layers" in lowered or "last-layers" in lowered:
        return "last"
    return None


def _files_in(path: Path, wanted: str | None) -> tuple[list[Path], str | None, AimConfig | None]:
    if path.is_file():
        return [path], _layers_from_name(path.name), None
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise ModelUnavailableError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in folder {path}")
    heads = [p for p in weights if _is_head_file(p)]
    bodies = [p for p in weights if not _is_head_file(p)]
    if len(bodies) != 1:
        raise CheckpointError(
            f"expected one backbone or merged weights file in {path}, found {[p.name for p in bodies]}"
        )
    chosen_head: Path | None = None
    if len(heads) == 1:
        chosen_head = heads[0]
    elif len(heads) > 1:
        want = wanted or "best"
        matching = [h for h in heads if _layers_from_name(h.name) == want]
        if len(matching) != 1:
            raise CheckpointError(f"several head files in {path} ({[h.name for h in heads]}); pass head= explicitly")
        chosen_head = matching[0]
    files = bodies + ([chosen_head] if chosen_head else [])
    implied = _layers_from_name(chosen_head.name) if chosen_head else None
    return files, implied, _hf_config(path / "config.json")


_HF_CONFIG_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "num_blocks",
    "depth",
    "num_heads",
    "num_classes",
    "num_channels",
    "probe_layers",
)


def _hf_preprocessor(source: str | os.PathLike[str], files: list[Path]) -> dict[str, Any] | None:
    """The `preprocessor_config.json` beside the weights of a folder source (local or a hub snapshot)."""
    if Path(source).is_file() or not files:
        return None
    path = files[0].parent / "preprocessor_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


_V2_MODEL_TYPES = ("aimv2", "aimv2_vision_model")


def _hf_v2_config(data: Mapping[str, Any], folder: str) -> AimConfig:
    """Apple's remote-code (`model_type: "aimv2"`) or transformers' (`"aimv2_vision_model"`) config.json.

    A released shape keeps its flavor's name; `native` is settled by the weights (a learned table or none)."""
    image = data.get("image_size", 224)
    patch = data.get("patch_size", 14)
    image = image[0] if isinstance(image, list | tuple) else image
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    shape = {
        "embed_dim": int(data["hidden_size"]),
        "mlp_hidden_dim": int(data["intermediate_size"]),
        "depth": int(data["num_hidden_layers"]),
        "num_heads": int(data["num_attention_heads"]),
        "img_size": int(image),
        "patch_size": int(patch),
        "num_channels": int(data.get("num_channels", 3)),
        "norm_eps": float(data.get("rms_norm_eps", 1e-5)),
        "native": bool(data.get("is_native", False)),
    }
    base = next((f for f in FLAVORS.values() if f.is_v2 and all(getattr(f, k) == v for k, v in shape.items())), None)
    if base is not None:
        return base
    last = (shape["depth"] - 1,)
    return AimConfig(
        name=folder,
        family="aimv2",
        probe_layers=last,
        best_probe_layers=last,
        num_classes=0,
        head_linear_bias=True,
        **shape,
    )


def _hf_config(path: Path) -> AimConfig | None:
    """A `PyTorchModelHubMixin` config.json (flat: img_size, patch_size, embed_dim, num_blocks, num_heads, ...),
    or an AIMv2 one (Apple's remote code or transformers', see `_hf_v2_config`).

    A known released shape keeps its flavor's name and "best" layers; otherwise the last 6 blocks are the default
    probe layers, as for ml-aim's factories."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("model_type") in _V2_MODEL_TYPES:
        return _hf_v2_config(data, path.parent.name)
    if "embed_dim" not in data:
        return None
    fields = {k: data[k] for k in _HF_CONFIG_KEYS if k in data}
    depth = int(fields.get("num_blocks", fields.get("depth", 0)))
    base = next((f for f in FLAVORS.values() if (f.embed_dim, f.depth) == (fields["embed_dim"], depth)), None)
    merged = base.to_dict() if base is not None else {"name": path.parent.name, "probe_layers": min(6, depth)}
    merged.update(fields)
    return AimConfig.from_dict(merged)


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/")) and " " not in text


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(what: str, exc: BaseException | None) -> ModelUnavailableError:
    why = f" ({type(exc).__name__}: {exc})" if exc else ""
    mode = "HF_HUB_OFFLINE is set and it is not in the local cache" if _offline() else "it could not be downloaded"
    return ModelUnavailableError(
        f"Hugging Face model {what} is not available: {mode}{why}. Download it where there is network "
        "(huggingface-cli download ...) or pass a local file or folder instead"
    )


def _snapshot_from_hub(repo_id: str, patterns: list[str] | None = None) -> Path:
    hub = _hub()
    if hub is None:
        raise ModelUnavailableError(
            f"Hugging Face id {repo_id!r} needs the huggingface_hub package (pip install huggingface_hub), "
            "or pass a local file or folder"
        )
    try:
        local = hub.snapshot_download(
            repo_id,
            allow_patterns=patterns or ["*.json", "*.safetensors", "*.pth", "*.bin"],
            local_files_only=_offline(),
        )
    except Exception as exc:  # the hub raises many types: offline, 404, auth, network
        raise _hub_error(repr(repo_id), exc) from exc
    return Path(local)


def _released_from_hub(flavor: str, layers: str) -> tuple[list[Path], str]:
    tag = RELEASED_FILES[flavor]
    names = [f"aim_{tag}_attnprobe_backbone.pth", f"aim_{tag}_attnprobe_head_{layers}_layers.pth"]
    hub = _hub()
    what = f"{flavor!r} ({RELEASED_REPO}: {', '.join(names)})"
    if hub is None:
        raise ModelUnavailableError(
            f"released model {what} needs the huggingface_hub package (pip install huggingface_hub), "
            "or pass the local .pth files"
        )
    try:
        paths = [Path(hub.hf_hub_download(RELEASED_REPO, n, local_files_only=_offline())) for n in names]
    except Exception as exc:
        raise _hub_error(what, exc) from exc
    return paths, layers
