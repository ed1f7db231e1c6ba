"""Pre-training at scale (issue 14): data start-up and memory, checkpoint cost, loader throughput.

    python benchmarks/train_scale.py startup                   # 1 M vs 10 M samples, shard manifest vs sample list
    python benchmarks/train_scale.py checkpoint --ranks 2 4    # DCP async save vs full-state gather (gloo, CPU)
    python benchmarks/train_scale.py loader                    # decode + RandomResizedCrop images/s per worker

Each measurement runs in a fresh process (start-up time and peak RSS are per process). `checkpoint` launches
`torchrun --nproc_per_node R` on an aim-600M-shaped model (width 1536, 12 heads, head width 2048) with few
blocks, FSDP2 on gloo, one AdamW step so the optimizer state exists, then times one save of model + optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit(row: dict) -> None:
    sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.flush()


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
def _startup_child(kind: str, path: str) -> dict[str, float]:
    before = rss_mib()
    t0 = time.perf_counter()
    if kind == "manifest":
        from training.shards import ShardManifest, ShardOrder, ShardSource

        manifest = ShardManifest.load(path)
        order = ShardOrder(manifest, seed=0, shuffle_window=10_000)
        source = ShardSource(manifest)
        n = manifest.num_samples
        first = [source.locate(order.index(0, t)) for t in range(256)]  # the first micro-batch's samples
        assert first and order.index(0, n - 1) < n
    else:  # what training/sources.py held before: one Sample per image, sorted, plus an epoch permutation
        import numpy as np

        from training.sources import Sample

        n = int(path)
        samples = [Sample(key=f"shard-{i // 10_000:06d}.tar/{i:09d}", path=f"shard-{i // 10_000:06d}.tar")
                   for i in range(n)]  # fmt: skip
        perm = np.random.default_rng(0).permutation(n)
        assert len(samples) == len(perm)
    return {"seconds": time.perf_counter() - t0, "rss_delta_mib": rss_mib() - before, "samples": n}


def startup() -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        from training.shards import ShardManifest, write_manifest

        for shards, per in ((1_000, 1_000), (10_000, 1_000), (1_000, 10_000), (200_000, 5_000)):
            path = Path(tmp) / f"m{shards}x{per}.json"
            urls = [f"s3://bucket/train-{k:06d}.tar" for k in range(shards)]
            write_manifest(ShardManifest.from_counts(urls, [per] * shards), path)
            res = _child(["startup-child", "manifest", str(path)])
            out.append({"kind": "manifest", "shards": shards, **res})
        for n in (1_000_000, 10_000_000):
            out.append({"kind": "sample list", "shards": n // 10_000, **_child(["startup-child", "list", str(n)])})
    return out


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
def _checkpoint_rank(mode: str, out_dir: str, depth: int) -> None:
    """One rank under torchrun: build, one step, then one save in `mode` (dcp | full); prints a JSON line."""
    import torch
    import torch.distributed as dist

    from aimcore.config import get_flavor
    from training import distributed as D
    from training.checkpointing import CheckpointManager, full_model_state, full_optimizer_state
    from training.decoder import build_pretrain_model
    from training.optim import build_optimizer

    torch.set_num_threads(1)
    env = D.init_distributed("cpu", "fsdp", "gloo")
    cfg = get_flavor("aim-600M").replace(depth=depth, decoder_depth=depth, probe_layers=(0,), best_probe_layers=(0,),
                                         num_classes=0)  # fmt: skip
    model = build_pretrain_model(cfg, decoder_style="l3m", decoder_eps=1e-5, seed=0)
    wrapped = D.wrap_model(model, model.blocks(), env, ac=False, compile=False)
    opt = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, fused=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    params = sum(p.numel() for p in model.parameters())  # sharded parameters (DTensor numel is the global size)
    peak = {"rss": rss_mib()}
    stop = threading.Event()

    def sample() -> None:  # peak RSS during the save only (ru_maxrss would include start-up)
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss_mib())
            time.sleep(0.005)

    base = rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    dist.barrier()
    t0 = time.perf_counter()
    if mode == "full":  # the format before issue 14: gather everything on rank 0, one torch.save
        state = {"model": full_model_state(wrapped), "optimizer": full_optimizer_state(wrapped, opt)}
        if env.is_main:
            torch.save(state, Path(out_dir) / "state.pt")
        del state
        dist.barrier()
        blocked = total = time.perf_counter() - t0
    else:
        ckpt = CheckpointManager(out_dir, keep_last=1, keep_best=False, is_main=env.is_main)
        ckpt.save_async(wrapped, opt, {"world_size": env.world_size}, 1, val_loss=None)
        blocked = time.perf_counter() - t0
        ckpt.wait()
        dist.barrier()
        total = time.perf_counter() - t0
    stop.set()
    sampler.join()
    emit({"mode": mode, "rank": env.rank, "ranks": env.world_size, "params": params, "blocked_s": blocked,
          "total_s": total, "rss_before_mib": base, "peak_rss_during_save_mib": peak["rss"],
          "save_delta_mib": peak["rss"] - base})  # fmt: skip
    D.shutdown()


def checkpoint(ranks: list[int], depth: int) -> list[dict]:
    rows = []
    for world in ranks:
        for mode in ("full", "dcp"):  # interleaved: the machine is shared
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       __file__, "checkpoint-rank", mode, tmp, str(depth)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
                rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows


# ----------------------------------------------------------------------------------------------------------------
def loader(seconds: float) -> dict:
    """One loader worker's work (decode with libjpeg draft + RandomResizedCrop 224 + flip + jitter + normalise),
    single thread, on the repository's real photos as they are (up to 640x427) and re-encoded at web sizes (long
    side 1024 and 1600, JPEG quality 90, as img2dataset keeps originals)."""
    import torch
    from PIL import Image

    from aimcore.config import get_flavor
    from aimcore.flops import count_flops
    from training.augment import AugmentConfig
    from training.data import StreamPosition, TrainBatches
    from training.sources import Sample, list_samples

    torch.set_num_threads(1)
    originals = [s for s in list_samples(str(ROOT / "tests" / "assets" / "images")) if s.path.endswith(".jpg")]
    flops = count_flops(get_flavor("aim-600M")).pretrain_step
    need = 0.45 * 989e12 / flops  # images/s of one H100 SXM (dense bf16 data-sheet peak) at 45 % MFU
    result: dict = {"aim600m_flops_per_image": flops, "h100_images_per_s_at_45pct_mfu": need}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"assets (<= 640 px)": originals}
        for side in (1024, 1600):
            made = []
            for s in originals:
                with Image.open(s.path) as im:
                    im = im.convert("RGB")
                    scale = side / max(im.size)
                    big = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
                path = Path(tmp) / f"{side}_{Path(s.path).name}"
                big.save(path, quality=90)
                made.append(Sample(key=path.name, path=str(path)))
            sets[f"long side {side} px"] = made
        for name, samples in sets.items():
            ds = TrainBatches(samples, augment_config=AugmentConfig(img_size=224), seed=0, num_tokens=196,
                              position=StreamPosition(0, 1, 0, 1), max_retries=2, max_pixels=10**8,
                              jpeg_draft=True)  # fmt: skip
            for i in range(4):
                ds.load(i)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                ds.load(n)
                n += 1
            rate = n / (time.perf_counter() - t0)
            result[name] = {"images_per_s_per_worker": rate, "workers_per_h100": need / rate}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("startup")
    c = sub.add_parser("checkpoint")
    c.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    c.add_argument("--depth", type=int, default=2, help="trunk and head blocks of the aim-600M-shaped model")
    lo = sub.add_parser("loader")
    lo.add_argument("--seconds", type=float, default=10.0)
    sc = sub.add_parser("startup-child")
    sc.add_argument("kind")
    sc.add_argument("path")
    cr = sub.add_parser("checkpoint-rank")
    cr.add_argument("mode")
    cr.add_argument("out")
    cr.add_argument("depth", type=int)
    args = parser.parse_args()
    if args.cmd == "startup-child":
        emit(_startup_child(args.kind, args.path))
    elif args.cmd == "checkpoint-rank":
        _checkpoint_rank(args.mode, args.out, args.depth)
    elif args.cmd == "startup":
        for row in startup():
            emit(row)
    elif args.cmd == "checkpoint":
        for row in checkpoint(args.ranks, args.depth):
            emit(row)
    else:
        emit(loader(args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
