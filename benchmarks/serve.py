"""The service against its own offline pipeline, in one run: same model, backend, batch cap, images and threads.

    python benchmarks/serve.py [--flavor aim-demo] [--seconds 6] [--write docs/BENCHMARKS.md]

1. offline: decode + preprocess (service.decoding, the same thread pool size) pipelined with backend.infer at the
   batch cap, in one process: the ceiling for this model on this machine;
2. served: `python -m service` in a subprocess; a closed-loop load generator (raw HTTP/1.1 keep-alive over
   asyncio, one JPEG per request as multipart) at concurrency 1, 4, 16, 64: images/s, client p50/p99, and the
   server's own overhead from the timing headers (x-total-ms minus decode, queue and compute);
3. overload: an open-loop generator at 4x the saturated rate; latency of the 429 answers.
Targets (ANCHORS §9): served >= 0.95 x offline at saturation, overhead p50 <= 1 ms, rejection <= 5 ms.
Random weights (speed does not depend on them). The load generator shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aimcore  # noqa: E402
from service.backends.torch_backend import TorchBackend  # noqa: E402
from service.decoding import DecodeLimits, ImageDecoder  # noqa: E402

logger = logging.getLogger("benchmarks.serve")
IMAGES = ROOT / "tests" / "assets" / "images"
SECTION = "## Service: served vs offline throughput (benchmarks/serve.py)"
NOTE = (
    "Reading these figures: the other jobs on the machine move every number by tens of percent between runs, so"
    " only same-run ratios mean much. Served can exceed offline: the offline loop stacks batches and waits for "
    "decoding on its compute thread, while the server overlaps parsing, decoding and compute on three threads. "
    "Overhead grows with concurrency because a finished batch of up to 32 answers is encoded and sent one after"
    " another on the single event loop (the last waits for the others), while the compute thread already holds "
    "the GIL for the next batch; several uvicorn workers (`--workers`) spread that fan-out at the cost of one "
    "model copy each."
)


def jpeg_corpus() -> list[bytes]:
    """The repository's real test images (JPEG and PNG, 100x80 to 640x427)."""
    return [p.read_bytes() for p in sorted(IMAGES.iterdir()) if p.suffix in (".jpg", ".png")]


# ----------------------------------------------------------------------------------------------------------------
# Offline
# ----------------------------------------------------------------------------------------------------------------
def offline_images_per_s(backend: TorchBackend, blobs: list[bytes], batch: int, workers: int, seconds: float) -> float:
    """Decode batch i+1 in the thread pool while batch i computes; images/s over `seconds`."""
    decoder = ImageDecoder(backend.info.preprocess, DecodeLimits(), workers=workers)
    pool = ThreadPoolExecutor(workers)

    def decode(start: int) -> list:
        return [pool.submit(decoder.decode_one, blobs[(start + i) % len(blobs)]) for i in range(batch)]

    backend.infer(np.stack([f.result() for f in decode(0)]), ["embedding"])  # warm-up
    done, pending, t0 = 0, decode(0), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pixels = np.stack([f.result() for f in pending])
        pending = decode(done + batch)
        backend.infer(pixels, ["embedding"])
        done += batch
    elapsed = time.perf_counter() - t0
    pool.shutdown()
    decoder.close()
    return done / elapsed


# ----------------------------------------------------------------------------------------------------------------
# Load generator
# ----------------------------------------------------------------------------------------------------------------
def multipart_request(image: bytes, port: int) -> bytes:
    boundary = b"aimbenchboundary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n"
    )
    head = (
        f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary="
        f"{boundary.decode()}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


@dataclass
class Sample:
    status: int
    latency_s: float
    headers: dict[str, str] = field(default_factory=dict)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> Sample:
    t0 = time.perf_counter()
    writer.write(payload)
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return Sample(status, time.perf_counter() - t0, headers)


async def closed_loop(port: int, payloads: list[bytes], concurrency: int, seconds: float) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < stop:
            samples.append(await _exchange(reader, writer, payloads[i % len(payloads)]))
            i += concurrency
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return samples, time.perf_counter() - t0


async def open_loop(port: int, payloads: list[bytes], rate: float, seconds: float, conns: int) -> list[Sample]:
    """Requests start at `rate`/s whatever the answers; each on the next free keep-alive connection."""
    samples: list[Sample] = []
    free: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        free.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def one(i: int) -> None:
        conn = await free.get()
        samples.append(await _exchange(*conn, payloads[i % len(payloads)]))
        free.put_nowait(conn)

    tasks, t0, i = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    return samples


async def open_loop_due(port: int, payloads: list[bytes], rate: float, seconds: float) -> list[Sample]:
    """Open loop as an outside client sees it: request i is due at t0 + i/rate and its latency counts from then;
    it takes an idle keep-alive connection or opens a new one, so the client itself never queues."""
    samples: list[Sample] = []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(i: int, due: float) -> None:
        conn = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        try:
            sample = await _exchange(*conn, payloads[i % len(payloads)])
        except (ConnectionError, asyncio.IncompleteReadError, IndexError, ValueError):
            samples.append(Sample(0, time.perf_counter() - due))
            conn[1].close()
            return
        sample.latency_s = time.perf_counter() - due
        samples.append(sample)
        if sample.headers.get("connection", "").lower() == "close":
            conn[1].close()
        else:
            idle.append(conn)

    tasks, t0, i = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        tasks.append(asyncio.create_task(one(i, t0 + i / rate)))
        i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return samples


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def overhead_ms(s: Sample) -> float:
    h = s.headers
    return float(h["x-total-ms"]) - sum(float(h.get(f"x-{k}-ms", 0)) for k in ("decode", "queue", "compute"))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args: argparse.Namespace, switch_ms: float) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "service", "--model", str(ckpt), "--port", str(port), "--torch-threads",
        str(args.threads), "--max-batch-size", str(args.batch), "--max-wait-ms", str(args.max_wait_ms),
        "--decode-workers", str(args.workers), "--max-queue", str(args.max_queue), "--log-level", "warning",
        "--switch-interval-ms", str(switch_ms), "--precision", args.precision,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                if b" 200 " in s.recv(200):
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


@dataclass
class Level:
    concurrency: int
    images_per_s: float
    p50: float
    p99: float
    overhead_p50: float
    overhead_p99: float
    mean_batch: float
    errors: int


@dataclass
class Overload:
    rate: float
    sent: int
    accepted: int
    rejected: int
    client_p50: float
    client_p99: float
    server_p50: float
    server_p99: float


def measure_level(port: int, payloads: list[bytes], c: int, seconds: float) -> Level:
    samples, elapsed = asyncio.run(closed_loop(port, payloads, c, seconds))
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s * 1000 for s in ok]
    over = [overhead_ms(s) for s in ok]
    batch = [int(s.headers.get("x-batch-size", 0)) for s in ok]
    level = Level(c, len(ok) / elapsed, pct(lat, 50), pct(lat, 99), pct(over, 50), pct(over, 99),
                  float(np.mean(batch)) if batch else 0.0, len(samples) - len(ok))  # fmt: skip
    logger.info("c=%d: %.1f images/s p50 %.1f ms p99 %.1f ms overhead p50 %.2f ms", c, level.images_per_s,
                level.p50, level.p99, level.overhead_p50)  # fmt: skip
    return level


def measure_overload(port: int, payloads: list[bytes], rate: float, seconds: float, conns: int) -> Overload:
    samples = asyncio.run(open_loop(port, payloads, rate, seconds, conns=conns))
    rejected = [s for s in samples if s.status == 429]
    client = [s.latency_s * 1000 for s in rejected]
    server = [float(s.headers["x-total-ms"]) for s in rejected]
    result = Overload(rate, len(samples), sum(s.status == 200 for s in samples), len(rejected), pct(client, 50),
                      pct(client, 99), pct(server, 50), pct(server, 99))  # fmt: skip
    logger.info("overload at %.0f/s: %d rejected, server p50 %.2f ms", rate, len(rejected), result.server_p50)
    return result


def serve_and_measure(
    ckpt: Path, blobs: list[bytes], args: argparse.Namespace, switch_ms: float, levels: list[int], rate: float | None
) -> tuple[list[Level], Overload]:
    """Start a server, run the closed-loop levels, then the open-loop overload at `rate` (default 4x the best)."""
    port = free_port()
    proc = start_server(ckpt, port, args, switch_ms)
    try:
        payloads = [multipart_request(b, port) for b in blobs]
        asyncio.run(closed_loop(port, payloads, 8, 1.0))  # warm-up
        rows = [measure_level(port, payloads, c, args.seconds) for c in levels]
        rate = rate or 4 * max(r.images_per_s for r in rows)
        overload = measure_overload(port, payloads, rate, args.seconds / 2, conns=4 * args.max_queue)
    finally:
        proc.terminate()
        proc.wait(30)
    return rows, overload


OVERLOAD_SECTION = "## Service under 4x overload (benchmarks/serve.py --overload)"


def overload_run(args: argparse.Namespace, ckpt: Path, blobs: list[bytes]) -> str:
    """Default admission settings (max_queue 256, max_queue_wait_s 1): saturation closed-loop at concurrency 16,
    then an open loop at 4x that rate as an outside client sees it, with the server's RSS before and after."""
    port = free_port()
    args.max_queue = 256
    proc = start_server(ckpt, port, args, args.switch_interval_ms)
    try:
        payloads = [multipart_request(b, port) for b in blobs]
        asyncio.run(closed_loop(port, payloads, 8, 1.0))  # warm-up
        idle_rss = rss_mib(proc.pid)
        saturated = measure_level(port, payloads, 16, args.seconds)
        rate = 4 * saturated.images_per_s
        t0 = time.perf_counter()
        samples = asyncio.run(open_loop_due(port, payloads, rate, args.overload_seconds))
        elapsed = time.perf_counter() - t0
        peak_rss = rss_mib(proc.pid)
        time.sleep(2.0)
        after_rss = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [s.latency_s * 1000 for s in samples if s.status == 200]
    refused = [s.latency_s * 1000 for s in samples if s.status == 429]
    server_refused = [float(s.headers["x-total-ms"]) for s in samples if s.status == 429 and "x-total-ms" in s.headers]
    queue = [float(s.headers.get("x-queue-ms", 0)) for s in samples if s.status == 200]
    other = len(samples) - len(ok) - len(refused)
    logger.info("overload: %d ok, %d refused (p99 %.1f ms), %d other", len(ok), len(refused), pct(refused, 99), other)
    lines = [
        OVERLOAD_SECTION,
        "",
        f"{dt.date.today()}, `python benchmarks/serve.py --overload --flavor {args.flavor} --seconds {args.seconds:g}"
        f" --overload-seconds {args.overload_seconds:g} --precision {args.precision}` on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}. Default admission "
        "(max_queue 256 images, max_queue_wait_s 1 s), one JPEG/PNG per request. Saturation: closed loop at "
        f"concurrency 16 = **{saturated.images_per_s:.1f} images/s**. Then an open loop at 4 x that = {rate:.0f} "
        f"requests/s for {args.overload_seconds:g} s ({len(samples)} requests), latency from each request's due "
        "time as the client sees it (the client never queues: a new connection when none is idle).",
        "",
        "| answered | count | client p50 ms | client p99 ms |",
        "|---|---|---|---|",
        f"| 200 | {len(ok)} ({len(ok) / elapsed:.1f}/s = {len(ok) / elapsed / saturated.images_per_s:.2f} x "
        f"saturation) | {pct(ok, 50):.1f} | {pct(ok, 99):.1f} |",
        f"| 429 | {len(refused)} | {pct(refused, 50):.1f} | **{pct(refused, 99):.1f}** |",
        f"| other (errors, resets) | {other} | | |",
        "",
        f"- 429 server-side (x-total-ms) p50 {pct(server_refused, 50):.2f} ms / p99 {pct(server_refused, 99):.2f} ms;"
        f" accepted requests' queue wait p50 {pct(queue, 50):.0f} ms / p99 {pct(queue, 99):.0f} ms "
        "(targets: 429 p99 <= 50 ms at the client; accepted p99 <= max_queue_wait_s + one batch).",
        f"- server RSS: idle {idle_rss:.0f} MiB, end of overload {peak_rss:.0f} MiB, 2 s later {after_rss:.0f} MiB.",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blobs = jpeg_corpus()
    config = aimcore.get_flavor(args.flavor)
    if args.blocks:  # a compute-bound proxy: the flavor's width and resolution, only the first blocks
        last = tuple(range(max(0, args.blocks - 2), args.blocks))
        config = config.replace(depth=args.blocks, probe_layers=last, best_probe_layers=last)
    model = aimcore.build_model(config).eval()
    tmp = Path(tempfile.mkdtemp(prefix="aim-serve-bench-"))
    ckpt = aimcore.save_checkpoint(model, tmp / f"{args.flavor}.safetensors")
    if args.overload:
        return overload_run(args, ckpt, blobs)
    backend = TorchBackend(
        aimcore.load_model(ckpt), model_id=str(ckpt), max_batch_size=args.batch, precision=args.precision
    )
    # Offline before and after the served runs; the better one is the ceiling (the machine is shared and noisy).
    offline = [offline_images_per_s(backend, blobs, args.batch, args.workers, args.seconds)]
    rows, overload = serve_and_measure(ckpt, blobs, args, args.switch_interval_ms, args.concurrency, None)
    offline.append(offline_images_per_s(backend, blobs, args.batch, args.workers, args.seconds))
    logger.info("offline: %s images/s", [round(o, 1) for o in offline])
    compare = []
    if args.compare_switch:
        top = max(args.concurrency)
        for switch_ms in (5.0, 0.5):
            level, ovl = serve_and_measure(ckpt, blobs, args, switch_ms, [top], overload.rate)
            compare.append((switch_ms, level[0], ovl))
    return report(args, max(offline), offline, rows, overload, compare)


def report(
    args: argparse.Namespace,
    offline: float,
    offline_runs: list[float],
    rows: list[Level],
    overload: Overload,
    compare: list[tuple[float, Level, Overload]],
) -> str:
    cpu = platform.processor() or platform.machine()
    saturated = max(r.images_per_s for r in rows)
    load = os.getloadavg()[0]
    lines = [
        SECTION,
        "",
        f"{dt.date.today()}, `python benchmarks/serve.py --flavor {args.flavor} --seconds {args.seconds:g}"
        + (f" --blocks {args.blocks}" if args.blocks else "")
        + f" --precision {args.precision}` on "
        f"{os.cpu_count()} CPU cores ({cpu}) shared with other jobs (load average {load:.1f} at the end), torch "
        f"{torch.__version__}, {args.threads} torch thread, {args.workers} decode thread, batch cap {args.batch}, "
        f"max wait {args.max_wait_ms:g} ms, admission limit {args.max_queue} images, GIL switch interval "
        f"{args.switch_interval_ms:g} ms, random {args.flavor} weights, the 12 test images (JPEG/PNG up to "
        "640x427), one image per request (multipart). The load generator runs on the same cores as the server.",
        "",
        f"- offline pipeline (same decode threads + torch at batch {args.batch}, one process; best of "
        f"{', '.join(f'{o:.1f}' for o in offline_runs)}): **{offline:.1f} images/s**",
        f"- served at saturation: **{saturated:.1f} images/s = {saturated / offline:.2f} x offline** (target >= 0.95)",
        "",
        "| concurrency | images/s | p50 ms | p99 ms | overhead p50 ms | overhead p99 ms | mean batch | non-200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.concurrency} | {r.images_per_s:.1f} | {r.p50:.1f} | {r.p99:.1f} | {r.overhead_p50:.2f} | "
            f"{r.overhead_p99:.2f} | {r.mean_batch:.1f} | {r.errors} |"
        )
    o = overload
    lines += [
        "",
        "Overhead = x-total-ms - (decode + queue + compute) from each response's timing headers: HTTP body "
        "parsing, admission, hand-offs between the event loop and the decode/compute threads, JSON encoding "
        "(target p50 <= 1 ms).",
        "",
        f"Overload: open loop at 4 x saturation = {o.rate:.0f} requests/s for {args.seconds / 2:g} s ({o.sent} sent): "
        f"{o.accepted} answered 200, {o.rejected} refused with 429. Rejection latency server-side (x-total-ms) p50 "
        f"**{o.server_p50:.2f} ms** / p99 {o.server_p99:.2f} ms, client-side p50 {o.client_p50:.2f} ms / p99 "
        f"{o.client_p99:.2f} ms (target <= 5 ms).",
        "",
        NOTE,
        "",
    ]
    if compare:
        lines += [
            f"GIL switch interval, same run, concurrency {compare[0][1].concurrency} then the same overload rate:",
            "",
            "| switch interval | images/s | overhead p50 ms | overhead p99 ms | 429 p50 ms | 429 p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for ms, level, ovl in compare:
            lines.append(
                f"| {ms:g} ms | {level.images_per_s:.1f} | {level.overhead_p50:.2f} | {level.overhead_p99:.2f} | "
                f"{ovl.server_p50:.2f} | {ovl.server_p99:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_section(path: Path, text: str, section: str = SECTION) -> None:
    """Replace this benchmark's section in `path` (or append it); other sections are left alone."""
    header = "# Benchmarks\n\nMeasured side by side; each section gives its command and machine.\n"
    old = path.read_text() if path.exists() else header
    if section in old:
        start = old.index(section)
        end = old.find("\n## ", start + len(section))
        old = old[:start].rstrip("\n") + ("\n" + old[end:] if end != -1 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="aim-demo")
    parser.add_argument("--seconds", type=float, default=6.0, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=0, help="keep only the first N blocks (compute-bound proxy)")
    parser.add_argument("--precision", default="fp32", help="torch precision, offline and served alike")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64, help="admission limit (images)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see benchmarks/backends.py)")
    parser.add_argument("--workers", type=int, default=1, help="decode threads, offline and served")
    parser.add_argument("--switch-interval-ms", type=float, default=5.0, help="the server's GIL switch interval")
    parser.add_argument("--compare-switch", action="store_true", help="also run the top level at 5 ms and 0.5 ms")
    parser.add_argument("--overload", action="store_true", help="only the 4x open-loop overload run (own section)")
    parser.add_argument("--overload-seconds", type=float, default=30.0, help="length of the open-loop overload run")
    parser.add_argument("--write", type=Path, default=None, help="replace/append the section in this markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = run(args)
    sys.stdout.write(text + "\n")
    if args.write:
        write_section(args.write, text, OVERLOAD_SECTION if args.overload else SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
