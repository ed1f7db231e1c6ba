"""Every Prometheus metric of the service, in one place, with the `aim_` prefix.

One registry per app (not the global default), so several apps in one process (tests) never collide and /metrics
shows exactly this service. With several worker processes (`workers > 1`, service.server) prometheus_client runs
in multiprocess mode: the parent points `PROMETHEUS_MULTIPROC_DIR` at a fresh private directory before the
workers start, every worker writes its values to memory-mapped files there, and /metrics from any worker merges
all of them (MultiProcessCollector): counters and histograms sum over workers (exited ones included, so totals
never go back), and each gauge says how its per-worker values combine (`multiprocess_mode`, ignored with one
process). Info metrics are not supported in that mode, so the model's identity is a labelled gauge (same
exposition: `aim_model_info{...} 1`). Stage histograms are `*_seconds`: decode (per request, all its images), queue (per
image, admission to compute start), compute (per backend call), request (end to end, per request). The index's
metrics (`aim_index_*`) are fed by `IndexMetrics`, the IndexObserver the service hands the index, so the index
itself never imports prometheus_client.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.index.observer import IndexObserver

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "IndexMetrics", "ServiceMetrics", "multiprocess_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The shared metrics directory when this process writes its metrics there, else None.

    prometheus_client picks its value store once, when it is first imported, from the environment: both must agree
    (a directory set later would be read but never written)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or values.ValueClass is values.MutexValue:
        return None
    return path


class _InfoGauge:
    """`Info.info(labels)` on a gauge fixed at 1: Info is not supported in multiprocess mode. Setting new labels
    drops the old series (as Info does), so a reloaded model never shows two identities in one process."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._labels: tuple[str, ...] | None = None

    def info(self, labels: dict[str, str]) -> None:
        values_ = tuple(str(labels.get(n, "")) for n in self.gauge._labelnames)
        if self._labels is not None and self._labels != values_:
            self.gauge.remove(*self._labels)
        self.gauge.labels(*values_).set(1)
        self._labels = values_


# Milliseconds to a minute: the service's latencies span both (tiny CPU models to 7B on a busy GPU).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to the batch cap, and the cap itself, so a full batch lands in its own bucket."""
    edges, b = [], 1
    while b < max_batch:
        edges.append(float(b))
        b *= 2
    edges.append(float(max_batch))
    return tuple(edges)


class ServiceMetrics:
    def __init__(self, max_batch_size: int = 32, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # Multiprocess mode: /metrics merges every worker's files instead of reading this process's registry.
        self.multiprocess_dir = multiprocess_dir()
        self._merged: CollectorRegistry | None = None
        if self.multiprocess_dir is not None:
            self._merged = CollectorRegistry()
            MultiProcessCollector(self._merged, path=self.multiprocess_dir)
        self.request_seconds = Histogram(
            "aim_request_seconds", "End-to-end request time", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "aim_decode_seconds", "Decode and preprocess time per request", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "aim_queue_seconds", "Per-image wait from admission to compute start", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "aim_compute_seconds", "Backend time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "aim_batch_size", "Images per backend call", buckets=_batch_buckets(max_batch_size), registry=r
        )
        # Gauges: per-worker state sums over the live workers; health is the worst live worker; identity and
        # start-up measurements (the same in every worker) are the max over live ones, so an exited worker drops out.
        self.queue_depth = Gauge(
            "aim_queue_depth", "Images waiting for a batch", registry=r, multiprocess_mode="livesum"
        )
        self.admitted = Gauge(
            "aim_admitted_images", "Images admitted and not yet computing", registry=r, multiprocess_mode="livesum"
        )
        self.body_bytes_in_flight = Gauge(
            "aim_body_bytes_in_flight",
            "Request body bytes admitted and not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "aim_in_flight_requests", "Requests being handled", ["endpoint"], registry=r, multiprocess_mode="livesum"
        )
        self.requests = Counter(
            "aim_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.failures = Counter(
            "aim_failures",
            "Failed requests, by endpoint and reason (the error code)",
            ["endpoint", "reason"],
            registry=r,
        )
        self.images = Counter("aim_images", "Images computed, by endpoint", ["endpoint"], registry=r)
        self.dropped = Counter(
            "aim_dropped_images", "Images dropped before compute (deadline, cancelled)", ["reason"], registry=r
        )
        self.bisections = Counter("aim_batch_bisections", "Failing batches split to isolate a bad input", registry=r)
        self.ready = Gauge(
            "aim_ready", "1 when /readyz answers 200 (every live worker)", registry=r, multiprocess_mode="livemin"
        )
        self.golden_ok = Gauge(
            "aim_golden_check_ok", "1 when the boot self-check passed", registry=r, multiprocess_mode="livemin"
        )
        self.golden_min_cosine = Gauge(
            "aim_golden_min_cosine",
            "Lowest cosine between served and reference outputs at boot",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_info = _InfoGauge(
            Gauge(
                "aim_model_info",
                "What is being served (value 1)",
                ["model_id", "model_sha256", "artifact_sha256", "flavor", "backend", "device", "precision"],
                registry=r,
                multiprocess_mode="livemax",
            )
        )
        self.backend_candidate_rate = Gauge(
            "aim_backend_candidate_images_per_second",
            "Start-up measurement of each backend candidate (autoselect); chosen=1 for the one served",
            ["candidate", "batch", "eligible", "chosen"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # ----- the vector index -----
        self.index_size = Gauge(
            "aim_index_size", "Searchable items in the index", registry=r, multiprocess_mode="livemax"
        )
        self.index_tombstones = Gauge(
            "aim_index_tombstones",
            "Deleted or replaced rows awaiting compaction",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.index_search_seconds = Histogram(
            "aim_index_search_seconds",
            "Index search time per call (all its queries)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.index_top1_score = Histogram(
            "aim_index_top1_score",
            "Best cosine score per query (falling scores: the index no longer fits the traffic)",
            buckets=(0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        self.index_adds = Counter("aim_index_adds", "Items added or replaced (acknowledged, durable)", registry=r)
        self.index_deletes = Counter("aim_index_deletes", "Items deleted", registry=r)
        self.index_add_seconds = Histogram(
            "aim_index_add_seconds", "Upsert time per call, WAL fsync included", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.index_snapshot_seconds = Histogram(
            "aim_index_snapshot_seconds", "Snapshot time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.index_last_snapshot = Gauge(
            "aim_index_last_snapshot_timestamp_seconds",
            "Unix time of the last committed snapshot",
            registry=r,
            multiprocess_mode="max",
        )
        self.index_recall = Gauge(
            "aim_index_recall",
            "ANN self-check: recall@k against exact search on stored vectors",
            ["k"],
            registry=r,
            multiprocess_mode="livemin",
        )

    def record_failure(self, endpoint: str, reason: str) -> None:
        self.failures.labels(endpoint, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self._merged if self._merged is not None else self.registry)


class IndexMetrics(IndexObserver):
    """The index's observer: records what the index reports into this app's registry."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.m = metrics

    def searched(self, seconds: float, queries: int, top1_scores: Sequence[float]) -> None:
        self.m.index_search_seconds.observe(seconds)
        for score in top1_scores:
            self.m.index_top1_score.observe(score)

    def added(self, count: int, seconds: float) -> None:
        self.m.index_adds.inc(count)
        self.m.index_add_seconds.observe(seconds)

    def deleted(self, count: int) -> None:
        self.m.index_deletes.inc(count)

    def size_changed(self, live: int, tombstones: int) -> None:
        self.m.index_size.set(live)
        self.m.index_tombstones.set(tombstones)

    def snapshotted(self, seconds: float, lsn: int, size_bytes: int) -> None:
        self.m.index_snapshot_seconds.observe(seconds)
        self.m.index_last_snapshot.set_to_current_time()

    def recall_measured(self, k: int, recall: float) -> None:
        self.m.index_recall.labels(str(k)).set(recall)
