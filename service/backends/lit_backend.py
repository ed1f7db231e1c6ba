"""Serving an AIMv2-LiT model: the image tower behind the ordinary image protocol, the text tower beside it.

For a LiT model the image backend's "embedding" output is the projected LiT image vector (B, P) (pooling head,
then image_projector): the vector text queries are compared with, and what the index stores. Its recipe says so
(`pooling: "lit_image"`), so an index of LiT image vectors never mixes with mean-pooled trunk vectors or with
text vectors (`pooling: "lit_text"`).

The text tower is a second backend with the same shape of protocol, `infer(ids (B, L) int64, outputs)` ->
{"text_embeds": (B, P)}, served by its own batcher (service.text): texts and images never share a batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimcore import PreprocessConfig
from aimcore.lit import LitModel
from aimcore.preprocess import default_preprocess_config
from service.backends.base import BackendInfo
from service.backends.torch_backend import model_sha256, resolve_device

__all__ = [
    "LIT_IMAGE_POOLING",
    "LIT_TEXT_POOLING",
    "LitImageBackend",
    "LitTextBackend",
    "lit_info_extra",
    "lit_preprocess_config",
    "load_lit_backend",
]

logger = logging.getLogger(__name__)

LIT_IMAGE_POOLING = "lit_image"
LIT_TEXT_POOLING = "lit_text"


def lit_info_extra(model: LitModel, tokenizer: str | None) -> dict[str, Any]:
    """What the recipe and /info say about a LiT model's towers (service.engine and service.index.recipe read
    `output_dims` / `poolings` / `recipe_norms` to describe "embedding" as the LiT image vector)."""
    cfg = model.config
    return {
        "lit": {
            "name": cfg.name,
            "projection_dim": cfg.projection_dim,
            "text": dataclasses.asdict(cfg.text),
            "tokenizer": tokenizer,
            "logit_scale": float(model.logit_scale.detach()),
        },
        "output_dims": {"embedding": cfg.projection_dim},
        "poolings": {"embedding": LIT_IMAGE_POOLING},
        "recipe_norms": {
            "embedding": "image tower: post_trunk_norm, attention-pooling head (1 query), then image_projector"
        },
    }


def lit_preprocess_config(model: LitModel) -> PreprocessConfig:
    """The image tower's preprocessing: the checkpoint's own when it carries one, else AIMv2's default."""
    own = getattr(model, "preprocess_config", None)
    return own if own is not None else default_preprocess_config(model.config.vision)


class LitImageBackend:
    """The image tower: (B, 3, S, S) pixels -> {"embedding": (B, P)}. No trained classifier head
    (`info.has_head` is False): zero-shot /classify goes through the text tower instead."""

    def __init__(
        self,
        model: LitModel,
        *,
        model_id: str,
        device: str = "cpu",
        max_batch_size: int = 32,
        preprocess: PreprocessConfig | None = None,
        tokenizer: str | None = None,
    ) -> None:
        self.device = torch.device(resolve_device(device))
        self.model = model.to(self.device).eval()
        vision = model.config.vision
        sha = model_sha256(model)  # type: ignore[arg-type]  # any module: digest of its tensors or files
        self.info = BackendInfo(
            name="torch",
            model_id=model_id,
            model_sha256=sha,
            # The tower's trunk shape; num_classes 0: its pooling head is not a classifier.
            config=dataclasses.replace(vision, num_classes=0),
            preprocess=preprocess or lit_preprocess_config(model),
            labels=None,
            device=str(self.device),
            max_batch_size=max_batch_size,
            extra={"torch": torch.__version__, **lit_info_extra(model, tokenizer)},
        )
        self.text = LitTextBackend(model, self.info, max_batch_size=max_batch_size)

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        if set(outputs) - {"embedding"}:
            raise ValueError(f"a LiT image tower has only the 'embedding' output, not {sorted(set(outputs))}")
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = self.model.encode_image(x)  # (B, P)
        return {"embedding": out.float().cpu().numpy()}

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class LitTextBackend:
    """The text tower: (B, L) int64 token ids -> {"text_embeds": (B, P)}, projected, not normalised."""

    def __init__(self, model: LitModel, image_info: BackendInfo, *, max_batch_size: int = 32) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.info = dataclasses.replace(image_info, extra={**image_info.extra})
        self.info.max_batch_size = max_batch_size
        self.context_length = model.config.text.context_length
        self.eos_token_id = model.config.text.eos_token_id

    def infer(self, ids: np.ndarray, outputs: Collection[str] = ("text_embeds",)) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)  # (B, L)
        with torch.inference_mode():
            out = self.model.encode_text(x)  # (B, P)
        return {"text_embeds": out.float().cpu().numpy()}

    def close(self) -> None:
        pass


def tokenizer_file(folder: Path | None) -> str | None:
    if folder is None:
        return None
    for name in ("tokenizer.json", "vocab.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def load_lit_backend(settings: Any) -> Any:
    """A LoadedBackend for a LiT checkpoint named by `settings.model` (torch; ONNX exports go through
    service.backends.lit_onnx)."""
    from aimcore.lit_sources import load_lit_model
    from service.backends import LoadedBackend

    model = load_lit_model(str(settings.model))
    tok = getattr(model, "tokenizer_dir", None)
    if settings.text_tokenizer:
        tok = Path(settings.text_tokenizer)
    backend = LitImageBackend(
        model,
        model_id=str(settings.model),
        device=settings.device,
        max_batch_size=settings.max_batch_size,
        tokenizer=tokenizer_file(tok),
    )
    reason = "a LiT checkpoint: both towers on torch"
    logger.info("backend torch (LiT) for %s: %s", settings.model, reason)
    return LoadedBackend(backend, reason, None, reference=None)
