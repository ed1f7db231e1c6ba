"""k-NN, top-k, the confusion summary and Spearman's rho."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch

from training.probe_lib.metrics import (
    confusion_matrix,
    confusion_summary,
    knn_scores,
    rankdata,
    spearman,
    topk_accuracy,
)


def test_knn_classifies_separated_clusters_and_weights_by_similarity() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 5  # 4 well-separated directions
    train_labels = torch.arange(4).repeat_interleave(30)
    train = centres[train_labels] + 0.5 * torch.randn(120, 16, generator=gen)
    query_labels = torch.arange(4).repeat_interleave(10)
    query = centres[query_labels] + 0.5 * torch.randn(40, 16, generator=gen)
    scores = knn_scores(train, train_labels, query, num_classes=4, k=20)
    assert scores.shape == (40, 4)
    assert topk_accuracy(scores, query_labels)["top1"] == 1.0

    # Hand example: cosine similarities 1.0 (class 0) and 0.6 (class 1, twice); T = 0.1 -> e^10 vs 2 e^6.
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    votes = knn_scores(bank, torch.tensor([0, 1, 1]), torch.tensor([[2.0, 0.0]]), 2, k=3, temperature=0.1)
    assert votes[0].tolist() == pytest.approx([math.exp(10), 2 * math.exp(6)], rel=1e-5)
    # k larger than the bank is capped.
    assert knn_scores(bank, torch.tensor([0, 1, 1]), bank, 2, k=50).shape == (3, 2)


def test_topk_and_confusion_summary() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == {"top1": 0.5, "top2": 1.0, "top5": 1.0}
    cm = confusion_matrix(scores.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    summary = confusion_summary(cm, ["a", "b", "c"], top=5)
    assert summary["per_class_top1"]["a"] == 1.0 and summary["per_class_top1"]["b"] == pytest.approx(1 / 3)
    assert math.isnan(summary["per_class_top1"]["c"])
    pairs = {(p["true"], p["predicted"]): p["count"] for p in summary["most_confused"]}
    assert pairs == {("b", "a"): 1, ("b", "c"): 1}


def test_rankdata_averages_ties() -> None:
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_perfect_and_reversed() -> None:
    assert spearman([1, 2, 3, 4, 5, 6], [3, 4, 8, 9, 10, 20])["rho"] == pytest.approx(1.0)
    assert spearman([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.2, 0.3, 0.35, 0.5, 0.7])["rho"] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2])
    constant = spearman([1, 2, 3], [0.5, 0.5, 0.5])
    assert math.isnan(constant["rho"]) and constant["p_value"] is None


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 5, 12).astype(float)
        y = x * 0.5 + rng.normal(0, 1, 12)
        ours = spearman(x.tolist(), y.tolist())
        assert ours["rho"] == pytest.approx(float(stats.spearmanr(x, y).statistic), abs=1e-12)
        assert ours["rho_scipy"] == pytest.approx(ours["rho"], abs=1e-12)


def test_spearman_without_scipy_gives_an_exact_permutation_p(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_scipy(name: str, *args, **kwargs):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError("scipy hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    result = spearman([6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6])
    assert result["rho"] == pytest.approx(-1.0)
    # Only the two perfectly (anti-)ordered permutations of 6 reach |rho| = 1: p = 2 / 720.
    assert result["p_method"] == "exact permutation" and result["p_value"] == pytest.approx(2 / 720)
    assert spearman(list(range(10)), list(range(10)))["p_value"] is None
