"""TensorRT backend over an exported engine directory (`model.plan` + `manifest.json`, see aimcore.manifest).

Needs the `tensorrt` Python package (TensorRT 10 API: named I/O tensors, `execute_async_v3`) and a CUDA GPU;
device buffers come from torch's CUDA allocator. Importing this module never fails: the check happens when a
backend is built, with a message that says what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from aimcore import sha256_file
from aimcore.manifest import INPUT_NAME, read_manifest
from service.backends.base import BackendInfo

__all__ = ["TensorRTBackend", "tensorrt_available"]

logger = logging.getLogger(__name__)


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install tensorrt; needs an NVIDIA GPU)"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False, "torch is needed for CUDA buffers"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, ""


class TensorRTBackend:
    def __init__(self, directory: str | Path, *, device: str = "cuda", max_batch_size: int = 32) -> None:
        ok, why = tensorrt_available()
        if not ok:
            raise RuntimeError(f"the tensorrt backend cannot run here: {why}. Use --backend onnxruntime or torch")
        import tensorrt as trt
        import torch

        self._torch = torch
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest.kind != "tensorrt":
            raise ValueError(f"{self.directory} holds a {manifest.kind!r} artefact, not a TensorRT engine")
        path = self.directory / manifest.artifact
        if sha256_file(path) != manifest.artifact_sha256:
            raise ValueError(f"{path} does not match its manifest checksum: rebuild the engine")
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not load {path}: engines are tied to the GPU model and TensorRT "
                f"version that built them (manifest runtime: {manifest.runtime}); rebuild it on this machine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: self._torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.outputs}
        profile_max = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        if max_batch_size > profile_max:
            logger.warning(
                "max batch size %d > the engine profile's %d; using %d", max_batch_size, profile_max, profile_max
            )
        self.stream = torch.cuda.Stream(device=self.device)
        self.info = BackendInfo.from_manifest(
            "tensorrt",
            manifest,
            self.directory,
            device=str(self.device),
            max_batch_size=min(max_batch_size, profile_max),
            tensorrt=trt.__version__,
        )

    @staticmethod
    def _torch_dtype(trt: Any, dtype: Any) -> Any:
        import torch

        table = {trt.float32: torch.float32, trt.float16: torch.float16}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[dtype]

    def infer(self, pixels: np.ndarray, outputs: Collection[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            raise ValueError(f"the engine has no output {missing}; it has {self.outputs}")
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device, non_blocking=True)
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            # Every output needs a buffer, asked for or not.
            buffers = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            result = {n: buffers[n].float().cpu().numpy() for n in outputs}
        self.stream.synchronize()
        return result

    def close(self) -> None:
        self.context = None
        self.engine = None
