"""The service against the servers a user would pick instead, on the same model, preprocessing and load (issue 13).

    python benchmarks/peers.py [--seconds 5] [--rounds 2]    (prints the markdown for docs/BENCHMARKS.md)

Servers, each in its own process, all up at once and measured in interleaved rounds (ours, LitServe, PyTriton,
ours, ...) at 16 and 64 concurrent closed-loop clients, one JPEG/PNG (the repository's 12 test photos, up to
640x427) per request as JSON base64:
- ours: `python -m service` with no model configured (aim-demo, backend chosen by measurement at start);
- LitServe (`litserve`, batching: max_batch_size 32, batch_timeout 5 ms) running the same TorchBackend and
  `service.decoding.ImageDecoder` (aimcore.preprocess) in decode_request;
- PyTriton (`nvidia-pytriton`, Triton server with dynamic batching, max queue delay 5 ms) with the same backend,
  decoding a batch's images in a 2-thread pool inside the infer function.
The peers serve the backend and precision our server chose (read from its /info), so only the serving differs.
Also in the same run: the offline pipeline (decode + preprocess + model in one process, benchmarks/serve.py's
`offline_images_per_s`) and the pre-decoded model ceiling. Both peers are benchmark-only dependencies.
Reported: ratios (ours / best peer, served / offline), not absolute numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before torch loads (benchmarks.serve imports it): OpenMP threads that sleep when idle, as ours sets for itself
# (service/__init__.py); the peers and the offline runs inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import Sample, _exchange, free_port, jpeg_corpus, offline_images_per_s, pct  # noqa: E402

logger = logging.getLogger("benchmarks.peers")
SECTION = "## Speed (issue 13)"
BATCH, WAIT_S = 32, 0.005


# ----------------------------------------------------------------------------------------------------------------
# Peer servers (run in a child process: `python benchmarks/peers.py --serve litserve --port P --precision bf16`)
# ----------------------------------------------------------------------------------------------------------------
def _backend_and_decoder(precision: str) -> tuple[Any, Any]:  # heavy imports stay in the child
    import aimcore
    from service.backends.torch_backend import TorchBackend
    from service.decoding import DecodeLimits, ImageDecoder

    backend = TorchBackend(aimcore.load_model("aim-demo"), model_id="aim-demo", precision=precision)
    return backend, ImageDecoder(backend.info.preprocess, DecodeLimits(), workers=2)


try:  # benchmark-only dependency; the class must live at module level for LitServe's spawned workers
    import litserve as ls
except ImportError:  # pragma: no cover
    ls = None

if ls is not None:

    class AimLitAPI(ls.LitAPI):
        def setup(self, device: str) -> None:
            self.backend, self.decoder = _backend_and_decoder(os.environ.get("AIM_PEER_PRECISION", "bf16"))

        def decode_request(self, request: dict) -> np.ndarray:
            return self.decoder.decode_one(request["image"])  # (3, S, S)

        def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
            return np.stack(inputs)

        def predict(self, x: np.ndarray) -> np.ndarray:
            v = self.backend.infer(x, ["embedding"])["embedding"]
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
            return list(output)

        def encode_response(self, output: np.ndarray) -> dict:
            return {"embedding": output.tolist()}


def serve_litserve(port: int, precision: str) -> None:
    if ls is None:
        raise RuntimeError("litserve is not installed: pip install litserve")
    os.environ["AIM_PEER_PRECISION"] = precision
    api = AimLitAPI(max_batch_size=BATCH, batch_timeout=WAIT_S)
    ls.LitServer(api, accelerator="cpu", timeout=60).run(port=port, generate_client_file=False)


def serve_pytriton(port: int, precision: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    backend, decoder = _backend_and_decoder(precision)
    pool = ThreadPoolExecutor(2)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:  # image: (B, 1) bytes (base64 text)
        pixels = np.stack(list(pool.map(lambda b: decoder.decode_one(bytes(b[0]).decode()), image)))
        v = backend.infer(pixels, ["embedding"])["embedding"]
        return {"embedding": (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)}

    config = TritonConfig(http_port=port, grpc_port=free_port(), metrics_port=free_port())
    with Triton(config=config) as triton:
        triton.bind(
            model_name="aim",
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="embedding", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=int(WAIT_S * 1e6))
            ),
        )
        triton.serve()


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    path: str  # POST path
    ready: str  # GET path answering 200 when ready

    def payload(self, image: bytes) -> bytes:
        b64 = base64.b64encode(image).decode()
        if self.name == "ours":
            body = json.dumps({"images": [b64]})
        elif self.name == "litserve":
            body = json.dumps({"image": b64})
        else:  # Triton's HTTP/JSON protocol: a BYTES tensor of shape (1, 1)
            body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [b64]}]})
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body.encode()


def _get_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return b" 200 " in s.recv(200)
    except OSError:
        return False


def start(name: str, cmd: list[str], port: int, path: str, ready: str, timeout_s: float = 180) -> Server:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if name == "pytriton":
        # Triton's Python-backend stub links libpython3.X.so; without this it can load the system's copy while
        # importing this interpreter's stdlib (a patch-level mismatch: RLock has no _recursion_count).
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    # Own process group: LitServe's workers and Triton's server outlive a SIGTERM to the parent otherwise, and the
    # group is paused (SIGSTOP) while another server is measured, so an idle peer's polling loop steals no CPU.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{name} exited with {proc.returncode}: {err}")
        if _get_ok(port, ready):
            return Server(name, port, proc, path, ready)
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"{name} not ready after {timeout_s}s")


async def closed_loop(server: Server, payloads: list[bytes], concurrency: int, seconds: float) -> list[Sample]:
    samples: list[Sample] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        i = k
        while time.perf_counter() < stop:
            samples.append(await _exchange(reader, writer, payloads[i % len(payloads)]))
            i += concurrency
        writer.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return samples


def signal_group(server: Server, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, sig)


def level(
    server: Server, blobs: list[bytes], c: int, seconds: float, others: Sequence[Server] = ()
) -> tuple[float, list[Sample]]:
    """images/s and the 200 answers of `server` at `c` concurrent clients; `others` are paused meanwhile."""
    for o in others:
        signal_group(o, signal.SIGSTOP)
    try:
        return _level(server, blobs, c, seconds)
    finally:
        for o in others:
            signal_group(o, signal.SIGCONT)


def _level(server: Server, blobs: list[bytes], c: int, seconds: float) -> tuple[float, list[Sample]]:
    payloads = [server.payload(b) for b in blobs]
    t0 = time.perf_counter()
    samples = asyncio.run(closed_loop(server, payloads, c, seconds))
    ok = [s for s in samples if s.status == 200]
    if len(ok) < len(samples):
        logger.warning("%s c=%d: %d non-200 answers", server.name, c, len(samples) - len(ok))
    return len(ok) / (time.perf_counter() - t0), ok


def overhead_ms(s: Sample) -> float:
    h = s.headers
    return float(h["x-total-ms"]) - sum(float(h.get(f"x-{k}-ms", 0)) for k in ("decode", "queue", "compute"))


def run(args: argparse.Namespace) -> str:
    blobs = jpeg_corpus()
    me = sys.executable
    servers: list[Server] = []
    skipped: dict[str, str] = {}
    try:
        port = free_port()
        ours = start("ours", [me, "-m", "service", "--port", str(port), "--log-level", "warning",
                              "--max-batch-size", str(BATCH), "--max-wait-ms", str(WAIT_S * 1000),
                              "--max-queue", "256"], port, "/embed", "/readyz")  # fmt: skip
        servers.append(ours)
        info = json.loads(_http_get(ours.port, "/info"))
        chosen = info["backend"]
        precision = chosen["precision"] if chosen["name"] == "torch" else "bf16"
        logger.info("ours serves %s %s; peers get torch %s", chosen["name"], chosen["precision"], precision)
        for name, path, ready in (("litserve", "/predict", "/health"), ("pytriton", "/v2/models/aim/infer",
                                                                       "/v2/models/aim/ready")):  # fmt: skip
            port = free_port()
            cmd = [me, str(Path(__file__)), "--serve", name, "--port", str(port), "--precision", precision]
            try:
                servers.append(start(name, cmd, port, path, ready))
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                skipped[name] = str(exc)[-600:]
                logger.error("%s cannot run: %s", name, skipped[name])
        for s in servers:  # warm-up
            level(s, blobs, 8, 1.0, [o for o in servers if o is not s])
        rates: dict[tuple[str, int], list[float]] = {}
        over: dict[int, list[float]] = {}
        for r in range(args.rounds):
            for c in args.concurrency:
                for s in servers if r % 2 == 0 else servers[::-1]:
                    rate, ok = level(s, blobs, c, args.seconds, [o for o in servers if o is not s])
                    rates.setdefault((s.name, c), []).append(rate)
                    if s.name == "ours":
                        over.setdefault(c, []).extend(overhead_ms(x) for x in ok)
                    logger.info("round %d c=%d %s: %.1f img/s", r, c, s.name, rate)
        rate1, ok1 = level(ours, blobs, 1, args.seconds, servers[1:])
        over[1] = [overhead_ms(x) for x in ok1]
    finally:
        for s in servers:
            signal_group(s, signal.SIGCONT)
            signal_group(s, signal.SIGTERM)
        for s in servers:
            try:
                s.proc.wait(30)
            except subprocess.TimeoutExpired:
                signal_group(s, signal.SIGKILL)
    offline, ceiling = offline_rates(precision if chosen["name"] == "torch" else None, blobs, args.seconds)
    return report(args, chosen, precision, rates, over, skipped, offline, ceiling, rate1)


def _http_get(port: int, path: str) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).text


def offline_rates(precision: str | None, blobs: list[bytes], seconds: float) -> tuple[float, float]:
    """(offline pipeline images/s with decode, pre-decoded model images/s) at BATCH for the served backend."""
    import aimcore
    from service.backends.onnx_backend import OnnxBackend
    from service.backends.torch_backend import TorchBackend
    from service.decoding import DecodeLimits, ImageDecoder

    if precision is None:
        backend = OnnxBackend(ROOT / "aimcore/assets/aim-demo/onnx-int8", max_batch_size=BATCH)
    else:
        backend = TorchBackend(aimcore.load_model("aim-demo"), model_id="aim-demo", precision=precision)
    offline = offline_images_per_s(backend, blobs, BATCH, 2, seconds)  # type: ignore[arg-type]
    decoder = ImageDecoder(backend.info.preprocess, DecodeLimits())
    x = np.stack([decoder.decode_one(blobs[i % len(blobs)]) for i in range(BATCH)])
    backend.infer(x, ["embedding"])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.infer(x, ["embedding"])
        n += BATCH
    return offline, n / (time.perf_counter() - t0)


def report(args, chosen, precision, rates, over, skipped, offline, ceiling, rate1) -> str:
    names = sorted({n for n, _ in rates}, key=lambda n: (n != "ours", n))
    lines = [
        SECTION,
        "",
        f"{dt.date.today()}, `python benchmarks/peers.py --seconds {args.seconds:g} --rounds {args.rounds}` on "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), **shared with other engineers' "
        f"jobs** (load average {os.getloadavg()[0]:.1f} at the end); the load generator runs on the same cores. "
        f"aim-demo, one image per request (JSON base64), batch cap {BATCH}, max wait {WAIT_S * 1000:g} ms for all. "
        f"Ours served **{chosen['name']} {chosen['precision']}** (chosen by measurement at start); the peers ran "
        f"torch {precision} with the same decoder and preprocessing. Rounds interleaved (order reversed every "
        "other round); each cell is the median of the rounds.",
        "",
        "| concurrency | " + " | ".join(names) + " | ours / best peer |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for c in args.concurrency:
        med = {n: float(np.median(rates[(n, c)])) for n in names if (n, c) in rates}
        peers = [v for n, v in med.items() if n != "ours"]
        ratio = f"**{med['ours'] / max(peers):.2f}x**" if peers else "n/a"
        lines.append(f"| {c} | " + " | ".join(f"{med.get(n, float('nan')):.1f}" for n in names) + f" | {ratio} |")
    best = max(float(np.median(rates[("ours", c)])) for c in args.concurrency)
    lines += [
        "",
        f"- served (best level) / offline pipeline (decode + preprocess + model, one process, 2 decode threads): "
        f"**{best / offline:.2f}x** (target >= 0.9); / pre-decoded model at batch {BATCH}: "
        f"**{best / ceiling:.2f}x**",
        "- server overhead p50 (x-total-ms minus decode, queue, compute): "
        + ", ".join(f"{pct(over[c], 50):.2f} ms at {c} concurrent" for c in sorted(over))
        + f" (targets <= 1 ms at 1, <= 3 ms at 16); {rate1:.1f} img/s at 1 concurrent",
    ]
    for name, why in skipped.items():
        lines.append(f"- **{name} could not run here**: `{why.strip().splitlines()[-1] if why.strip() else why}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per server, level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--serve", choices=["litserve", "pytriton"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.serve == "litserve":
        serve_litserve(args.port, args.precision)
        return 0
    if args.serve == "pytriton":
        serve_pytriton(args.port, args.precision)
        return 0
    text = run(args)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
