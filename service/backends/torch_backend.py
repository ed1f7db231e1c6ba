"""PyTorch backend: an `aimcore.AimModel` in eval mode, fp32 by default, bf16/fp16 autocast on request.

Output mapping (aimcore.manifest's graph contract): "embedding" = mean over tokens of post_trunk_norm(last block),
"pooled" = the head's attention-pooled vector, "logits". When a batch asks only for pooled/logits the trunk stops
after the last probe layer (`AimModel.features` early exit).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimcore import AimModel, PreprocessConfig, sha256_file
from service.backends.base import BACKEND_OUTPUTS, BackendInfo

__all__ = ["TorchBackend", "model_sha256", "resolve_device"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Backend output -> AimModel.features output.
_FEATURES = {"embedding": "tokens", "pooled": "pooled", "logits": "logits"}


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products run several times faster than fp32 on such CPUs (about 4x on
    ours, docs/BENCHMARKS.md); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the hardware runs it natively (a CUDA GPU with bf16, or a CPU with AVX512-BF16
    / AMX), else fp32. bf16 keeps embeddings within cosine 0.9999 of fp32 on our models (docs/BENCHMARKS.md), and
    the boot self-check refuses to serve if it does not (golden_min_cosine)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return device


def model_sha256(model: AimModel) -> str:
    """Checksum of the weights that were loaded, computed as the exporter records `source.sha256`, so torch and
    exported artefacts of the same weights share one embedding recipe: the file's sha256; for several files
    (backbone + head) the sha256 of their sha256s joined by newlines; for weights never saved (random init) a
    digest of every tensor's name, dtype, shape and bytes."""
    files = [Path(f) for f in getattr(model, "checkpoint_files", []) or []]
    if files:
        digests = [sha256_file(f) for f in files]
        return digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TorchBackend:
    def __init__(
        self,
        model: AimModel,
        *,
        model_id: str,
        sha256: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch_size: int = 32,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if precision not in (*_DTYPES, "auto"):
            raise ValueError(f"precision must be auto or one of {sorted(_DTYPES)}, got {precision!r}")
        self.device = torch.device(resolve_device(device))
        precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.dtype = _DTYPES[precision]
        preprocess = getattr(model, "preprocess_config", None) or PreprocessConfig.for_size(model.config.img_size)
        self.info = BackendInfo(
            name="torch",
            model_id=model_id,
            model_sha256=sha256 or model_sha256(model),
            config=model.config,
            preprocess=preprocess,
            labels=getattr(model, "labels", None),
            precision=precision,
            device=str(self.device),
            max_batch_size=max_batch_size,
            extra={"torch": torch.__version__, "threads": torch.get_num_threads(), **(extra or {})},
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        unknown = set(outputs) - set(BACKEND_OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {BACKEND_OUTPUTS}")
        if not self.info.has_head and set(outputs) & {"pooled", "logits"}:
            raise ValueError(f"model {self.info.model_id!r} has no head: no 'pooled' or 'logits' output")
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)  # (B, C, S, S)
        with torch.inference_mode(), self._autocast():
            feats = self.model.features(x, outputs=[_FEATURES[o] for o in outputs])
            result: dict[str, torch.Tensor] = {}
            if "embedding" in outputs:
                assert feats.tokens is not None
                result["embedding"] = feats.tokens.float().mean(dim=1)  # (B, N, D) -> (B, D)
            if "pooled" in outputs:
                assert feats.pooled is not None
                result["pooled"] = feats.pooled
            if "logits" in outputs:
                assert feats.logits is not None
                result["logits"] = feats.logits
        return {k: v.float().cpu().numpy() for k, v in result.items()}

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
