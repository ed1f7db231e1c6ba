"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

1. First signal: the engine turns "draining" (/readyz 503, requests still served) for `drain_grace_s`, long
   enough for load balancers and Kubernetes probes to notice and stop routing here.
2. Then uvicorn stops accepting connections and waits up to `drain_timeout_s` for in-flight requests; the
   lifespan then stops the batcher (what is queued is computed first) and frees the backend. Exit code 0.
A second signal skips the grace period; a third forces exit. A start that cannot become ready (load error,
failed self-check) exits with code 1, so the orchestrator sees the failure instead of an unready pod forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.backends.autoselect import SHARED_DIR_ENV
from service.engine import Engine
from service.listener import accept_queue_length, refuse_new_connections
from service.main import create_app
from service.metrics import MULTIPROC_ENV
from service.settings import Settings

__all__ = ["DrainingServer", "serve"]

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.exit_code = 0
        self.linger_s = 1.0
        self._signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown (exit status -15 instead of 0).
        self._signals += 1
        if self._signals == 1 and self.grace_s > 0:
            logger.info("signal %d: draining for %.1fs before closing the listener", sig, self.grace_s)
            self.engine.begin_drain()
            timer = threading.Timer(self.grace_s, self._stop)
            timer.daemon = True
            timer.start()
        elif self._signals <= 2:
            self.engine.begin_drain()
            self._stop()
        else:
            self.force_exit = True

    def _stop(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop taking connections without resetting any, then let idle keep-alive connections linger.

        uvicorn closes the listener and every idle connection in the same instant. Connections the kernel had
        already accepted but the loop had not are reset with their request sent (service.listener), and a client
        whose next request was on its way on an idle connection sees it closed with no answer: 2 of 4
        SIGTERM-under-load runs lost a request. Here the listener stops taking handshakes, what is parked is
        accepted and served, the listener closes, and a request that arrives on an open connection during
        `linger_s` is still read and answered (with `Connection: close`, set by the middleware while draining).
        """
        listeners = [sock for server in self.servers for sock in (server.sockets or ())] or list(sockets or [])
        filtered = [sock for sock in listeners if refuse_new_connections(sock)]
        deadline = time.monotonic() + 2.0
        while filtered and time.monotonic() < deadline:  # the loop accepts what the kernel parked, then we close
            if not any(accept_queue_length(sock) for sock in filtered):
                break
            await asyncio.sleep(0.01)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        deadline = time.monotonic() + (self.linger_s if self._signals <= 1 else 0.0)  # a second signal: hurry
        while self.server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)

    def fail(self, reason: str) -> None:
        """Called by the engine when it cannot become ready."""
        logger.error("exiting: %s", reason)
        self.exit_code = 1
        self.should_exit = True


def build_server(settings: Settings, app: FastAPI | None = None) -> DrainingServer:
    app = app or create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured once, by the entry point
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        timeout_keep_alive=30,
    )
    server = DrainingServer(config, app.state.engine, settings.drain_grace_s)
    app.state.engine.on_fatal = server.fail
    return server


def serve(settings: Settings) -> int:
    """Serve until a signal; returns the exit code."""
    # The event loop shares the GIL with the decode and compute threads: after each socket wait it may queue up to
    # one switch interval for the GIL (the convoy effect). 5 ms is CPython's default; lower trades a little thread
    # throughput for loop latency (measured side by side in benchmarks/serve.py --compare-switch).
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    if settings.workers > 1:
        return _serve_workers(settings)
    server = build_server(settings)
    logger.info("serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
    server.run()
    return server.exit_code


def _export_settings(settings: Settings) -> None:
    """Each worker process builds its own app from the environment: hand the effective settings down."""
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        if name == "api_keys":
            value = ",".join(k.get_secret_value() for k in settings.api_keys)
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        os.environ[f"AIM_{name.upper()}"] = str(value)


def _reap_dead_workers(metrics_dir: Path, parent_pid: int, stop: threading.Event, every_s: float = 1.0) -> None:
    """Drop the live-gauge files of workers that are gone (crashed, restarted by uvicorn, or exited), so their
    last in-flight / queue values stop counting; their counters and histograms stay in the totals."""
    from prometheus_client import multiprocess

    while not stop.wait(every_s):
        for pid in {int(f.stem.rsplit("_", 1)[1]) for f in metrics_dir.glob("gauge_live*_*.db")}:
            if pid == parent_pid:
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, str(metrics_dir))
                logger.info("worker %d is gone: its live gauges are dropped from /metrics", pid)
            except PermissionError:  # alive under another user (pid reused): not ours to judge
                pass


def _serve_workers(settings: Settings) -> int:
    """`workers > 1`: uvicorn's multi-process supervisor, one coherent /metrics, one backend choice.

    The parent creates a private directory before any worker starts: `prometheus/` for prometheus_client's
    multiprocess files (PROMETHEUS_MULTIPROC_DIR, read by every worker's /metrics), and the autoselect hand-off
    file (service.backends.autoselect: the first worker measures under a file lock, the others serve its choice).
    It is removed at exit, so counts never leak between runs. Drain: uvicorn's supervisor forwards SIGTERM /
    SIGINT to every worker at once; each stops accepting, finishes its in-flight requests within
    `drain_timeout_s` and runs the lifespan shutdown (queued images are computed), but there is no `drain_grace_s`
    period with /readyz 503 first (the workers run uvicorn's own Server, not DrainingServer): put the grace period
    in the orchestrator (a preStop sleep) instead. docs/SERVICE.md "Several workers".
    """
    _export_settings(settings)
    root = Path(tempfile.mkdtemp(prefix="aim-workers-"))
    metrics_dir = root / "prometheus"
    metrics_dir.mkdir()
    if os.environ.get(MULTIPROC_ENV):
        logger.warning("%s=%s replaced by a fresh private %s", MULTIPROC_ENV, os.environ[MULTIPROC_ENV], metrics_dir)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    os.environ[SHARED_DIR_ENV] = str(root)
    stop = threading.Event()
    reaper = threading.Thread(
        target=_reap_dead_workers, args=(metrics_dir, os.getpid(), stop), name="aim-metrics-reaper", daemon=True
    )
    reaper.start()
    logger.info("workers' metrics and backend choice shared through %s", root)
    logger.warning(
        "%d workers: each loads the model (the first measures the backends, the others serve its choice); "
        "/metrics merges all workers; no drain grace period (uvicorn's supervisor)",
        settings.workers,
    )
    try:
        uvicorn.run(
            "service.main:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        )
    finally:
        stop.set()
        reaper.join(timeout=5)
        shutil.rmtree(root, ignore_errors=True)
        for name in (MULTIPROC_ENV, SHARED_DIR_ENV):
            os.environ.pop(name, None)
    return 0
