"""Fixtures for the pre-training tests: small real image folders, and helpers to launch `training/pretrain.py`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import encode, make_photo

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "training" / "pretrain.py"
DEBUG_YAML = ROOT / "training" / "configs" / "aim-debug.yaml"
ASSETS = ROOT / "tests" / "assets" / "images"

# Fast, quiet options shared by the end-to-end tests (aim-debug, one thread, no TensorBoard, metrics every step).
QUICK = [
    "--config", str(DEBUG_YAML),
    "--train.threads", "1",
    "--log.every", "1",
    "--log.progress_bar", "false",
    "--log.tensorboard", "false",
    "--log.peak_tflops", "1",
]  # fmt: skip


def write_images(folder: Path, count: int, *, size: tuple[int, int] = (48, 40), start_seed: int = 0) -> list[Path]:
    """`count` photo-like images, alternating JPEG and PNG, spread over two sub-folders."""
    paths = []
    for i in range(count):
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        w, h = size[0] + 4 * (i % 3), size[1] + 4 * (i % 2)
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        path = sub / f"img_{i:03d}.{ext}"
        path.write_bytes(encode(make_photo(w, h, seed=start_seed + i), fmt))
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def _slow_tests_on_request(request: pytest.FixtureRequest) -> None:
    """Tests marked slow (the DDP twin of the FSDP torchrun test, compiling blocks) run with AIM_SLOW_TESTS=1, so
    the default run of this folder stays near a minute on a 2-core machine."""
    if request.node.get_closest_marker("slow") and os.environ.get("AIM_SLOW_TESTS") != "1":
        pytest.skip("slow; set AIM_SLOW_TESTS=1 to run it")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """24 small generated photos plus 4 of the real test JPEG/PNG files (EXIF rotation, CMYK, palette, RGBA)."""
    folder = tmp_path / "images"
    write_images(folder, 24)
    for name in ("exif_rot6_427x300.jpg", "cmyk_330x270.jpg", "palette_320x240.png", "rgba_260x300.png"):
        shutil.copy(ASSETS / name, folder / name)
    return folder


def run_pretrain(args: list[str], *, torchrun: int = 0, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Launch training/pretrain.py as a script (or under torchrun with `torchrun` processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    else:
        cmd = [sys.executable]
    return subprocess.run(
        [*cmd, str(PRETRAIN), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def checkpoint_model_state(folder: Path) -> dict:
    """The full model state of a sharded checkpoint, read in this process (as export_trunks reads it)."""
    import torch

    from training.checkpointing import CheckpointManager, read_model_state
    from training.config import TrainConfig
    from training.decoder import PretrainModel

    cfg = TrainConfig.from_dict(CheckpointManager.load_meta(folder)["config"])
    with torch.device("meta"):
        model = PretrainModel(cfg.aim_config(), decoder_style=cfg.model.decoder_block,
                              decoder_eps=cfg.model.decoder_norm_eps)  # fmt: skip
    model.to_empty(device="cpu")
    return read_model_state(folder, model.state_dict())


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
