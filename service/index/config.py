"""IndexConfig: which FAISS structure, its build and search parameters, and the durability policy.

Kinds (all on L2-normalised vectors with inner product, i.e. cosine similarity):
- "flat":  exact search, no training; the reference for recall. Fine up to ~50k vectors (126 queries/s at 100k x
  1536 on 2 cores).
- "hnsw":  graph index (IndexHNSWFlat); no training, incremental adds, search knob `ef_search`. The default: the
  best recall per query/s measured, at the cost of the slowest build (172 s for 100k x 1536 on 2 cores).
- "ivf":   inverted lists (IndexIVFFlat); needs training (k-means on the first vectors), knob `nprobe`.
- "ivfpq": IVF with product-quantised codes and an exact re-rank of the top `refine_factor * k` (IndexRefineFlat).
  The re-rank keeps the raw vectors, so this kind saves no memory; on CPU at 100k it measured below "hnsw" at
  equal recall (docs/BENCHMARKS.md) and is offered for very large collections and GPU search.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["INDEX_KINDS", "IndexConfig"]

INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "hnsw"
    # HNSW: graph degree, build-time and default search-time beam widths. On 100k x 1536 clustered vectors
    # ef_search 64 measured recall@10 0.995 at 9.5-30x exact queries/s (machine load), 32 gave 0.977 at 15-36x
    # (docs/BENCHMARKS.md, "FAISS index"); exact search slows 10x per 10x items, HNSW far less.
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 64
    # IVF: nlist None picks ~4*sqrt(n) (at most 1024) at training time; nprobe is the search-time number of lists:
    # 16 measured recall@10 0.96-0.97 at 10-18x exact queries/s at 100k and 1M (docs/BENCHMARKS.md).
    nlist: int | None = None
    nprobe: int = 16
    # Training starts automatically once this many vectors are in (before that an IVF index searches exactly).
    train_min: int = 10_000
    # IVF-PQ: sub-quantisers (must divide the dimension; None picks dim/16 rounded to a divisor), bits per code,
    # and how many candidates per wanted result the exact re-rank looks at.
    pq_m: int | None = None
    pq_nbits: int = 8
    refine_factor: int = 16  # 4 capped recall@10 at 0.81 on 1536-d (96 x 8-bit codes); 16 reaches 0.95
    # Deletes and upserts leave tombstones; a snapshot rebuilds the index without them above this fraction.
    compact_ratio: float = 0.25
    # Automatic snapshot (folding the WAL) after this many logged operations or WAL bytes; 0 turns it off.
    snapshot_every_ops: int = 100_000
    snapshot_every_bytes: int = 512 << 20
    # Verify snapshot checksums on open (reads every byte once more; cheap next to loading).
    verify_checksums: bool = True
    # Search through a GPU copy of flat/IVF indexes when faiss has GPUs (ignored on faiss-cpu).
    use_gpu: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in INDEX_KINDS:
            problems.append(f"kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "train_min", "pq_nbits", "refine_factor"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            problems.append(f"nlist must be >= 1 or None, got {self.nlist}")
        if self.pq_nbits > 16:
            problems.append(f"pq_nbits must be <= 16, got {self.pq_nbits}")
        if not 0.0 < self.compact_ratio <= 1.0:
            problems.append(f"compact_ratio must be in (0, 1], got {self.compact_ratio}")
        if problems:
            raise ValueError("invalid IndexConfig: " + "; ".join(problems))

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf", "ivfpq")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def replace(self, **changes: Any) -> IndexConfig:
        return replace(self, **changes)
