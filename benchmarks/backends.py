"""Inference backends side by side on one model, in one run: images/s as ratios to PyTorch eager fp32.

    python benchmarks/backends.py --flavor aim-debug aim-demo [--batches 1 8 32] [--write docs/BENCHMARKS.md]
    python benchmarks/backends.py --flavor aim-600M:2 --batches 1 8 --rounds 1   # first 2 blocks of aim-600M

Variants (all compute the export contract: embedding + pooled + logits, full trunk):
  torch-fp32        PyTorch eager, float32
  torch-bf16        PyTorch eager under CPU autocast to bfloat16
  compiled-fp32     torch.compile (inductor), float32
  compiled-bf16     torch.compile under bfloat16 autocast
  ort-fp32          ONNX Runtime CPU provider, the exported fp32 graph
  ort-int8          ONNX Runtime CPU provider, the dynamically quantised int8 graph
Each variant's embedding cosine similarity to torch-fp32 is measured on the repository's real test images. Achieved
FLOP/s (analytic forward FLOPs x images/s) is compared with a measured fp32 and bf16 matmul peak, and ONNX
Runtime's graph optimisation levels are timed at one batch size. The machine is shared and noisy, so every figure is
the best of several interleaved rounds, and only ratios within one run mean much. One thread by default: on 2 cores
shared with other jobs, a 2-thread OpenMP barrier waits for whichever thread the scheduler parked, and throughput
collapses 10-30x at random. Random weights: trained weights change accuracy figures (int8 most), not speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from aimcore import AimConfig, AimModel, build_model, count_flops, get_flavor  # noqa: E402
from export.graph import ContractGraph, resolve_outputs  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from export.parity import default_image_paths, load_images  # noqa: E402
from export.provenance import model_preprocess  # noqa: E402
from export.runtime import available_cpus, create_session  # noqa: E402

logger = logging.getLogger("benchmarks.backends")

Runner = Callable[[np.ndarray], np.ndarray]  # pixels (B, 3, S, S) -> embedding (B, D)
COSINE_FLOOR = 0.999  # the service's bar for a CPU default


@dataclass
class Variant:
    name: str
    run: Runner
    bf16: bool = False
    setup_s: float = 0.0
    throughput: dict[int, float] = field(default_factory=dict)  # batch -> best images/s
    cosine: float = float("nan")


def ort_levels(workdir: Path, threads: int, batch: int, pixels: np.ndarray, min_seconds: float) -> dict:
    """images/s of the fp32 and int8 graphs at each graph optimisation level (best of 2)."""
    table: dict[str, dict[str, float]] = {}
    for precision in ("fp32", "int8"):
        for level in ("disable", "basic", "extended", "all"):
            session = create_session(
                workdir / precision / "model.onnx",
                providers=["CPUExecutionProvider"],
                intra_op_threads=threads,
                graph_optimization=level,
            )

            def run(x: np.ndarray, session=session) -> np.ndarray:
                return session.run(["embedding"], {"pixels": x})[0]

            best = max(images_per_second(run, pixels[:batch], min_seconds) for _ in range(2))
            table.setdefault(precision, {})[level] = best
    return table


def torch_runner(model: AimModel, *, bf16: bool, compiled: bool) -> Runner:
    graph = ContractGraph(model, resolve_outputs(model.config, None)).eval()
    fn = torch.compile(graph, dynamic=False) if compiled else graph

    def run(pixels: np.ndarray) -> np.ndarray:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return fn(torch.from_numpy(pixels))[0].float().numpy()

    return run


def ort_runner(path: Path, threads: int) -> Runner:
    session = create_session(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)

    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run(["embedding"], {"pixels": pixels})[0]

    return run


def images_per_second(run: Runner, pixels: np.ndarray, min_seconds: float) -> float:
    run(pixels)  # warm-up (and, for compiled variants, the compile for this shape)
    count, start = 0, time.perf_counter()
    while True:
        run(pixels)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and count >= 3:
            return count * len(pixels) / elapsed


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 20) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on the current torch threads (best of many: on a shared machine
    the best run is the one least disturbed)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def ort_matmul_peak(threads: int, n: int = 2048, repeats: int = 20) -> float:
    """Best FLOP/s of an n x n float32 MatMul in ONNX Runtime (MLAS). On AMD CPUs torch's MKL sgemm can run well
    below the hardware, so the fp32 peak is the better of the two libraries."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["a", "w"], ["y"])],
        "matmul",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [n, n])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [n, n])],
        [weight],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((n, n), dtype=np.float32)
    session.run(None, {"a": a})
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"a": a})
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def measure_peaks(threads: int) -> dict[str, float]:
    return {
        "fp32-torch": matmul_peak(torch.float32),
        "fp32-ort": ort_matmul_peak(threads),
        "bf16": matmul_peak(torch.bfloat16),
    }


def cosine_to(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = reference.astype(np.float64), other.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def build_variants(model: AimModel, workdir: Path, threads: int) -> list[Variant]:
    variants = []
    for name, kwargs in (
        ("torch-fp32", {"bf16": False, "compiled": False}),
        ("torch-bf16", {"bf16": True, "compiled": False}),
        ("compiled-fp32", {"bf16": False, "compiled": True}),
        ("compiled-bf16", {"bf16": True, "compiled": True}),
    ):
        variants.append(Variant(name, torch_runner(model, **kwargs), bf16=kwargs["bf16"]))
    for precision in ("fp32", "int8"):
        start = time.perf_counter()
        # Parity is the exporter's job and its tests'; here it would only slow the benchmark down.
        export_onnx(model, workdir / precision, precision=precision, check_parity=False, max_batch=8)
        variants.append(Variant(f"ort-{precision}", ort_runner(workdir / precision / "model.onnx", threads)))
        variants[-1].setup_s = time.perf_counter() - start
    return variants


def flavor_config(spec: str) -> AimConfig:
    """A flavor name, or NAME:K for its first K blocks (a cheap proxy of a large model's per-block speed)."""
    name, _, blocks = spec.partition(":")
    cfg = get_flavor(name)
    if not blocks:
        return cfg
    k = int(blocks)
    layers = tuple(range(max(0, k - 2), k))
    return cfg.replace(name=spec, depth=k, probe_layers=layers, best_probe_layers=layers)


def bench_flavor(flavor: str, batches: list[int], rounds: int, min_seconds: float, threads: int) -> dict:
    torch.manual_seed(0)
    model = build_model(flavor_config(flavor)).eval()
    cfg = model.config
    real = load_images(default_image_paths(), model_preprocess(model))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(model, Path(tmp), threads)
        reference = variants[0].run(real)
        for v in variants:
            start = time.perf_counter()
            v.cosine = cosine_to(reference, v.run(real))  # compiled variants compile here
            v.setup_s += time.perf_counter() - start if v.name.startswith("compiled") else 0.0
        for batch in batches:
            pixels = rng.standard_normal((batch, cfg.num_channels, cfg.img_size, cfg.img_size), dtype=np.float32)
            for _ in range(rounds):  # interleaved rounds: background load hits every variant alike
                for v in variants:
                    ips = images_per_second(v.run, pixels, min_seconds)
                    v.throughput[batch] = max(v.throughput.get(batch, 0.0), ips)
            logger.info("%s batch %d: %s", flavor, batch, {v.name: round(v.throughput[batch], 1) for v in variants})
        level_batch = 8
        pixels = rng.standard_normal((level_batch, cfg.num_channels, cfg.img_size, cfg.img_size), dtype=np.float32)
        levels = ort_levels(Path(tmp), threads, level_batch, pixels, min_seconds)
    flops = count_flops(cfg).forward
    return {"flavor": flavor, "config": cfg, "flops": flops, "variants": variants, "levels": levels}


def fastest_within(result: dict, batch: int) -> Variant:
    ok = [v for v in result["variants"] if v.cosine >= COSINE_FLOOR]
    return max(ok, key=lambda v: v.throughput[batch])


def render(results: list[dict], batches: list[int], peaks: dict[str, float], threads: int, command: str) -> str:
    lines = [
        f"## Inference backends on CPU (`benchmarks/backends.py`, {dt.date.today().isoformat()})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {available_cpus()} CPUs shared with other jobs, {threads} thread(s) "
        f"(torch intra-op = ORT intra-op), torch {torch.__version__}, onnxruntime {ort.__version__}. "
        "Measured matmul peak (2048², best of 20, before and after the run): "
        f"fp32 {peaks['fp32-torch'] / 1e9:.0f} GFLOP/s in torch (MKL), {peaks['fp32-ort'] / 1e9:.0f} in ONNX Runtime "
        f"(MLAS), bf16 {peaks['bf16'] / 1e9:.0f} in torch (oneDNN); `% peak` uses the better fp32 figure. "
        "Random weights; "
        "throughput is the best of interleaved rounds on a shared machine: read the ratios, not the absolutes.",
        "",
    ]
    for result in results:
        cfg, variants = result["config"], result["variants"]
        base = variants[0]
        lines += [
            f"### {result['flavor']} (D {cfg.embed_dim}, {cfg.depth} blocks, {cfg.img_size} px, "
            f"{result['flops'] / 1e9:.3f} GFLOP/image)",
            "",
            "| variant | "
            + " | ".join(f"b{b} img/s (× fp32)" for b in batches)
            + " | emb. cosine vs fp32 (min) | GFLOP/s at b"
            + str(batches[-1])
            + " (% peak) | setup s |",
            "|---|" + "---|" * len(batches) + "---|---|---|",
        ]
        for v in variants:
            cells = [f"{v.throughput[b]:.1f} ({v.throughput[b] / base.throughput[b]:.2f})" for b in batches]
            achieved = result["flops"] * v.throughput[batches[-1]]
            peak = peaks["bf16" if v.bf16 else "fp32"]
            lines.append(
                f"| {v.name} | "
                + " | ".join(cells)
                + f" | {v.cosine:.6f} | {achieved / 1e9:.1f} ({100 * achieved / peak:.0f}% of "
                + ("bf16" if v.bf16 else "fp32")
                + f") | {v.setup_s:.1f} |"
            )
        picks = {b: fastest_within(result, b).name for b in batches}
        lines += [
            "",
            f"Fastest within cosine {COSINE_FLOOR} of fp32: " + ", ".join(f"b{b} {n}" for b, n in picks.items()),
        ]
        levels = result["levels"]
        lines += [
            "",
            "ONNX Runtime graph optimisation level, images/s at batch 8 (× `all`):",
            "",
            "| graph | disable | basic | extended | all |",
            "|---|---|---|---|---|",
        ]
        for precision, row in levels.items():
            cells = " | ".join(
                f"{row[k]:.1f} ({row[k] / row['all']:.2f})" for k in ("disable", "basic", "extended", "all")
            )
            lines.append(f"| {precision} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", nargs="+", default=["aim-debug", "aim-demo"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (see above)")
    parser.add_argument("--write", default=None, help="append the Markdown section to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads
    torch.set_num_threads(threads)
    # Two compiled variants x (real-image batch + each benchmark batch) shapes: more than dynamo's default limit.
    torch._dynamo.config.recompile_limit = 64
    before = measure_peaks(threads)
    results = [bench_flavor(f, args.batches, args.rounds, args.min_seconds, threads) for f in args.flavor]
    peaks = {k: max(v, before[k]) for k, v in measure_peaks(threads).items()}
    peaks["fp32"] = max(peaks["fp32-torch"], peaks["fp32-ort"])
    command = "python benchmarks/backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(results, args.batches, peaks, threads, command)
    sys.stdout.write(text + "\n")
    if args.write:
        target = Path(args.write)
        if not target.exists():
            target.write_text("# Benchmarks\n\nMeasured figures with the command and machine that produced them.\n")
        with target.open("a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
