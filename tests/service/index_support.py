"""Helpers shared by the index route tests: near-duplicates of real images, base64, polling, metric reading."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import encode

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "images"
KEY = "index-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def near_duplicate(data: bytes) -> bytes:
    """Resized to 70 % and re-encoded as JPEG quality 75: what a re-upload of the same photo looks like."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    small = rgb.resize((int(rgb.width * 0.7), int(rgb.height * 0.7)), Image.Resampling.LANCZOS)
    return encode(small, "JPEG", quality=75)


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout_s}s")
        time.sleep(0.05)


def metric_samples(text: str) -> dict[str, float]:
    """name{label="v",...} -> value, for every sample of a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
