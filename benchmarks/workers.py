"""Does `python -m service --workers N` serve more images per second than one worker, on this machine? (issue 13)

    python benchmarks/workers.py [--seconds 6] [--rounds 3] [--concurrency 16] [--precision bf16]

Both servers up at once, the bundled aim-demo pinned to one backend (`--backend torch --precision P`, so both serve
the same path), measured in interleaved rounds (N=1, N=2, N=2, N=1, ...) with the other paused (SIGSTOP on its
process group), closed loop, one JPEG/PNG per request as JSON base64 (benchmarks/peers.py's load generator):
- N=1: torch threads = all cores, 2 decode threads (the default layout);
- N=2: each worker with cores/2 torch threads and 2 decode threads (the same core budget; more threads would
  oversubscribe the cores).
Prints one markdown table row per configuration: img/s per round and the median.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the service sets for itself (service/__init__.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import Server, _http_get, jpeg_corpus, level, signal_group, start  # noqa: E402
from benchmarks.serve import free_port  # noqa: E402

logger = logging.getLogger("benchmarks.workers")


def wait_all_ready(port: int, n: int, timeout_s: float = 300) -> None:
    """start() returns on the first ready worker: poll /info on fresh connections until n distinct pids are ready
    (the kernel hands each new connection to one of the workers)."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(pids)} of {n} workers became ready")
        info = json.loads(_http_get(port, "/info"))
        if info.get("status") == "ready":
            pids.add(info.get("worker", {}).get("pid", 0))
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per round and configuration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--precision", default="bf16", help="torch precision served by both")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cores = os.cpu_count() or 1
    blobs = jpeg_corpus()
    servers: dict[int, Server] = {}
    try:
        for n in args.workers:
            port = free_port()
            threads = max(1, cores // n)
            cmd = [
                sys.executable, "-m", "service", "--port", str(port), "--workers", str(n), "--backend", "torch",
                "--precision", args.precision, "--torch-threads", str(threads), "--log-level", "warning",
            ]  # fmt: skip
            servers[n] = start("ours", cmd, port, "/embed", "/readyz", timeout_s=300)
            wait_all_ready(port, n)
            signal_group(servers[n], signal.SIGSTOP)
        rates: dict[int, list[float]] = {n: [] for n in servers}
        order = list(servers)
        for r in range(args.rounds):
            for n in order if r % 2 == 0 else reversed(order):
                others = [s for m, s in servers.items() if m != n]
                signal_group(servers[n], signal.SIGCONT)
                level(servers[n], blobs, args.concurrency, 1.0, others)  # warm-up: every worker's first batches
                rate, _ = level(servers[n], blobs, args.concurrency, args.seconds, others)
                signal_group(servers[n], signal.SIGSTOP)
                rates[n].append(rate)
                logger.info("round %d, workers=%d: %.1f img/s", r, n, rate)
        lines = [f"| workers | img/s at {args.concurrency} concurrent, per round | median |", "|---|---|---|"]
        for n, rs in rates.items():
            lines.append(f"| {n} | {', '.join(f'{x:.1f}' for x in rs)} | {statistics.median(rs):.1f} |")
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        for s in servers.values():
            signal_group(s, signal.SIGCONT)
            signal_group(s, signal.SIGTERM)
        for s in servers.values():
            try:
                s.proc.wait(timeout=60)
            except Exception:
                signal_group(s, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
