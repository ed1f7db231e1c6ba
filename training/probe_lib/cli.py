"""Command-line options shared by probe.py, baselines.py and evidence.py: data, probe budget, runtime."""

from __future__ import annotations

import argparse
import logging

import torch

from training.probe_lib.data import ProbeData, load_probe_data
from training.probe_lib.features import pick_device
from training.probe_lib.runner import RunOptions
from training.probe_lib.train import ProbeConfig

__all__ = ["add_data_args", "add_probe_args", "add_runtime_args", "data_from", "options_from", "probe_config_from"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="class-folder tree, split folder (train/ + val/) or list file")
    g.add_argument("--val-data", default=None, help="explicit held-out folder or list file")
    g.add_argument("--labels", default=None, help="label names: labels.json (index -> name) or one per line")
    g.add_argument("--val-fraction", type=float, default=0.2, help="held-out share when no split is given")
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--train-per-class", type=int, default=None, help="cap training images per class")
    g.add_argument("--val-per-class", type=int, default=None, help="cap held-out images per class")


def add_probe_args(p: argparse.ArgumentParser) -> None:
    d = ProbeConfig()
    g = p.add_argument_group("probe budget")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    g.add_argument("--linear-bias", action="store_true", help="give head.linear a bias (Jan-2024 ml-aim layout)")
    g.add_argument("--augment", action="store_true", help="random resized crop + flip (trunk runs every epoch)")
    g.add_argument("--no-cache", action="store_true", help="run the trunk every epoch even without augmentation")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--knn-k", type=int, default=d.knn_k)
    g.add_argument("--knn-temperature", type=float, default=d.knn_temperature)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--workers", type=int, default=0, help="image-decoding loader workers")
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--trunk-dtype", choices=sorted(_DTYPES), default="float32", help="autocast dtype of the trunk")
    g.add_argument("--cache-dtype", choices=sorted(_DTYPES), default="float32", help="dtype of cached features")
    g.add_argument("--no-knn", action="store_true", help="skip the k-NN metric (saves a trunk pass with --augment)")
    g.add_argument("--verify-images", type=int, default=64, help="held-out images for the load_model round trip")
    g.add_argument("-v", "--verbose", action="store_true")


def probe_config_from(args: argparse.Namespace) -> ProbeConfig:
    return ProbeConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup_fraction,
        linear_bias=args.linear_bias,
        augment=args.augment,
        cache=not args.no_cache,
        seed=args.seed,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
    )


def options_from(args: argparse.Namespace) -> RunOptions:
    """Also sets up logging and the CPU thread count (call once, at the entry point)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    return RunOptions(
        device=pick_device(args.device),
        workers=args.workers,
        eval_batch_size=args.eval_batch_size,
        trunk_dtype=_DTYPES[args.trunk_dtype],
        cache_dtype=_DTYPES[args.cache_dtype],
        verify_images=args.verify_images,
        knn=not args.no_knn,
    )


def data_from(args: argparse.Namespace) -> ProbeData:
    return load_probe_data(
        args.data,
        val_data=args.val_data,
        labels_file=args.labels,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
    )
