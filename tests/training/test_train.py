"""End to end on aim-debug: the loss falls, checkpoints are kept and exported, the NaN policy, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import aimcore
from training import pretrain
from training.checkpointing import CheckpointManager
from training.config import load_config

from .conftest import QUICK, checkpoint_model_state, read_metrics, write_images


def test_loss_falls_within_a_few_hundred_steps_and_the_trunk_is_exported(tmp_path: Path) -> None:
    data = tmp_path / "images"
    write_images(data, 48, size=(40, 36))
    run = tmp_path / "run"
    cfg = load_config([*QUICK, "--data", str(data), "--checkpoint.dir", str(run), "--train.steps", "150",
                       "--log.every", "10", "--checkpoint.every", "50", "--checkpoint.keep_last", "1",
                       "--log.eval_every", "25", "--data.num_workers", "0", "--log.tensorboard", "true"])  # fmt: skip
    result = pretrain.train(cfg)
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 15
    assert losses[-1] < 0.75 * losses[0], losses  # next-patch regression is learnt, not just noise
    val = [r["val_loss"] for r in read_metrics(run, "val")]
    assert len(val) == 6 and val[-1] < val[0]
    first = read_metrics(run)[0]
    for key in ("lr", "grad_norm", "images_per_s", "tokens_per_s", "mfu", "samples_seen", "data_wait_frac"):
        assert first[key] >= 0
    assert first["tokens_per_s"] == pytest.approx(first["images_per_s"] * 16)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # keep_last=1 plus the best by validation loss; each with its completion marker.
    kept = CheckpointManager(run, keep_last=1, keep_best=True, is_main=True).complete()
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert kept[-1][0] == 150 and best["step"] in {s for s, _ in kept} and len(kept) <= 2
    assert best["val_loss"] == min(v for v in val[1::2])  # evaluated at steps 50, 100, 150 (and 25, 75, 125)

    # The exported trunk is a self-describing aimcore checkpoint equal to the trained weights.
    model = aimcore.load_model(result["trunk"])
    assert model.config.name == "aim-debug" and model.head is None
    state = checkpoint_model_state(kept[-1][1])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"aim.{key}"])

    # Every kept checkpoint exports as a trunk with its step and validation loss (what training/evidence.py reads).
    from training.export_trunks import export_run

    trunks = export_run(run)
    assert [p.parent for p in trunks] == [folder for _, folder in kept]
    for (step, _), path in zip(kept, trunks, strict=True):
        exported = aimcore.load_model(path)
        assert exported.provenance["step"] == step
        assert exported.provenance["val_loss"] == pytest.approx(val[[25, 50, 75, 100, 125, 150].index(step)])
    final = aimcore.load_model(trunks[-1])
    for key, value in final.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_nan_policy_skip_drops_the_update_and_stop_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "images"
    write_images(data, 12)
    original = pretrain.Trainer._forward_loss
    calls = {"n": 0}

    def poisoned(self: pretrain.Trainer, images: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, images, prefix)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(pretrain.Trainer, "_forward_loss", poisoned)
    args = [*QUICK, "--data", str(data), "--train.steps", "4", "--data.num_workers", "0",
            "--data.val_fraction", "0", "--checkpoint.export", "false"]  # fmt: skip
    result = pretrain.train(load_config([*args, "--checkpoint.dir", str(tmp_path / "skip")]))
    rows = read_metrics(tmp_path / "skip")
    assert result["step"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] != rows[2]["loss"]  # NaN logged for step 3 ...
    assert all(r["loss"] == r["loss"] for r in rows[3:])  # ... the weights were not touched by it

    calls["n"] = 0
    with pytest.raises(pretrain.NonFiniteLossError, match="step 3"):
        pretrain.train(load_config([*args, "--checkpoint.dir", str(tmp_path / "stop"), "--train.nan_policy", "stop"]))


def test_main_reports_config_errors_with_exit_code_2(caplog: pytest.LogCaptureFixture) -> None:
    assert pretrain.main(["--train.steps", "0"]) == 2
    assert "train.steps >= 1" in caplog.text
