"""Several workers per host (issue 13): one coherent /metrics (prometheus_client multiprocess mode) and one backend
choice shared by every worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.parser import text_string_to_metric_families

from aimcore import AimModel
from service.backends.autoselect import SHARED_DIR_ENV, Candidate, select_backend, torch_candidates
from service.backends.base import InferenceBackend
from service.metrics import MULTIPROC_ENV, ServiceMetrics, _InfoGauge
from service.settings import Settings
from tests.conftest import encode, make_photo
from tests.service.test_drain import free_port

ROOT = Path(__file__).resolve().parents[2]


def _touch_all(m: ServiceMetrics) -> None:
    """Every metric of ServiceMetrics once (labelled ones with one label set)."""
    for metric in vars(m).values():
        if isinstance(metric, _InfoGauge):
            metric.info({"model_id": "x", "backend": "torch"})
            continue
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        child = metric.labels(*["v"] * len(metric._labelnames)) if metric._labelnames else metric
        if isinstance(metric, Histogram):
            child.observe(0.01)
        elif isinstance(metric, Counter):
            child.inc()
        else:
            child.set(1)


def test_every_metric_merges_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker-like processes each count once: the merged exposition says 2 for counters, histograms and
    summed gauges, 1 for min/max gauges, and no metric is lost (Info is not supported in that mode) or split by pid."""
    # Two workers in this process: prometheus_client's multiprocess value store under two process ids (the real
    # multi-process server is test_two_workers_share_metrics_and_backend).
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    stores = []
    for pid in (1001, 1002):
        stores.append(values.MultiProcessValue(lambda pid=pid: pid))
        monkeypatch.setattr(values, "ValueClass", stores[-1])
        worker = ServiceMetrics(8)
        assert worker.multiprocess_dir == str(tmp_path)
        _touch_all(worker)
    for store in stores:
        store.close_all_files()
    merged = {f.name: f for f in text_string_to_metric_families(worker.exposition().decode())}
    monkeypatch.undo()
    local = ServiceMetrics(8)  # this process: no multiprocess dir, the per-app registry as before
    assert local.multiprocess_dir is None
    expected = {f.name for f in local.registry.collect()}
    assert expected <= set(merged), sorted(expected - set(merged))
    assert "aim_model_info" in merged
    for family in merged.values():
        for s in family.samples:
            assert "pid" not in s.labels, (s.name, "a gauge without an aggregating multiprocess_mode")
    by_name = {s.name: s.value for f in merged.values() for s in f.samples if not s.name.endswith("_bucket")}
    assert by_name["aim_requests_total"] == 2 and by_name["aim_request_seconds_count"] == 2
    assert by_name["aim_in_flight_requests"] == 2 and by_name["aim_queue_depth"] == 2  # livesum
    assert by_name["aim_ready"] == 1 and by_name["aim_model_info"] == 1  # livemin / livemax
    # Every gauge chose how workers combine (the default "all" would split each series by pid).
    gauges = [g for g in vars(local).values() if isinstance(g, Gauge)] + [local.model_info.gauge]
    assert all(g._multiprocess_mode != "all" for g in gauges)


def test_autoselect_choice_is_made_once_and_shared(
    tmp_path: Path, debug_model: AimModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a multi-worker parent the first worker measures every candidate and leaves its choice; a later worker
    builds only the chosen one (no timing), and both selections say who measured."""
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    settings = Settings(precision="fp32", max_batch_size=4, autoselect_seconds=0.2)
    builds: list[str] = []

    def candidates() -> list[Candidate]:
        out = []
        for c in torch_candidates(debug_model, settings, "cpu", "aim-debug") * 2:  # two passing: timing happens
            name = f"{c.name}-{len(out)}"

            def build(c: Candidate = c, name: str = name) -> InferenceBackend:
                builds.append(name)
                return c.build()

            out.append(Candidate(name, build))
        return out

    first, _, sel1 = select_backend(candidates(), debug_model, settings)
    assert sorted(builds) == ["torch-fp32-0", "torch-fp32-1"] and sel1.shared["role"] == "measured"
    builds.clear()
    second, backend, sel2 = select_backend(candidates(), debug_model, settings)
    assert builds == [first.name] and second.name == first.name and backend.info.precision == "fp32"
    assert sel2.shared == {"role": "reused", "measured_by_pid": os.getpid(), "pid": os.getpid()}
    assert [m.images_per_s for m in sel2.measurements] == pytest.approx(
        [m.images_per_s for m in sel1.measurements], abs=0.01
    )
    assert sel2.to_dict()["shared"]["role"] == "reused"


def _client_pid(client: httpx.Client) -> int:
    return client.get("/info").json()["worker"]["pid"]


@pytest.mark.slow
def test_two_workers_share_metrics_and_backend(tmp_path: Path) -> None:
    """Real `python -m service --workers 2` with the bundled aim-demo: requests land on both workers, /metrics from
    either reports all of them, and both serve the backend the first worker measured."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AIM_PRECISION": "auto",  # several candidates, so there is a choice to share
        "AIM_AUTOSELECT_SECONDS": "1",
        "AIM_MAX_BATCH_SIZE": "8",
        "AIM_TORCH_THREADS": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "service", "--workers", "2", "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        infos: dict[int, dict] = {}
        deadline = time.monotonic() + 240
        while len(infos) < 2:  # fresh connections until both workers answered ready
            assert time.monotonic() < deadline and proc.poll() is None, "workers did not start"
            try:
                with httpx.Client(base_url=url, timeout=30) as c:
                    if c.get("/readyz").status_code == 200:
                        info = c.get("/info").json()
                        infos[info["worker"]["pid"]] = info
            except httpx.TransportError:
                time.sleep(0.3)
        backends = {(i["backend"]["name"], i["backend"]["precision"]) for i in infos.values()}
        assert len(backends) == 1, backends
        shared = [i["backend"]["selection"]["shared"] for i in infos.values()]
        assert sorted(s["role"] for s in shared) == ["measured", "reused"]
        assert len({s["measured_by_pid"] for s in shared}) == 1
        assert all(i["worker"]["workers"] == 2 for i in infos.values())
        assert all(i["worker"]["metrics"] == "merged over workers" for i in infos.values())
        photo = encode(make_photo(64, 48), "JPEG")
        per_pid: dict[int, int] = defaultdict(int)
        while min(per_pid.get(p, 0) for p in infos) < 3:  # one connection per request: the kernel spreads them
            assert sum(per_pid.values()) < 400, f"requests did not reach both workers: {dict(per_pid)}"
            with httpx.Client(base_url=url, timeout=30) as c:  # keep-alive: /info and /embed on one worker
                pid = _client_pid(c)
                assert c.post("/embed", files=[("files", ("a.jpg", photo))]).status_code == 200
                per_pid[pid] += 1
        total = sum(per_pid.values())
        answered: dict[int, float] = {}
        while len(answered) < 2:
            with httpx.Client(base_url=url, timeout=30) as c:
                pid = _client_pid(c)
                families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
            embeds = sum(
                s.value
                for s in families["aim_requests"].samples
                if s.name == "aim_requests_total" and s.labels == {"endpoint": "/embed", "status": "200"}
            )
            answered[pid] = embeds
            assert families["aim_ready"].samples[0].value == 1.0
        assert answered == {p: total for p in infos}, (answered, dict(per_pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out = proc.communicate(timeout=60)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    shared_dir = re.search(r"shared through (\S+)", out)
    assert shared_dir and not Path(shared_dir.group(1)).exists(), "the private metrics directory was left behind"
