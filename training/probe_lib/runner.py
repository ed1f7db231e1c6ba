"""run_probe(): the whole protocol for one frozen trunk, shared by probe.py, baselines.py and evidence.py."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimcore import AimModel, PreprocessConfig
from training.probe_lib.data import ImageDataset, LabelledSet, ProbeData, write_label_file
from training.probe_lib.export import HEAD_FILE, save_head, verify_head_file
from training.probe_lib.features import FeatureSet, extract_features, freeze
from training.probe_lib.metrics import confusion_matrix, confusion_summary, knn_scores, topk_accuracy
from training.probe_lib.train import ProbeConfig, build_head, epoch_order, predict, train_head, trunk_batches

__all__ = ["RunOptions", "run_probe"]

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How (not what) to run: device, loader workers, dtypes, and what to write."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 0
    eval_batch_size: int = 128
    trunk_dtype: torch.dtype = torch.float32  # bfloat16 autocast for big released trunks on a GPU
    cache_dtype: torch.dtype = torch.float32  # float16 halves the cache for big trunks
    verify_images: int = 64  # held-out images re-classified through aimcore.load_model(trunk, head=...)
    knn: bool = True


def _loader(data: LabelledSet, prep: PreprocessConfig, opts: RunOptions) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageDataset(data, prep), batch_size=opts.eval_batch_size, shuffle=False, num_workers=opts.workers
    )


def _knn(train: FeatureSet, val: FeatureSet, num_classes: int, cfg: ProbeConfig) -> dict[str, float]:
    scores = knn_scores(train.means, train.labels, val.means, num_classes, cfg.knn_k, cfg.knn_temperature)
    return {f"knn_{k}": v for k, v in topk_accuracy(scores, val.labels).items()}


def run_probe(
    trunk: AimModel,
    data: ProbeData,
    cfg: ProbeConfig,
    opts: RunOptions | None = None,
    *,
    out_dir: Path | None = None,
    trunk_source: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate an attentive probe on a frozen trunk; returns the metrics dict (also metrics.json).

    With `out_dir`: writes head.safetensors (released head.* layout), labels.json (index -> name) and metrics.json;
    with `trunk_source` too, reloads trunk + head through aimcore.load_model and checks the logits agree.
    """
    opts = opts or RunOptions()
    freeze(trunk)
    prep = getattr(trunk, "preprocess_config", None) or PreprocessConfig.for_size(trunk.config.img_size)
    started = time.perf_counter()
    logger.info(
        "probe on %s: %d train / %d held-out images, %d classes (%s); probe layers %s; %s",
        trunk.config.name,
        len(data.train),
        len(data.val),
        data.num_classes,
        data.description,
        list(trunk.config.probe_layers),
        "cached features" if cfg.uses_cache else "trunk in the loop" + (" with augmentation" if cfg.augment else ""),
    )

    val = extract_features(
        trunk, _loader(data.val, prep, opts), cache_dtype=opts.cache_dtype, trunk_dtype=opts.trunk_dtype
    )
    n = len(data.train)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    train: FeatureSet | None = None
    if cfg.uses_cache or opts.knn:  # one clean pass: the cache, and/or the k-NN bank
        train = extract_features(
            trunk,
            _loader(data.train, prep, opts),
            keep_tokens=cfg.uses_cache,
            cache_dtype=opts.cache_dtype,
            trunk_dtype=opts.trunk_dtype,
        )
    if cfg.uses_cache:
        assert train is not None
        batches = lambda epoch: train.batches(epoch_order(n, epoch, cfg.seed), cfg.batch_size)  # noqa: E731
    else:
        dataset = ImageDataset(data.train, prep, augment=cfg.augment)

        def loader_for(order: Tensor) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                dataset, batch_sampler=[b.tolist() for b in order.split(cfg.batch_size)], num_workers=opts.workers
            )

        batches = trunk_batches(trunk, loader_for, n, cfg)

    torch.manual_seed(cfg.seed)  # here, not earlier: data loaders draw from the global RNG, paths differ in how many
    head = build_head(trunk, data.num_classes, cfg)
    train_start = time.perf_counter()
    history = train_head(head, batches, steps_per_epoch, cfg, opts.device)
    train_seconds = time.perf_counter() - train_start

    assert val.tokens is not None
    logits = predict(head, val.tokens, opts.device)  # (n_val, C)
    cm = confusion_matrix(logits.argmax(-1), val.labels, data.num_classes)
    metrics: dict[str, Any] = {
        **topk_accuracy(logits, val.labels),
        **(_knn(train, val, data.num_classes, cfg) if opts.knn and train is not None else {}),
        **confusion_summary(cm, data.class_names),
        "num_train": n,
        "num_val": len(data.val),
        "num_classes": data.num_classes,
        "chance_top1": float(torch.bincount(val.labels).max() / len(val.labels)),
        "final_train_loss": history[-1]["loss"],
        "final_train_top1": history[-1]["train_top1"],
        "feature_seconds": val.seconds + (train.seconds if train is not None else 0.0),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "probe_layers": list(trunk.config.probe_layers),
        "data": data.description,
        "probe_config": cfg.to_dict(),
        "trunk": trunk_source or trunk.config.name,
    }
    logger.info(
        "held-out top-1 %.4f, top-5 %.4f; k-NN top-1 %s (chance %.3f)",
        metrics["top1"],
        metrics["top5"],
        f"{metrics['knn_top1']:.4f}" if "knn_top1" in metrics else "n/a",
        metrics["chance_top1"],
    )
    for pair in metrics["most_confused"][:3]:
        logger.info(
            "  confused: %s -> %s: %d (%.1f%% of %s)",
            pair["true"],
            pair["predicted"],
            pair["count"],
            100 * pair["of_true"],
            pair["true"],
        )

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "trunk": trunk_source or trunk.config.name,
            "data": data.description,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "probe_config": cfg.to_dict(),
            **(provenance or {}),
        }
        head_path = save_head(trunk, head, out_dir / HEAD_FILE, data.class_names, record)
        write_label_file(out_dir / "labels.json", data.class_names)
        metrics["head_file"] = str(head_path)
        if trunk_source is not None and opts.verify_images > 0:
            k = min(opts.verify_images, len(data.val))
            images = torch.stack([ImageDataset(data.val, prep)[i][0] for i in range(k)])
            metrics["head_round_trip"] = verify_head_file(
                trunk_source, head_path, images, logits[:k], device=opts.device
            )
        (out_dir / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=1, default=str) + "\n")
        logger.info("wrote %s, labels.json and metrics.json to %s", HEAD_FILE, out_dir)
    metrics["history"] = history
    return metrics
