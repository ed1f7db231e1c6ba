"""Resuming the right run (issue 12): another run's checkpoint is refused, a finished run resumes as a no-op, and
FSDP starts without its view-tensor warning."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from training import pretrain
from training.config import load_config

from .conftest import QUICK, read_metrics, write_images


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return [*QUICK, "--data", str(data), "--checkpoint.dir", str(run), "--train.steps", "2", "--data.num_workers",
            "0", "--data.val_fraction", "0", "--checkpoint.every", "2", *extra]  # fmt: skip


def test_changed_data_model_or_objective_is_refused_with_how_to_start_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_images(first, 8)
    write_images(second, 8, start_seed=100)
    run = tmp_path / "run"
    assert pretrain.main(_args(first, run)) == 0
    trunk = (run / "trunk.safetensors").read_bytes()
    attempts = {
        "data.path": _args(second, run),
        "model.decoder_block": _args(first, run, "--model.decoder_block", "plain"),
        "model.decoder_depth": _args(first, run, "--model.decoder_depth", "1"),
    }
    for option, argv in attempts.items():
        caplog.clear()
        assert pretrain.main(argv) == 2, option
        assert f"{option}:" in caplog.text and "new --checkpoint.dir" in caplog.text, caplog.text
    assert (run / "trunk.safetensors").read_bytes() == trunk  # the earlier run's trunk is untouched
    assert pretrain.main([*_args(second, tmp_path / "fresh")]) == 0  # the advice works


def test_resuming_a_finished_run_is_a_no_op_without_nan_or_a_second_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = tmp_path / "images", tmp_path / "run"
    write_images(data, 8)
    done = pretrain.train(load_config(_args(data, run, "--log.progress_bar", "true")))
    capsys.readouterr()
    trunk_mtime = (run / "trunk.safetensors").stat().st_mtime_ns
    again = pretrain.train(load_config(_args(data, run, "--log.progress_bar", "true")))
    err = capsys.readouterr().err
    assert again["step"] == 2 and again["loss"] == done["loss"] and math.isfinite(again["loss"])
    assert "it/s" not in err and "2/2" not in err  # no tqdm bar printed for a run with nothing left to do
    assert len(read_metrics(run)) == 2 and (run / "trunk.safetensors").stat().st_mtime_ns == trunk_mtime


def test_fsdp_starts_without_the_view_tensor_warning(tmp_path: Path) -> None:
    data = tmp_path / "images"
    write_images(data, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain.train(load_config(_args(data, tmp_path / "run", "--dist.strategy", "fsdp", "--train.steps", "1",
                                         "--checkpoint.export", "false")))  # fmt: skip
    assert not [w for w in caught if "view tensor" in str(w.message)]
