"""AIMv2 through the real service on CPU (issue 11): /embed images/s per backend, and native-resolution bucketing.

    python benchmarks/aimv2.py [--blocks 2] [--seconds 8] [--rounds 2] [--write docs/BENCHMARKS.md]

1. backends: an `aimv2-large-patch14-224`-shaped trunk cut to its first `--blocks` blocks (random weights, speed does
   not depend on them), saved in Apple's layout; `python -m service` in a subprocess per variant: torch fp32, torch
   bf16 (CPU autocast), ONNX Runtime fp32 and int8 (the exported graph). A closed-loop client posts 8 JPEGs per
   multipart request at concurrency 2 for `--seconds`; images/s is the best of `--rounds` interleaved rounds.
2. native: the same proxy as `aimv2-large-patch14-native` (sin-cos of each image's grid), max_patches 256, torch
   fp32; requests of 8 images of 8 different aspect ratios, with the grid buckets on (9 grids) and off (each image
   its own grid): images/s, and tokens per image actually computed.
The machine is shared (2 cores, other jobs running): compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aimcore  # noqa: E402
from export.onnx import export_onnx  # noqa: E402

logger = logging.getLogger("benchmarks.aimv2")
HEADING = "## AIMv2 (issue 11)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def photo(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(xx / 9 + yy / 23), 127 + 100 * np.cos(yy / 13), (xx + yy) * 255 / (w + h)], -1)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def proxy(blocks: int, native: bool) -> aimcore.AimModel:
    name = "aimv2-large-patch14-native" if native else "aimv2-large-patch14-224"
    cfg = aimcore.get_flavor(name)
    cfg = cfg.replace(
        name=f"{name}:{blocks}", depth=blocks, probe_layers=(blocks - 1,), best_probe_layers=(blocks - 1,)
    )
    torch.manual_seed(0)
    return aimcore.build_model(cfg).eval()


class Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, **env, "AIM_PORT": str(self.port), "AIM_HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("service not ready")

    def info(self) -> dict:
        return httpx.get(self.url + "/info", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def throughput(url: str, blobs: list[bytes], seconds: float, concurrency: int = 2) -> float:
    files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]

    def loop(_: int) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=120) as client:
            client.post("/embed", files=files).raise_for_status()  # warm
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                client.post("/embed", files=files).raise_for_status()
                done += len(blobs)
        return done

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(loop, range(concurrency)))
    return total / (time.monotonic() - t0)


def run(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="aimv2-bench-"))
    base_env = {
        "AIM_TORCH_THREADS": str(args.threads),
        "AIM_MAX_BATCH_SIZE": "16",
        "AIM_MAX_WAIT_MS": "5",
        "AIM_DECODE_WORKERS": "1",
        "AIM_LOG_LEVEL": "warning",
    }
    fixed = proxy(args.blocks, native=False)
    ckpt = aimcore.save_checkpoint(fixed, work / "fixed.safetensors")
    export_onnx(aimcore.load_model(ckpt), work / "onnx", max_batch=16)
    export_onnx(aimcore.load_model(ckpt), work / "onnx" / "int8", max_batch=16, precision="int8")
    int8_cos = json.loads((work / "onnx" / "int8" / "manifest.json").read_text())["parity"]["real_images"]
    variants = {
        "torch fp32": {"AIM_MODEL": str(ckpt), "AIM_BACKEND": "torch", "AIM_PRECISION": "fp32"},
        "torch bf16": {"AIM_MODEL": str(ckpt), "AIM_BACKEND": "torch", "AIM_PRECISION": "bf16"},
        "onnxruntime fp32": {"AIM_MODEL": str(work / "onnx"), "AIM_BACKEND": "onnxruntime"},
        "onnxruntime int8": {"AIM_MODEL": str(work / "onnx" / "int8"), "AIM_BACKEND": "onnxruntime"},
    }
    blobs = [photo(640, 480, seed=i) for i in range(8)]
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, env in variants.items():
            server = Server({**base_env, **env})
            try:
                ips = throughput(server.url, blobs, args.seconds)
            finally:
                server.stop()
            best[name] = max(best.get(name, 0.0), ips)
            logger.warning("round %d %s: %.2f images/s", r, name, ips)

    native = proxy(args.blocks, native=True)
    nckpt = aimcore.save_checkpoint(native, work / "native.safetensors")
    shapes = [(640, 480), (480, 640), (800, 450), (450, 800), (600, 600), (900, 300), (700, 500), (500, 350)]
    nblobs = [photo(w, h, seed=i) for i, (w, h) in enumerate(shapes)]
    nbest: dict[str, float] = {}
    grids: dict[str, list] = {}
    for r in range(args.rounds):
        for label, buckets in (("buckets on (9 grids)", "true"), ("buckets off (own grid)", "false")):
            env = {
                **base_env,
                "AIM_MODEL": str(nckpt),
                "AIM_BACKEND": "torch",
                "AIM_PRECISION": "fp32",
                "AIM_MAX_PATCHES": "256",
                "AIM_NATIVE_BUCKETS": buckets,
            }
            server = Server(env)
            try:
                prep = aimcore.PreprocessConfig.from_dict(server.info()["model"]["preprocess"])
                grids[label] = [
                    tuple(d // 14 for d in aimcore.preprocess(Image.open(io.BytesIO(b)), prep).shape[:0:-1])
                    for b in nblobs
                ]
                ips = throughput(server.url, nblobs, args.seconds)
            finally:
                server.stop()
            nbest[label] = max(nbest.get(label, 0.0), ips)
            logger.warning("round %d native %s: %.2f images/s", r, label, ips)

    cmd = "python benchmarks/aimv2.py " + " ".join(sys.argv[1:])
    ref = best["torch fp32"]
    lines = [
        HEADING,
        "",
        f"`{cmd}` ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s); machine shared with other jobs: ratios only).",
        "",
        f"Proxy: `aimv2-large-patch14-224` cut to its first {args.blocks} blocks (width 1024, 8 heads, SwiGLU 2816, "
        "256 tokens; random weights). Real `python -m service` per variant, `/embed` of 8 JPEGs (640x480) per "
        f"multipart request, concurrency 2, best of {args.rounds} interleaved rounds of {args.seconds:g} s.",
        "",
        "| backend | /embed images/s | vs torch fp32 |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {ips:.2f} | {ips / ref:.2f}x |" for name, ips in best.items()]
    lines += [
        "",
        f"int8 export cosine to fp32 on the real test images: min {int8_cos['embedding_min_cosine']:.5f}.",
        "",
        "Native resolution (`aimv2-large-patch14-native` proxy, same blocks, max_patches 256, torch fp32): 8 images "
        "of 8 aspect ratios per request.",
        "",
        "| service setting | /embed images/s | grids (w x h patches) of the 8 images | mean tokens |",
        "|---|---|---|---|",
    ]
    for label, ips in nbest.items():
        g = grids[label]
        lines.append(
            f"| {label} | {ips:.2f} | {', '.join(f'{w}x{h}' for w, h in g)} | {np.mean([w * h for w, h in g]):.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if HEADING in text:
        head, _, rest = text.partition(HEADING)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    section = run(args)
    sys.stdout.write(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
