"""Pre-training throughput: images/s, tokens/s and MFU of the real training step (training/ code path).

    python benchmarks/train_throughput.py                        # aim-debug and aim-demo on the CPU
    python benchmarks/train_throughput.py --flavors aim-600M     # on a GPU: FlexAttention, bf16, compile
    python benchmarks/train_throughput.py --append docs/BENCHMARKS.md

The step is the one `training/pretrain.py` runs: prefix mask, trunk + pixel head under autocast, the AIM loss,
backward, clip, AdamW. Inputs are random tensors (the data pipeline is timed separately, per process, on real
images). MFU = (FLOPs per image from aimcore x images/s) / peak, where the peak is a square matmul measured on this
machine in bf16 and in fp32 (and, on a known GPU, the data-sheet bf16 figure too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aimcore import count_flops, get_flavor  # noqa: E402
from training.augment import AugmentConfig  # noqa: E402
from training.data import StreamPosition, TrainBatches  # noqa: E402
from training.decoder import build_pretrain_model  # noqa: E402
from training.distributed import DistEnv, wrap_model  # noqa: E402
from training.logging_utils import GPU_PEAK_BF16, measure_matmul_peak  # noqa: E402
from training.loss import pixel_loss  # noqa: E402
from training.masking import build_attention_mask  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.sources import list_samples  # noqa: E402

logger = logging.getLogger("benchmarks.train_throughput")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_train_step(
    flavor: str, *, batch: int, precision: str, device: torch.device, steps: int, warmup: int, kernel: str,
    compile: bool, ac: bool,
) -> dict:  # fmt: skip
    cfg = get_flavor(flavor).replace(num_classes=0)
    model = build_pretrain_model(cfg, decoder_style="l3m", decoder_eps=1e-5, seed=0)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, strategy="none")
    wrapped = wrap_model(model, model.blocks(), env, ac=ac, compile=compile)
    opt = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    prefix = torch.randint(1, cfg.num_patches, (batch,), generator=gen).to(device)
    dtype = DTYPES[precision]

    def step() -> None:
        mask, attn = build_attention_mask(prefix, cfg.num_patches, kernel)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = wrapped(images, attn)
        pixel_loss(pred, images, mask, cfg.patch_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    per_step = float(np.median(wall))
    images_per_s = batch / per_step
    flops = count_flops(cfg).pretrain_step
    # On the CPU, CPU-seconds are the fair clock on a shared machine: other processes do not inflate them.
    per_step_cpu = float(np.median(cpu)) if device.type == "cpu" else per_step
    return {
        "flavor": flavor,
        "device": device.type,
        "precision": precision,
        "attention": kernel,
        "compile": compile,
        "ac": ac,
        "batch": batch,
        "ms_per_step": per_step * 1e3,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * cfg.num_patches,
        "tflops": flops * images_per_s / 1e12,
        "images_per_cpu_s": batch / per_step_cpu,
        "tflops_per_cpu_s": flops * batch / per_step_cpu / 1e12,
        "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def time_data_pipeline(img_size: int, seconds: float = 3.0) -> float:
    """Augmented images per second in one process on the repository's real test images (decode + augment)."""
    samples = list_samples(str(ROOT / "tests" / "assets" / "images"))
    ds = TrainBatches(
        samples, augment_config=AugmentConfig(img_size=img_size), position=StreamPosition(0, 1, 0, 8), seed=0,
        num_tokens=(img_size // 14) ** 2, max_retries=4, max_pixels=10**8, jpeg_draft=True,
    )  # fmt: skip
    count, j, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(ds[j]["prefix_lens"])
        j += 1
    return count / (time.perf_counter() - start)


def markdown(results: list[dict], peaks: dict[str, float], data_rates: dict[int, float], note: str) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## Pre-training throughput (`benchmarks/train_throughput.py`, {when})",
        "",
        note,
        "",
        "Measured matmul peaks: " + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peaks.items()) + ".",
        "MFU = FLOPs per image (`aimcore.count_flops(cfg).pretrain_step`: trunk + pixel head, forward + backward) x "
        "images/s / the measured matmul peak of the step's own precision (bf16 autocast vs the bf16 matmul, fp32 vs "
        "fp32). On the CPU, `per CPU-s` columns divide by CPU time instead of wall time (step and peak alike), which "
        "other processes on a shared machine do not dilute; wall-clock columns are lower bounds there.",
        "",
        "| flavor | device | precision | attention | compile/AC | batch | ms/step (wall) | images/s (wall) "
        "| tokens/s (wall) | MFU (wall) | images per CPU-s | MFU (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        key = f"{r['device']} {r['precision']}"
        peak = peaks.get(f"{key} (data sheet)") or peaks[key]
        cpu_peak = peaks.get(f"{key} per CPU-s")
        cpu_cols = (
            f"{r['images_per_cpu_s']:.1f} | {100 * r['tflops_per_cpu_s'] * 1e12 / cpu_peak:.1f} %"
            if cpu_peak
            else "– | –"
        )
        lines.append(
            f"| {r['flavor']} | {r['device']} | {r['precision']} | {r['attention']} | "
            f"{'yes' if r['compile'] else 'no'}/{'yes' if r['ac'] else 'no'} | {r['batch']} | {r['ms_per_step']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['tokens_per_s']:.0f} | {100 * r['tflops'] * 1e12 / peak:.1f} % | "
            f"{cpu_cols} |"
        )
    if data_rates:
        lines += [
            "",
            "Data pipeline, one process (decode + RandomResizedCrop + flip + ColorJitter + normalise, the 12 test "
            "images of 80x100 to 640x427 px): "
            + ", ".join(f"{v:.0f} images/s at {k} px" for k, v in data_rates.items())
            + ". Multiply by `data.num_workers`.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--flavors", nargs="+", default=["aim-600M"] if cuda else ["aim-debug", "aim-demo"])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="per flavor (default: 64/32 CPU, 64 GPU)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = 1 on the CPU: per-core figures)")
    parser.add_argument("--no-compile", action="store_true", help="GPU: skip torch.compile")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--append", default="", help="append a Markdown section to this file")
    parser.add_argument("--json", default="", help="write the raw results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    device = torch.device("cuda" if cuda else "cpu")
    kernel = "flex" if cuda else "sdpa"
    compile_ = cuda and not args.no_compile

    peaks: dict[str, float] = {}
    for name in args.precisions:
        key = f"{device.type} {name}"
        peaks[key] = measure_matmul_peak(device, DTYPES[name], seconds=1.0)
        if not cuda:
            peaks[f"{key} per CPU-s"] = measure_matmul_peak(device, DTYPES[name], seconds=1.0, clock=time.process_time)
        logger.info("measured %s matmul peak: %.3g TFLOP/s", key, peaks[key] / 1e12)
    if cuda:
        gpu = torch.cuda.get_device_name(device)
        sheet = next((v for k, v in GPU_PEAK_BF16.items() if k in gpu), None)
        if sheet and "bf16" in args.precisions:
            peaks["cuda bf16 (data sheet)"] = sheet

    results = []
    defaults = {"aim-debug": 64, "aim-demo": 32}
    for i, flavor in enumerate(args.flavors):
        batch = args.batch[min(i, len(args.batch) - 1)] if args.batch else (64 if cuda else defaults.get(flavor, 8))
        for precision in args.precisions:
            r = time_train_step(flavor, batch=batch, precision=precision, device=device, steps=args.steps,
                                warmup=args.warmup, kernel=kernel, compile=compile_, ac=args.ac)  # fmt: skip
            results.append(r)
            logger.info("%s", json.dumps(r))
    data_rates = (
        {} if cuda else {s: time_data_pipeline(s) for s in sorted({get_flavor(f).img_size for f in args.flavors})}
    )
    cpu = platform.processor() or platform.machine()
    note = (
        f"Machine: {torch.cuda.get_device_name(device) if cuda else cpu}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the start (the CPU is shared, so CPU figures are lower bounds)."
    )
    text = markdown(results, peaks, data_rates, note)
    logger.info("\n%s", text)
    if args.append:
        path = Path(args.append)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:  # append only: other scripts add their own sections
            if fh.tell() == 0:
                fh.write("# Benchmarks\n\nMeasured figures appended by the scripts in `benchmarks/`, newest last.\n")
            fh.write("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "results": results, "data": data_rates}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
