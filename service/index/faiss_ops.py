"""Everything that knows FAISS class names: building each kind, training, per-search parameters, GPU copies.

Row r of a FAISS index here is always the r-th vector ever added since the last rebuild (FAISS's sequential ids):
we never call remove_ids, so rows stay stable and the id tables in `store.py` index by row.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

from service.index.config import IndexConfig

__all__ = [
    "auto_nlist",
    "gpu_available",
    "new_untrained",
    "pick_pq_m",
    "reconstruct_rows",
    "search_params",
    "to_gpu",
    "train_index",
    "training_sample_size",
]

logger = logging.getLogger(__name__)

# k-means wants ~39 points per centroid (FAISS warns below that); fewer makes empty or noisy lists.
POINTS_PER_CENTROID = 39
# Training cost is sample x nlist x d x iterations: 32 points per list and 10 iterations train 1M x 1536 (nlist
# 4000) in minutes on a few cores instead of an hour, for centroids that are as good for routing queries.
TRAIN_POINTS_PER_LIST = 32
# Measured at 1M x 1536 on 2 cores: 1000 lists reach recall@10 0.967 at 10.6x exact (nprobe 16), built in 137 s;
# 4*sqrt(1M) = 4000 lists would cost ~4x that in k-means and assignment. Set nlist explicitly beyond ~10M.
AUTO_NLIST_MAX = 1024
KMEANS_ITERATIONS = 10


def new_untrained(config: IndexConfig, dim: int) -> faiss.Index:
    """The index a new collection starts with. IVF kinds start as an exact flat index ("staging") until enough
    vectors exist to train their coarse quantiser; see train_index."""
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
        return index
    return faiss.IndexFlatIP(dim)


def auto_nlist(n: int, wanted: int | None) -> int:
    """~4*sqrt(n) lists by default, at most AUTO_NLIST_MAX, never more than the training set can populate."""
    nlist = wanted if wanted is not None else min(AUTO_NLIST_MAX, int(4 * math.sqrt(max(n, 1))))
    return max(1, min(nlist, n // POINTS_PER_CENTROID or 1))


def pick_pq_m(dim: int, wanted: int | None) -> int:
    """Sub-quantisers for IVF-PQ: `wanted`, or about one per 16 dimensions, always a divisor of dim."""
    target = wanted if wanted is not None else max(1, dim // 16)
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    best = min(divisors, key=lambda m: (abs(m - target), m))
    if wanted is not None and best != wanted:
        raise ValueError(f"pq_m={wanted} must divide the dimension {dim}; nearest divisor is {best}")
    return best


def training_sample_size(n: int, config: IndexConfig) -> int:
    """How many vectors k-means sees: TRAIN_POINTS_PER_LIST per list, so training cost stays bounded at 1M."""
    return min(n, TRAIN_POINTS_PER_LIST * auto_nlist(n, config.nlist))


def train_index(config: IndexConfig, sample: np.ndarray, n_total: int | None = None) -> faiss.Index:
    """A trained, empty IVF / IVF-PQ index sized for `n_total` vectors (default: the sample's size), trained on
    `sample` (m, d) float32 unit rows (see training_sample_size)."""
    n, dim = sample.shape
    nlist = max(1, min(auto_nlist(n_total or n, config.nlist), n))
    if config.nlist is not None and nlist < config.nlist:
        logger.warning("training IVF on %d vectors: nlist lowered from %d to %d", n, config.nlist, nlist)
    quantizer = faiss.IndexFlatIP(dim)
    if config.kind == "ivf":
        index: Any = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif config.kind == "ivfpq":
        m = pick_pq_m(dim, config.pq_m)
        # Each sub-quantiser clusters n points into 2**nbits codes: small sets get fewer bits. Codebooks in a
        # 1/m-th of the space tolerate fewer points per centroid than the coarse quantiser (8, not 39).
        nbits = max(1, min(config.pq_nbits, int(math.log2(max(n // 8, 2)))))
        if nbits < config.pq_nbits:
            logger.warning("training IVF-PQ on %d vectors: pq_nbits lowered from %d to %d", n, config.pq_nbits, nbits)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"kind {config.kind!r} needs no training")
    # Unit vectors: spherical k-means keeps centroids on the sphere, which suits inner-product assignment.
    index.cp.spherical = True
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.min_points_per_centroid = 1  # nlist is already capped: no FAISS warning spam
    index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(config.nprobe, nlist)
    if config.kind == "ivf":
        # Row -> list position map, so stored vectors can be read back (search by id, compaction).
        index.make_direct_map()
        return index
    refined = faiss.IndexRefineFlat(index)
    refined.k_factor = float(config.refine_factor)
    return refined


def search_params(
    index: faiss.Index,
    config: IndexConfig,
    selector: faiss.IDSelector | None,
    *,
    ef_search: int | None = None,
    nprobe: int | None = None,
) -> faiss.SearchParameters | None:
    """Per-call parameters: the selector (live rows that pass the filter) and the speed/recall knob.

    The caller must keep `selector` alive until the search returns (SWIG holds a raw pointer)."""
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search or config.ef_search)
    if isinstance(index, faiss.IndexRefine):
        base = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe or config.nprobe)
        params = faiss.IndexRefineSearchParameters(k_factor=float(config.refine_factor), base_index_params=base)
        params._base = base  # keep the nested object alive as long as params
        return params
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe or config.nprobe)
    if selector is None:
        return None
    return faiss.SearchParameters(sel=selector)


def reconstruct_rows(index: faiss.Index, rows: np.ndarray) -> np.ndarray:
    """Stored vectors (len(rows), d) float32. Exact for every kind we build (IVF-PQ reads its re-rank store)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return index.reconstruct_batch(rows)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources: Any = None


def to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A GPU copy for flat and IVF indexes, or None where faiss has no GPU or the kind has no GPU version (HNSW)."""
    global _gpu_resources
    if not gpu_available() or isinstance(index, faiss.IndexHNSW | faiss.IndexRefine):
        return None
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
    except RuntimeError as exc:  # e.g. out of GPU memory: searching on the CPU is still correct
        logger.warning("could not copy the index to the GPU (%s); searching on the CPU", exc)
        return None
