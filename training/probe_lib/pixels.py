"""The raw-pixel baseline: softmax regression (one linear layer) on the images the trunk would see.

Inputs are the reference eval transform's output (3, S, S), average-pooled to `pixel_size` (a memory choice: at
S=112 the full vector is 37,632 values per image; 28 gives 2,352, Fashion-MNIST's native resolution), flattened
and standardised per dimension with the training set's mean and std. Trained with the probe's own optimiser,
schedule and budget (train.train_head), so the comparison changes only the features and the head.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimcore import PreprocessConfig
from training.probe_lib.data import ImageDataset, LabelledSet, ProbeData
from training.probe_lib.metrics import confusion_matrix, confusion_summary, knn_scores, topk_accuracy
from training.probe_lib.train import ProbeConfig, epoch_order, predict, train_head

__all__ = ["pixel_features", "run_pixel_linear"]

logger = logging.getLogger(__name__)


def pixel_features(data: LabelledSet, prep: PreprocessConfig, pixel_size: int, batch_size: int = 256) -> Tensor:
    """(n, 3 * p * p) float32: preprocessed images, average-pooled to p x p (p = 0 keeps S x S)."""
    loader = torch.utils.data.DataLoader(ImageDataset(data, prep), batch_size=batch_size, shuffle=False)
    out = []
    for images, _ in loader:  # (B, 3, S, S)
        if pixel_size and pixel_size != images.shape[-1]:
            images = F.adaptive_avg_pool2d(images, pixel_size)
        out.append(images.flatten(1))
    return torch.cat(out)


def run_pixel_linear(
    data: ProbeData, prep: PreprocessConfig, cfg: ProbeConfig, pixel_size: int, device: torch.device
) -> dict[str, Any]:
    """Fit and evaluate the linear classifier on raw pixels; also k-NN on the same pixel vectors."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    x_train, x_val = pixel_features(data.train, prep, pixel_size), pixel_features(data.val, prep, pixel_size)
    y_train, y_val = torch.as_tensor(data.train.labels), torch.as_tensor(data.val.labels)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    feature_seconds = time.perf_counter() - start

    linear = nn.Linear(x_train.shape[1], data.num_classes)
    nn.init.zeros_(linear.weight)  # convex problem: a zero start is the natural one
    nn.init.zeros_(linear.bias)
    n = len(y_train)

    def batches(epoch: int):
        for idx in epoch_order(n, epoch, cfg.seed).split(cfg.batch_size):
            yield x_train[idx], y_train[idx]

    train_start = time.perf_counter()
    history = train_head(linear, batches, (n + cfg.batch_size - 1) // cfg.batch_size, cfg, device)
    train_seconds = time.perf_counter() - train_start
    logits = predict(linear, x_val, device)
    knn = knn_scores(x_train, y_train, x_val, data.num_classes, cfg.knn_k, cfg.knn_temperature)
    cm = confusion_matrix(logits.argmax(-1), y_val, data.num_classes)
    metrics = {
        **topk_accuracy(logits, y_val),
        **{f"knn_{k}": v for k, v in topk_accuracy(knn, y_val).items()},
        **confusion_summary(cm, data.class_names),
        "num_train": n,
        "num_val": len(y_val),
        "pixel_size": pixel_size or prep.img_size,
        "input_dim": int(x_train.shape[1]),
        "final_train_loss": history[-1]["loss"],
        "final_train_top1": history[-1]["train_top1"],
        "feature_seconds": feature_seconds,
        "train_seconds": train_seconds,
    }
    logger.info(
        "raw-pixel linear: held-out top-1 %.4f, top-5 %.4f; pixel k-NN top-1 %.4f",
        metrics["top1"],
        metrics["top5"],
        metrics["knn_top1"],
    )
    return metrics
