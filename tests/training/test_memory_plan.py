"""The --dry-run memory planner: exact parameter counts from the meta device, sharding and AC in the right way."""

from __future__ import annotations

import pytest

from training import pretrain
from training.config import load_config
from training.decoder import build_pretrain_model
from training.memory_plan import plan_memory


def test_plan_counts_the_real_model_and_scales_with_world_size_batch_and_ac() -> None:
    cfg = load_config(["--model.flavor", "aim-debug", "--train.micro_batch_size", "8"])
    real = build_pretrain_model(cfg.aim_config(), decoder_style="l3m", decoder_eps=1e-5, seed=0)
    one, four = plan_memory(cfg, 1), plan_memory(cfg, 4)
    assert one.params == sum(p.numel() for p in real.parameters())
    assert one.params_gib == pytest.approx(4 * one.params / 2**30)
    assert one.optimizer_gib == pytest.approx(2 * one.params_gib)  # AdamW: two fp32 moments
    assert four.params_gib == pytest.approx(one.params_gib / 4) and four.activations_gib == one.activations_gib
    double = plan_memory(load_config(["--model.flavor", "aim-debug", "--train.micro_batch_size", "16"]), 1)
    assert double.activations_gib == pytest.approx(2 * one.activations_gib, rel=0.05)
    ac = plan_memory(load_config(["--model.flavor", "aim-debug", "--train.micro_batch_size", "8",
                                  "--dist.activation_checkpointing", "true"]), 1)  # fmt: skip
    assert ac.activations_gib < 0.5 * one.activations_gib


def test_pretrain_dry_run_prints_the_plan_and_trains_nothing(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    run = tmp_path / "run"
    assert pretrain.main(["--model.flavor", "aim-debug", "--dry-run", "8", "--checkpoint.dir", str(run)]) == 0
    assert "dry run: aim-debug" in caplog.text and "8 ranks" in caplog.text and not run.exists()
    assert pretrain.main(["--dry-run", "x"]) == 2
