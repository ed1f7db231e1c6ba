"""FAISS index benchmark: build time, memory, queries/s and recall@k against exact search, for every index kind the
service offers and a sweep of its search knob (efSearch, nprobe), as a recall-vs-QPS table.

    python benchmarks/index.py --sizes 100000,1000000 [--dim 1536] [--queries 1000] [--json out.json]

Indexes are built with the service's own code (service.index.faiss_ops and IndexConfig defaults), so the figures
describe what `VectorIndex` serves. Vectors are shaped like real embeddings, never uniform noise (on which every ANN
index looks useless): a Gaussian mixture with Zipf-sized clusters in a 64-dimensional latent space, projected to
`dim` by a random orthonormal map, plus isotropic noise carrying ~10 % of the energy, L2-normalised. Queries are
fresh draws from the same distribution. Data are regenerated per index (deterministic by seed) so only one index
is in memory at a time: peak ~ 2 x n x dim x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.index.config import IndexConfig
from service.index.faiss_ops import new_untrained, search_params, train_index, training_sample_size

logger = logging.getLogger("benchmarks.index")

CHUNK = 50_000
SWEEPS = {
    "hnsw": ("ef_search", [16, 32, 64, 128, 256, 512]),
    "ivf": ("nprobe", [1, 2, 4, 8, 16, 32, 64, 128]),
    "ivfpq": ("nprobe", [8, 16, 32, 64]),
}
REFINE_FACTORS = [4, 16, 64]  # IVF-PQ: candidates re-ranked exactly per wanted result


class Mixture:
    """Clustered, low-intrinsic-dimension unit vectors (see the module docstring)."""

    def __init__(self, n: int, dim: int, seed: int, latent: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.latent, self.seed = dim, latent, seed
        clusters = max(50, n // 200)
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.spread = rng.uniform(0.3, 0.7, clusters).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.8  # Zipf-like: a few big albums, many small ones
        self.weights = weights / weights.sum()
        q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
        self.projection = q.T.astype(np.float32)  # (latent, dim), orthonormal rows
        # Ambient noise per dimension so that it carries ~10 % of a vector's energy.
        signal = float(np.mean(np.sum(self.centres**2, axis=1)) + latent * np.mean(self.spread**2))
        self.noise = np.float32(np.sqrt(0.1 / 0.9 * signal / dim))

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        c = rng.choice(len(self.centres), size=n, p=self.weights)
        z = self.centres[c] + self.spread[c, None] * rng.standard_normal((n, self.latent), dtype=np.float32)
        x = z @ self.projection + self.noise * rng.standard_normal((n, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, n: int) -> Iterator[np.ndarray]:
        for i, start in enumerate(range(0, n, CHUNK)):
            yield self.draw(min(CHUNK, n - start), seed=self.seed * 1_000_003 + i)


@dataclass
class Result:
    kind: str
    n: int
    build_s: float
    memory_mib: float
    points: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def build(kind: str, data: Mixture, n: int, config: IndexConfig) -> tuple[faiss.Index, float, float]:
    before = rss_mib()
    started = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(data.dim)
    elif kind == "hnsw":
        index = new_untrained(config, data.dim)
    else:
        size = training_sample_size(n, config)
        sample = data.draw(size, seed=data.seed * 7 + 1)
        index = train_index(config, sample, n_total=n)
        del sample
    for chunk in data.chunks(n):
        index.add(chunk)
    return index, time.perf_counter() - started, rss_mib() - before


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, float]:
    """(rows, queries/s): the median of repeated batched searches (at least 3 runs and 1 s): the machine is
    shared, and a single short run says more about the neighbours' load than about the index."""
    index.search(queries[:16], k, params=params)  # warm caches and thread pools
    rates, total, rows = [], 0.0, None
    while len(rates) < 3 or total < 1.0:
        started = time.perf_counter()
        _, rows = index.search(queries, k, params=params)
        elapsed = time.perf_counter() - started
        rates.append(queries.shape[0] / elapsed)
        total += elapsed
        if elapsed > 5.0:  # one long run (exact search at 1M) is already a stable figure
            break
    return rows, float(np.median(rates))


def recall_at(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(t)) / len(t) for r, t in zip(rows, truth, strict=True)]))


def run_size(n: int, args: argparse.Namespace) -> list[Result]:
    data = Mixture(n, args.dim, seed=args.seed)
    queries = data.draw(args.queries, seed=10**9 + n)
    results: list[Result] = []
    started = time.perf_counter()
    flat, build_s, mem = build("flat", data, n, IndexConfig(kind="flat"))
    truth, exact_qps = timed_search(flat, queries, args.k, None)
    del flat
    results.append(Result("flat", n, build_s, mem, [{"knob": "-", "recall": 1.0, "qps": exact_qps, "speedup": 1.0}]))
    logger.info("n=%d flat: build %.1fs, %.0f MiB, %.1f q/s", n, build_s, mem, exact_qps)
    for kind in args.types:
        if kind == "flat":
            continue
        if time.perf_counter() - started > args.budget_s:
            results.append(Result(kind, n, 0.0, 0.0, note=f"skipped: over the {args.budget_s:.0f}s budget"))
            logger.warning("n=%d %s skipped: time budget spent", n, kind)
            continue
        config = IndexConfig(kind=kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, nlist=args.nlist)
        index, build_s, mem = build(kind, data, n, config)
        result = Result(kind, n, build_s, mem)
        knob, values = SWEEPS[kind]
        factors = REFINE_FACTORS if kind == "ivfpq" else [config.refine_factor]
        for factor in factors:
            for value in values:
                params = search_params(index, config.replace(refine_factor=factor), None, **{knob: value})
                rows, qps = timed_search(index, queries, args.k, params)
                label = f"{knob}={value}" + (f", refine={factor}" if kind == "ivfpq" else "")
                result.points.append(
                    {"knob": label, "recall": recall_at(rows, truth), "qps": qps, "speedup": qps / exact_qps}
                )
        nlist = getattr(faiss.extract_index_ivf(index), "nlist", None) if kind != "hnsw" else None
        result.note = f"nlist={nlist}" if nlist else f"M={args.hnsw_m}, efConstruction={args.ef_construction}"
        logger.info(
            "n=%d %s: build %.1fs, %.0f MiB, %s",
            n,
            kind,
            build_s,
            mem,
            ", ".join(f"{p['knob']} r={p['recall']:.3f} {p['qps']:.0f}q/s" for p in result.points),
        )
        results.append(result)
        del index
    return results


def pick_default(results: list[Result], target: float) -> dict[str, Any] | None:
    """The fastest (kind, knob) reaching `target` recall, from the largest size measured."""
    best = None
    for r in results:
        for p in r.points:
            if r.kind != "flat" and p["recall"] >= target and (best is None or p["qps"] > best["qps"]):
                best = {"kind": r.kind, "n": r.n, **p}
    return best


def markdown(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"dim {args.dim}, {args.queries} queries, recall@{args.k} vs exact, {faiss.omp_get_max_threads()} threads, "
        f"faiss {faiss.__version__}",
        "",
        "| n | kind | build s | memory MiB | knob | recall@10 | queries/s | × exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.points:
            lines.append(f"| {r.n:,} | {r.kind} | – | – | {r.note} | – | – | – |")
        for i, p in enumerate(r.points):
            head = f"| {r.n:,} | {r.kind} | {r.build_s:.1f} | {r.memory_mib:.0f} |" if i == 0 else "| | | | |"
            lines.append(f"{head} {p['knob']} | {p['recall']:.3f} | {p['qps']:.0f} | {p['speedup']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--dim", type=int, default=1536, help="vector width (AIM-600M: 1536)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--types", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=IndexConfig.ef_construction)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the service's ~4*sqrt(n))")
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="per size: skip kinds once this is spent")
    parser.add_argument("--target", type=float, default=0.95, help="recall needed for the recommended default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all figures here")
    args = parser.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results: list[Result] = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.extend(run_size(n, args))
    table = markdown(results, args)
    best = pick_default(results, args.target)
    verdict = (
        "none reaches the target"
        if best is None
        else (
            f"fastest at recall >= {args.target}: {best['kind']} {best['knob']} at n={best['n']:,}: recall "
            f"{best['recall']:.3f}, {best['qps']:.0f} q/s = {best['speedup']:.1f}x exact"
        )
    )
    sys.stdout.write(table + "\n\n" + verdict + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": [r.__dict__ for r in results], "recommended": best}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
