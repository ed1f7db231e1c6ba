"""Child process for the kill -9 test: a burst of adds and deletes, each acknowledged on stdout only after the call
returned (so "ack" means durable by contract). Run: python -m tests.index.crash_writer DIR START."""

from __future__ import annotations

import sys

import numpy as np

from service.index import EmbeddingRecipe, IndexConfig, VectorIndex

DIM = 32
BATCH = 8
RECIPE = EmbeddingRecipe(model_sha256="ee" * 32, pooling="mean", dim=DIM)
# Frequent snapshots and compactions, IVF training mid-burst: the kill lands in every phase sooner or later.
CONFIG = IndexConfig(kind="ivf", train_min=120, nprobe=16, snapshot_every_ops=5, compact_ratio=0.05)


def main(directory: str, start: int) -> None:
    index = VectorIndex.open_or_create(directory, RECIPE, CONFIG)
    rng = np.random.default_rng(start)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    batch = start
    while True:
        ids = [f"b{batch}-{j}" for j in range(BATCH)]
        index.upsert(
            ids, rng.standard_normal((BATCH, DIM)).astype(np.float32), [{"batch": batch}] * BATCH, recipe=RECIPE
        )
        out.write("add " + " ".join(ids) + "\n")
        out.flush()
        if batch % 3 == 0:
            victim = f"b{batch}-0"
            index.delete([victim])
            out.write(f"del {victim}\n")
            out.flush()
        batch += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
