"""evidence.py on a synthetic run directory, run-directory reading, and the baselines command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import aimcore
from tests.probe.conftest import save_random_trunk
from training import baselines, evidence
from training.probe_lib.runs import find_checkpoints

FAST = ["--epochs", "2", "--batch-size", "16", "--val-fraction", "0.25", "--threads", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six random aim-debug trunks standing in for one run's checkpoints, plus its metrics.jsonl."""
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    lines = [json.dumps({"step": 0, "loss": 1.2})]  # a training line without val_loss is skipped
    for i, step in enumerate((100, 200, 300, 400, 500, 600)):
        save_random_trunk(run / "checkpoints" / f"step_{step:06d}.safetensors", seed=i)
        lines.append(json.dumps({"step": step, "val_loss": 1.0 - 0.1 * i}))
    (run / "checkpoints" / "step_000600_optim.safetensors").write_bytes(b"not a trunk")  # skipped by name
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\nnot json\n")
    return run


def test_find_checkpoints_reads_steps_and_losses(run_dir: Path) -> None:
    found = find_checkpoints(run_dir)
    assert [c.step for c in found] == [100, 200, 300, 400, 500, 600]
    assert [round(c.val_loss, 3) for c in found] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]


def test_step_folders_provenance_and_a_final_export_count_once(tmp_path: Path) -> None:
    """pretrain.py's shapes: RUN/checkpoints/step_N/trunk.safetensors, metrics lines with "kind", a final export."""
    for step in (500, 1000):
        save_random_trunk(tmp_path / "checkpoints" / f"step_{step:08d}" / "trunk.safetensors")
    model = aimcore.build_model(aimcore.get_flavor("aim-debug").replace(num_classes=0))
    aimcore.save_checkpoint(model, tmp_path / "trunk.safetensors", provenance={"step": 1000, "val_loss": 9.0})
    records = [{"kind": "val", "step": 500, "val_loss": 0.8}, {"kind": "val", "step": 1000, "val_loss": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    found = find_checkpoints(tmp_path)
    assert [(c.step, c.val_loss) for c in found] == [(500, 0.8), (1000, 0.7)]  # the logged loss wins
    assert found[1].path == tmp_path / "trunk.safetensors"


def test_evidence_writes_table_plot_and_spearman(run_dir: Path, toy_folder: Path, tmp_path: Path) -> None:
    md, png = tmp_path / "docs" / "EVIDENCE.md", tmp_path / "docs" / "evidence.png"
    rc = evidence.main(
        [
            "--run",
            str(run_dir),
            "--data",
            str(toy_folder),
            "--out-md",
            str(md),
            "--out-png",
            str(png),
            "--no-knn",
            *FAST,
        ]
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.count("\n| ") == 6 + 1  # header + one row per checkpoint
    assert "evidence.png" in text and "Spearman" in text
    record = json.loads(md.with_suffix(".json").read_text())
    rho = record["spearman_top1"]["rho"]
    assert len(record["rows"]) == 6 and (-1.0 <= rho <= 1.0 or math.isnan(rho))  # nan when every top-1 is equal


def test_evidence_refuses_too_few_checkpoints(run_dir: Path, toy_folder: Path, tmp_path: Path) -> None:
    rc = evidence.main(
        [
            "--run",
            str(run_dir),
            "--data",
            str(toy_folder),
            "--min-checkpoints",
            "7",
            "--out-md",
            str(tmp_path / "e.md"),
            *FAST,
        ]
    )
    assert rc == 2 and not (tmp_path / "e.md").exists()


def test_baselines_command(toy_folder: Path, tmp_path: Path) -> None:
    rc = baselines.main(["--data", str(toy_folder), "--flavor", "aim-debug", "--out", str(tmp_path), *FAST])
    assert rc == 0
    summary = json.loads((tmp_path / "baselines.json").read_text())
    names = list(summary["results"])
    assert names[0].startswith("random-init aim-debug") and names[1].startswith("linear classifier on raw pixels")
    pixels = summary["results"][names[1]]
    assert pixels["input_dim"] == 3 * 28 * 28 and pixels["top1"] >= 0.85  # the toy classes are linearly separable
    assert summary["results"][names[0]]["head_round_trip"]["ok"] is True
    assert "| random-init aim-debug" in (tmp_path / "baselines.md").read_text()
