"""The index across server lifetimes: a clean restart keeps everything (the timer and shutdown snapshot it), kill -9
of a real `python -m service` process mid-burst loses no acknowledged write, a second writer and an index of
another recipe are refused at startup, and a read-only replica follows the writer's snapshots."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np

from service.backends.fake_backend import FakeBackend
from service.settings import Settings
from tests.service.conftest import serve
from tests.service.index_support import b64, near_duplicate, wait_until
from tests.service.test_drain import ROOT, free_port

NAMES = ("landscape_640x427.jpg", "odd_255x333.png", "portrait_427x640.jpg", "rgba_260x300.png")


def test_restart_keeps_items_and_refuses_other_recipes(
    debug_checkpoint: Path, tmp_path: Path, live: list, asset_bytes: dict[str, bytes]
) -> None:
    directory = str(tmp_path / "index")
    settings = Settings(model=str(debug_checkpoint), index_path=directory, index_snapshot_interval_s=0.3)
    first = serve(settings)
    live.append(first)
    with first.client() as client:
        images = [b64(asset_bytes[n]) for n in NAMES]
        assert client.post("/index/items", json={"ids": list(NAMES[:3]), "images": images[:3]}).status_code == 200
        # The background timer folds the WAL into a snapshot without any request asking for it.
        wait_until(lambda: client.get("/index").json()["wal_ops_pending"] == 0, what="the timer's snapshot")
        assert client.get("/index").json()["last_snapshot"] is not None
        assert client.post("/index/items", json={"ids": [NAMES[3]], "images": images[3:]}).status_code == 200
        # A second writer on the same directory is refused at startup (one process writes an index).
        second_writer = serve(Settings(index_path=directory, golden_check=False), FakeBackend())
        live.append(second_writer)
        assert second_writer.engine.status == "failed" and "open for writing" in second_writer.engine.reason
    first.stop()  # shutdown: final snapshot, lock released

    restarted = serve(settings)
    live.append(restarted)
    with restarted.client() as client:
        info = client.get("/index").json()
        assert info["size"] == 4 and info["wal_ops_pending"] == 0 and info["last_snapshot"]["lsn"] == info["lsn"]
        queries = [b64(near_duplicate(asset_bytes[n])) for n in NAMES]
        results = client.post("/search", json={"images": queries, "k": 2}).json()["results"]
        assert [r["ids"][0] for r in results] == list(NAMES)
    restarted.stop()

    # Another model (the fake backend: other weights) and another pooling of the same model are both refused.
    for other, backend in (
        (Settings(index_path=directory, golden_check=False), FakeBackend()),
        (Settings(model=str(debug_checkpoint), index_path=directory, index_pooling="probe"), None),
    ):
        server = serve(other, backend)
        live.append(server)
        assert server.engine.status == "failed", server.engine.reason
        assert "recipe" in server.engine.reason
        with server.client() as client:
            assert client.get("/readyz").json()["status"] == "failed"
            r = client.post("/search", json={"id": NAMES[0]})
            assert (r.status_code, r.json()["error"]["code"]) == (503, "startup_failed")
        server.stop()


def test_read_only_replica_follows_the_writer(tmp_path: Path, live: list) -> None:
    directory = str(tmp_path / "index")
    writer = serve(Settings(index_path=directory, golden_check=False, index_kind="flat"), FakeBackend())
    live.append(writer)
    with writer.client() as w:
        fingerprint = w.get("/index").json()["recipe"]["fingerprint"]
        vectors = np.random.default_rng(0).standard_normal((3, 64)).tolist()
        w.post("/index/items", json={"ids": ["a", "b", "c"], "vectors": vectors, "recipe": fingerprint})
        w.post("/index/snapshot")
        replica_settings = Settings(
            index_path=directory, golden_check=False, index_read_only=True, index_snapshot_interval_s=0.2
        )
        replica = serve(replica_settings, FakeBackend())
        live.append(replica)
        with replica.client() as r:
            info = r.get("/index").json()
            assert info["read_only"] and info["size"] == 3 and info["type"] == "flat"
            hits = r.post("/search", json={"vectors": vectors[1:2], "recipe": fingerprint, "k": 1}).json()
            assert hits["results"][0]["ids"] == ["b"]
            for method, path, body in (
                ("POST", "/index/items", {"ids": ["d"], "vectors": vectors[:1], "recipe": fingerprint}),
                ("DELETE", "/index/items/a", None),
                ("POST", "/index/snapshot", None),
            ):
                resp = r.request(method, path, json=body)
                assert (resp.status_code, resp.json()["error"]["code"]) == (403, "index_read_only"), path
            # The writer adds and snapshots; the replica reloads on its next tick.
            w.post("/index/items", json={"ids": ["late"], "vectors": vectors[:1], "recipe": fingerprint})
            w.post("/index/snapshot")
            wait_until(lambda: r.get("/index/items/late").status_code == 200, what="the replica's reload")
            assert r.get("/index").json()["size"] == 4


class Burst:
    """What the clients saw: adds and deletes acknowledged (200 received: fsynced before the answer), and every
    delete sent (one in flight at the kill may or may not have happened)."""

    def __init__(self) -> None:
        self.acked: set[str] = set()
        self.deleted: set[str] = set()
        self.delete_sent: set[str] = set()
        self.stop = threading.Event()


def _burst(url: str, fingerprint: str, seen: Burst, seed: int) -> None:
    """Adds of 4 raw vectors per request, and now and then a delete of an id this thread saw acknowledged."""
    rng = np.random.default_rng(seed)
    mine: list[str] = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for n in range(10_000):
            if seen.stop.is_set():
                return
            try:
                if n % 5 == 4 and mine:
                    victim = mine.pop(0)
                    seen.delete_sent.add(victim)
                    if client.delete(f"/index/items/{victim}").status_code == 200:
                        seen.deleted.add(victim)
                    continue
                ids = [f"t{seed}-{n}-{j}" for j in range(4)]
                body = {"ids": ids, "vectors": rng.standard_normal((4, 64)).tolist(), "recipe": fingerprint}
                if client.post("/index/items", json=body).status_code == 200:
                    seen.acked.update(ids)
                    mine.extend(ids)
            except httpx.TransportError:  # the server was killed
                return


def test_kill9_mid_burst_loses_no_acknowledged_write(debug_checkpoint: Path, tmp_path: Path, live: list) -> None:
    directory = tmp_path / "index"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model", str(debug_checkpoint), "--index-path", str(directory), "--port", str(port)]
    args += ["--index-snapshot-interval-s", "0.2", "--no-golden-check", "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen = Burst()
    try:

        def up() -> bool:
            assert proc.poll() is None, "the server exited"
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout_s=60, what="the server process")
        fingerprint = httpx.get(url + "/index").json()["recipe"]["fingerprint"]
        threads = [threading.Thread(target=_burst, args=(url, fingerprint, seen, s)) for s in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(seen.acked) >= 200, timeout_s=30, what="200 acknowledged adds")
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: requests in flight, snapshots every 0.2 s
        seen.stop.set()
        for t in threads:
            t.join(15)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, stderr
    assert seen.deleted, "the burst should have deleted some ids"

    restarted = serve(Settings(model=str(debug_checkpoint), index_path=str(directory), golden_check=False))
    live.append(restarted)
    with restarted.client() as client:
        kept = seen.acked - seen.delete_sent
        lost = [i for i in sorted(kept) if client.get(f"/index/items/{i}").status_code != 200]
        assert not lost, f"acknowledged adds lost after kill -9: {lost[:10]}"
        resurrected = [i for i in sorted(seen.deleted) if client.get(f"/index/items/{i}").status_code != 404]
        assert not resurrected, f"acknowledged deletes undone after kill -9: {resurrected[:10]}"
        assert client.get("/index").json()["size"] >= len(kept)
