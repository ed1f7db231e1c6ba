"""Crash safety and resume: SIGKILL mid-step and mid-save, then resume bit for bit; torchrun with 2 processes
(gloo, CPU) and a resume of its checkpoint with a different process count."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import pretrain
from training.checkpointing import CheckpointManager
from training.config import load_config

from .conftest import QUICK, checkpoint_model_state, read_metrics, run_pretrain


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return [*QUICK, "--data", str(data), "--checkpoint.dir", str(run), "--train.steps", "12",
            "--checkpoint.every", "4", "--log.eval_every", "0", "--checkpoint.export", "false", *extra]  # fmt: skip


def test_sigkill_and_resume_gives_identical_losses_at_every_later_step(image_folder: Path, tmp_path: Path) -> None:
    """Reference: 12 uninterrupted steps. Crash run: killed while saving step 8 (resumes from 4), then killed in
    the middle of step 10 (resumes from 8, or from 4 when the asynchronous save of 8 was still being written),
    then finishes. Every loss it logs equals the reference's bit for bit;
    one data worker is used so the worker path is covered too."""
    ref_run, run = tmp_path / "ref", tmp_path / "crash"
    pretrain.train(load_config(_args(image_folder, ref_run, "--data.num_workers", "1")))
    reference = {r["step"]: r["loss"] for r in read_metrics(ref_run)}
    assert sorted(reference) == list(range(1, 13))

    first = run_pretrain(
        _args(image_folder, run, "--data.num_workers", "1", "--debug.sigkill_during_save_at_step", "8")
    )
    assert first.returncode == -9, first.stderr[-2000:]
    assert list((run / "checkpoints" / ".tmp-step_00000008").glob("*.distcp"))  # the half-written save is there...
    assert [s for s, _ in CheckpointManager(run, keep_last=9, keep_best=True, is_main=True).complete()] == [4]

    second = run_pretrain(_args(image_folder, run, "--data.num_workers", "1", "--debug.sigkill_at_step", "10"))
    assert second.returncode == -9, second.stderr[-2000:]
    assert "removing incomplete checkpoint" in second.stderr  # ...and is cleaned up, never read
    assert "resumed from" in second.stderr and "at step 4" in second.stderr

    third = run_pretrain(_args(image_folder, run, "--data.num_workers", "1"))
    assert third.returncode == 0, third.stderr[-2000:]
    # Step 8's save is asynchronous: committed if its write finished before the kill in step 10, else lost.
    resumed = 8 if "at step 8" in third.stderr else 4
    assert f"resumed from {run / 'checkpoints'}/step_0000000{resumed} at step {resumed}" in third.stderr

    logged = read_metrics(run)
    assert [r["step"] for r in logged] == [*range(1, 9), *range(5, 10), *range(resumed + 1, 13)]
    for row in logged:
        assert row["loss"] == reference[row["step"]], f"step {row['step']}: {row['loss']} != {reference[row['step']]}"
    final = CheckpointManager.load_meta(run / "checkpoints" / "step_00000012")
    ref_final = CheckpointManager.load_meta(ref_run / "checkpoints" / "step_00000012")
    assert final["progress"] == ref_final["progress"]
    final_model = checkpoint_model_state(run / "checkpoints" / "step_00000012")
    for key, value in checkpoint_model_state(ref_run / "checkpoints" / "step_00000012").items():
        assert value.equal(final_model[key]), key


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_then_resume_with_one(image_folder: Path, tmp_path: Path, strategy: str) -> None:
    """2 gloo processes on the CPU with gradient accumulation (global batch 64 = 2 ranks x 16 x 2), then one
    process resumes their step-2 checkpoint (64 = 1 x 32 x 2) and reads the same images per step."""
    run = tmp_path / "run"
    common = ["--train.steps", "4", "--checkpoint.every", "2", "--data.num_workers", "0",
              "--checkpoint.keep_last", "5", "--train.global_batch_size", "64"]  # fmt: skip
    extra = ["--dist.strategy", strategy, "--dist.activation_checkpointing", str(strategy == "fsdp").lower()]
    two = run_pretrain(_args(image_folder, run, *common, *extra), torchrun=2, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "gloo, rank 0 of 2" in two.stderr and "2 ranks x 16 x 2 accumulation" in two.stderr
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples_seen"] == 4 * 64 and rows[-1]["loss"] < rows[0]["loss"]

    one = run_pretrain([*_args(image_folder, run, *common, "--train.micro_batch_size", "32"),
                        "--checkpoint.resume", str(run / "checkpoints" / "step_00000002")])  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming a 2-process run with 1 processes" in one.stderr and "1 ranks x 32 x 2" in one.stderr
    resumed = read_metrics(run)[4:]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["samples_seen"] for r in resumed] == [192, 256]  # the data position carried over
    for a, b in zip(resumed, rows[2:], strict=True):
        # The same images per step; only the split of the loss normalisation over ranks differs.
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


def test_two_ranks_two_workers_over_shards_resume_bit_identically_after_kill(tmp_path: Path) -> None:
    """WebDataset shards, 2 gloo ranks x 2 loader workers each: killed (SIGKILL, both ranks) in the middle of step
    5, resumed from the last committed asynchronous save; every logged loss equals the uninterrupted run's."""
    from .test_shards import write_shards

    write_shards(tmp_path / "shards", 4, 12)
    data = str(tmp_path / "shards" / "train-{000000..000003}.tar")
    common = ["--train.steps", "6", "--checkpoint.every", "2", "--data.num_workers", "2", "--data.val_fraction",
              "0", "--train.micro_batch_size", "4", "--data.shuffle_window", "10"]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"

    def argv(run_dir: Path) -> list[str]:
        return [*QUICK, "--data", data, "--checkpoint.dir", str(run_dir), "--log.eval_every", "0",
                "--checkpoint.export", "false", *common]  # fmt: skip

    first = run_pretrain(argv(ref), torchrun=2, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = {r["step"]: r["loss"] for r in read_metrics(ref)}
    base = argv(run)
    crashed = run_pretrain([*base, "--debug.sigkill_at_step", "5"], torchrun=2, timeout=240)
    assert crashed.returncode != 0
    resumed = run_pretrain(base, torchrun=2, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "2 ranks x 4 x 1" in resumed.stderr
    logged = read_metrics(run)
    assert {r["step"] for r in logged} == set(range(1, 7)) and len(logged) > 6  # some steps were run twice
    for row in logged:
        assert row["loss"] == reference[row["step"]], f"step {row['step']}: {row['loss']} != {reference[row['step']]}"


@pytest.mark.slow
def test_four_ranks_save_resumes_at_two_with_every_sample_of_the_epoch_once(tmp_path: Path) -> None:
    """End to end (torchrun, gloo): 4 ranks x micro-batch 2 train 2 steps and save; 2 ranks x 4 resume and finish
    the 32-sample epoch (global batch 8 throughout). The logged keys of all ranks are the epoch, each once."""
    import json

    from .test_shards import write_shards

    keys = write_shards(tmp_path / "shards", 4, 8)
    run = tmp_path / "run"

    def argv(steps: int, micro: int) -> list[str]:
        return [*QUICK, "--data", str(tmp_path / "shards"), "--checkpoint.dir", str(run), "--train.steps",
                str(steps), "--train.micro_batch_size", str(micro), "--train.global_batch_size", "8",
                "--data.val_fraction", "0", "--data.num_workers", "1", "--log.eval_every", "0",
                "--checkpoint.export", "false", "--debug.log_sample_keys", "true",
                "--data.shuffle_window", "6"]  # fmt: skip

    four = run_pretrain(argv(2, 2), torchrun=4, timeout=400)
    assert four.returncode == 0, four.stderr[-3000:]
    two = run_pretrain(argv(4, 4), torchrun=2, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resuming a 4-process run with 2 processes" in two.stderr
    seen = [k for f in sorted(run.glob("keys.rank*.jsonl")) for line in f.read_text().splitlines()
            for k in json.loads(line)["keys"]]  # fmt: skip
    assert len(seen) == 32 and sorted(seen) == sorted(keys)
