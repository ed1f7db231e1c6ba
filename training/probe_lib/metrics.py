"""Metrics: top-k accuracy, the confusion summary, k-NN classification and Spearman's rank correlation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "confusion_matrix",
    "confusion_summary",
    "knn_scores",
    "rankdata",
    "spearman",
    "topk_accuracy",
]


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """scores (n, C), labels (n,) -> {"top1": .., "top5": ..}; k is capped at C (top-5 of 3 classes is 1.0)."""
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hits = (scores.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = float(hits.float().mean()) if len(labels) else float("nan")
    return out


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_summary(cm: Tensor, names: Sequence[str], top: int = 5) -> dict[str, Any]:
    """Per-class accuracy and the most-confused (true -> predicted) pairs, largest count first."""
    support = cm.sum(dim=1)
    per_class = {names[c]: (float(cm[c, c] / support[c]) if support[c] else float("nan")) for c in range(len(names))}
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = []
    for flat in torch.argsort(off.flatten(), descending=True)[:top].tolist():
        t, p = divmod(flat, cm.shape[1])
        if off[t, p] == 0:
            break
        pairs.append(
            {"true": names[t], "predicted": names[p], "count": int(off[t, p]), "of_true": float(off[t, p] / support[t])}
        )
    return {"per_class_top1": per_class, "most_confused": pairs}


@torch.no_grad()
def knn_scores(
    train: Tensor,
    train_labels: Tensor,
    query: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Weighted k-NN votes (n_query, C): cosine similarity to the k nearest training vectors, each voting for its
    class with weight exp(sim / temperature) (the DINO / InstDisc evaluation)."""
    bank = F.normalize(train.float(), dim=1)  # (n_train, D)
    k = min(k, len(bank))
    out = []
    for q in query.split(chunk):
        sims = F.normalize(q.float(), dim=1) @ bank.T  # (m, n_train)
        top_sims, top_idx = sims.topk(k, dim=1)  # (m, k)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Spearman
# ----------------------------------------------------------------------------------------------------------------
def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; ties share their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Spearman's rho (Pearson correlation of the tie-averaged ranks) and a two-sided p-value.

    p comes from scipy when it is installed; otherwise it is the exact permutation p-value for n <= 8 (all n!
    orderings) and None above that. Our own rho is always computed; scipy's must agree with it.
    """
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need two sequences of equal length >= 3, got {len(x)} and {len(y)}")
    rx, ry = rankdata(x), rankdata(y)
    rho = _pearson(rx, ry)
    result: dict[str, Any] = {"rho": rho, "n": len(x), "p_value": None, "p_method": None}
    if math.isnan(rho):  # one side is constant: no ranking to correlate
        result["p_method"] = "undefined: constant input"
        return result
    try:
        from scipy import stats
    except ImportError:
        stats = None
    if stats is not None:
        res = stats.spearmanr(x, y)
        result.update(p_value=float(res.pvalue), p_method="scipy.stats.spearmanr", rho_scipy=float(res.statistic))
    elif len(x) <= 8:
        count = sum(abs(_pearson(rx, np.asarray(p))) >= abs(rho) - 1e-12 for p in itertools.permutations(ry))
        result.update(p_value=count / math.factorial(len(x)), p_method="exact permutation")
    return result
