"""Logging set-up, metric sinks (JSONL, TensorBoard) and throughput / MFU accounting.

MFU = achieved FLOP/s per device / peak FLOP/s per device. FLOPs per image come from aimcore
(`count_flops(cfg).pretrain_step`: forward + backward of patch embedding, trunk and the pixel head). The peak is,
in order: `log.peak_tflops`, a table of known GPUs (dense bf16), or a matmul measured on this machine.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsSink", "device_peak_flops", "measure_matmul_peak", "setup_logging"]

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16/fp16 tensor-core peaks per device, FLOP/s (vendor data sheets, as torchtitan uses).
GPU_PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
}


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Configure the root logger once, at the entry point: rank 0 at `level`, other ranks warnings only.
    Handlers someone else installed (an embedding application, pytest's capture) are left alone."""
    root = logging.getLogger()
    root.setLevel(level if rank == 0 else "WARNING")
    if root.handlers:
        return
    fmt = "%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def measure_matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    *,
    size: int = 0,
    seconds: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Best sustained FLOP/s of a square matmul on `device` in `dtype` (the practical peak of this machine).
    `clock=time.process_time` gives FLOPs per CPU-second, which other processes on a shared CPU do not dilute."""
    if size == 0:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: kernel selection, caches
        a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 4
        start = clock()
        for _ in range(reps):
            a @ b
        sync()
        elapsed = max(clock() - start, 1e-9)
        best = max(best, reps * 2 * size**3 / elapsed)
    return best


def device_peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "log.peak_tflops"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():  # the more specific names come first
            if key in name:
                return peak, f"data sheet ({name})"
    return measure_matmul_peak(device, dtype), f"measured {dtype} matmul on {device.type}"


class MetricsSink:
    """Rank 0 appends metrics to `<dir>/metrics.jsonl` (one JSON object a line, floats exact) and TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool, jsonl: bool, tensorboard: bool, start_step: int) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint, so curves do not fold back.
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            record = {"kind": kind, "step": step, "time": time.time(), **metrics}
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()  # in the page cache at once: a kill -9 loses nothing already written
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
