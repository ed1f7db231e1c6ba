"""Both LiT towers on ONNX Runtime: a directory written by `python -m export onnx` for a LiT checkpoint
(export.lit_onnx: image.onnx, text.onnx, lit_manifest.json, reference.npz, tokenizer files).

The same protocol and outputs as service.backends.lit_backend: the image backend's "embedding" is the projected
image vector; `.text` serves token ids -> "text_embeds". The text tower's boot self-check also re-runs the
export's stored torch fp32 vectors (`stored_reference`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from aimcore.lit import LitConfig
from aimcore.preprocess import PreprocessConfig, default_preprocess_config
from service.backends.base import BackendInfo
from service.backends.lit_backend import LIT_IMAGE_POOLING

__all__ = ["LIT_MANIFEST", "LitOnnxImageBackend", "is_lit_export", "load_lit_onnx_backend"]

logger = logging.getLogger(__name__)

LIT_MANIFEST = "lit_manifest.json"  # export.lit_onnx writes it; the service never imports export


def is_lit_export(source: str | None) -> bool:
    return source is not None and (Path(source) / LIT_MANIFEST).is_file()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_sha(manifest: dict[str, Any]) -> str | None:
    """The source checkpoint's digest, computed as model_sha256 does, so ONNX and torch share one recipe."""
    digests = [f["sha256"] for f in manifest["source"].get("files", [])]
    if not digests:
        return None
    return digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


class _Session:
    def __init__(self, directory: Path, part: dict[str, Any], threads: int | None) -> None:
        import onnxruntime as ort

        path = directory / part["file"]
        if _sha256(path) != part["sha256"]:
            raise ValueError(f"{path} does not match its manifest's sha256: export it again")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input, self.output = part["input"], part["output"]

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output], {self.input: x})[0], dtype=np.float32)


class LitOnnxTextBackend:
    def __init__(self, directory: Path, manifest: dict[str, Any], info: BackendInfo, threads: int | None) -> None:
        self.session = _Session(directory, manifest["text"], threads)
        self.info = dataclasses.replace(info, extra={**info.extra})
        cfg = LitConfig.from_dict(manifest["config"])
        self.context_length, self.eos_token_id = cfg.text.context_length, cfg.text.eos_token_id
        ref = np.load(directory / manifest["reference"])
        self.stored_reference = (ref["input_ids"], ref["text_embeds"])

    def infer(self, ids: np.ndarray, outputs: Collection[str] = ("text_embeds",)) -> dict[str, np.ndarray]:
        return {"text_embeds": self.session.run(np.ascontiguousarray(ids, dtype=np.int64))}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class LitOnnxImageBackend:
    def __init__(self, directory: str | Path, *, max_batch_size: int = 32, threads: int | None = None) -> None:
        self.directory = Path(directory)
        manifest = json.loads((self.directory / LIT_MANIFEST).read_text())
        cfg = LitConfig.from_dict(manifest["config"])
        self.session = _Session(self.directory, manifest["image"], threads)
        prep = manifest.get("preprocess")
        tok = next(
            (self.directory / n for n in ("tokenizer.json", "vocab.json") if (self.directory / n).is_file()), None
        )
        self.info = BackendInfo(
            name="onnxruntime",
            model_id=str(self.directory),
            model_sha256=manifest["image"]["sha256"],
            config=dataclasses.replace(cfg.vision, num_classes=0),
            preprocess=PreprocessConfig.from_dict(prep) if prep else default_preprocess_config(cfg.vision),
            labels=None,
            device="cpu",
            max_batch_size=max_batch_size,
            extra={
                "weights_sha256": _source_sha(manifest),
                "source": manifest["source"],
                "export_parity": manifest["parity"],
                "lit": {
                    "name": cfg.name,
                    "projection_dim": cfg.projection_dim,
                    "text": dataclasses.asdict(cfg.text),
                    "tokenizer": str(tok) if tok else None,
                    "logit_scale": float(manifest["logit_scale"]),
                },
                "output_dims": {"embedding": cfg.projection_dim},
                "poolings": {"embedding": LIT_IMAGE_POOLING},
                "recipe_norms": {
                    "embedding": "image tower: post_trunk_norm, attention-pooling head (1 query), then image_projector"
                },
            },
        )
        self.text = LitOnnxTextBackend(self.directory, manifest, self.info, threads)

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        if set(outputs) - {"embedding"}:
            raise ValueError(f"a LiT image tower has only the 'embedding' output, not {sorted(set(outputs))}")
        return {"embedding": self.session.run(np.ascontiguousarray(pixels, dtype=np.float32))}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self.text.close()


def load_lit_onnx_backend(settings: Any) -> Any:
    from service.backends import LoadedBackend

    backend = LitOnnxImageBackend(
        settings.model, max_batch_size=settings.max_batch_size, threads=settings.torch_threads
    )
    reason = "a LiT ONNX export: both towers on ONNX Runtime (CPUExecutionProvider)"
    logger.info("backend onnxruntime (LiT) for %s: %s", settings.model, reason)
    return LoadedBackend(backend, reason, None, reference=None)
