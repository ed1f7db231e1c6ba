"""Live k-NN top-1 next to the val loss: logged at each validation, equal to an offline k-NN of the exported trunk,
and the final summary's Spearman correlation."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import aimcore
from tests.conftest import encode, make_photo
from training import pretrain
from training.config import load_config
from training.live_knn import LiveKnn
from training.probe_lib.metrics import spearman

from .conftest import QUICK, read_metrics, write_images


def labelled_folder(root: Path) -> Path:
    """Two classes that differ in colour statistics: plain photos and their colour-inverted versions."""
    for cls in ("plain", "inverted"):
        (root / cls).mkdir(parents=True)
    for i in range(10):
        photo = make_photo(40, 36, seed=500 + i)
        (root / "plain" / f"{i}.png").write_bytes(encode(photo, "PNG"))
        inverted = photo.point(lambda v: 255 - v)
        (root / "inverted" / f"{i}.png").write_bytes(encode(inverted, "PNG"))
    return root


def test_knn_top1_is_logged_with_val_loss_and_the_summary_has_their_spearman(tmp_path: Path) -> None:
    data, run = tmp_path / "images", tmp_path / "run"
    write_images(data, 24)
    knn = labelled_folder(tmp_path / "labelled")
    cfg = load_config([*QUICK, "--data", str(data), "--checkpoint.dir", str(run), "--train.steps", "6",
                       "--log.eval_every", "2", "--checkpoint.every", "6", "--data.num_workers", "0",
                       "--log.knn_path", str(knn), "--log.knn_per_class", "6", "--log.knn_k", "3"])  # fmt: skip
    result = pretrain.train(cfg)
    rows = read_metrics(run, "val")
    assert [r["step"] for r in rows] == [2, 4, 6] and all(0 <= r["knn_top1"] <= 1 for r in rows)
    summary = read_metrics(run, "summary")
    assert len(summary) == 1 and summary[0]["spearman_n"] == 3
    expected = spearman([r["val_loss"] for r in rows], [r["knn_top1"] for r in rows])["rho"]
    for rho in (result["spearman_val_loss_knn_top1"], summary[0]["spearman_val_loss_knn_top1"]):
        assert rho == expected or (math.isnan(rho) and math.isnan(expected))  # NaN when top-1 did not move

    # The logged figure is the k-NN of the trained trunk: recompute it offline from the exported weights.
    trunk = aimcore.load_model(result["trunk"])
    offline = LiveKnn(str(knn), img_size=32, per_class=6, k=3, batch_size=16)
    assert offline.top1(trunk, trunk, torch.device("cpu"), torch.bfloat16) == rows[-1]["knn_top1"]


def test_knn_under_fsdp_gathers_the_root_and_matches_the_plain_run(tmp_path: Path) -> None:
    """FSDP2 (one process): the root's own parameters are unsharded for the k-NN forward; same figure as no FSDP."""
    data = tmp_path / "images"
    write_images(data, 16)
    knn = labelled_folder(tmp_path / "labelled")
    top1 = {}
    for strategy in ("none", "fsdp"):
        run = tmp_path / strategy
        pretrain.train(load_config([*QUICK, "--data", str(data), "--checkpoint.dir", str(run), "--train.steps", "1",
                                    "--log.eval_every", "1", "--data.num_workers", "0", "--checkpoint.export", "false",
                                    "--log.knn_path", str(knn), "--log.knn_per_class", "4", "--log.knn_k", "3",
                                    "--dist.strategy", strategy]))  # fmt: skip
        top1[strategy] = read_metrics(run, "val")[0]["knn_top1"]
    assert top1["fsdp"] == top1["none"]
