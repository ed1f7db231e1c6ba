"""Pre-training an AIMv2-architecture trunk with the AIM pixel objective (issue 11): the config switch, the
aimv2-debug recipe on a CPU (the loss falls, the exported trunk is a v2 model), and the plain-script entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aimcore
from training import pretrain
from training.config import load_config

from .conftest import PRETRAIN, QUICK, ROOT, read_metrics, write_images

V2_YAML = ROOT / "training" / "configs" / "aimv2-debug.yaml"


def test_family_switch_turns_a_v1_flavor_into_an_aimv2_trunk() -> None:
    cfg = load_config(["--model.flavor", "aim-debug", "--model.family", "aimv2"]).aim_config()
    assert (cfg.family, cfg.norm, cfg.ffn, cfg.pos_embed) == ("aimv2", "rmsnorm", "swiglu", "learned")
    assert (cfg.embed_dim, cfg.depth, cfg.mlp_hidden_dim, cfg.norm_eps) == (64, 4, 176, 1e-5)
    assert load_config(["--config", str(V2_YAML)]).aim_config().img_size == 56


def test_aimv2_debug_pretrains_on_cpu_and_exports_a_v2_trunk(tmp_path: Path) -> None:
    data = tmp_path / "images"
    write_images(data, 48, size=(64, 60))
    run = tmp_path / "run"
    cfg = load_config([*QUICK, "--config", str(V2_YAML), "--data", str(data), "--checkpoint.dir", str(run),
                       "--train.steps", "60", "--log.every", "10", "--checkpoint.every", "60",
                       "--log.eval_every", "60", "--data.num_workers", "0"])  # fmt: skip
    result = pretrain.train(cfg)
    losses = [r["loss"] for r in read_metrics(run)]
    assert losses[-1] < 0.8 * losses[0], losses
    trunk = aimcore.load_model(result["trunk"])
    assert trunk.config.family == "aimv2" and trunk.head is None
    assert trunk.state_dict()["preprocessor.pos_embed"].shape == (1, 16, 64)
    assert "trunk.blocks.0.mlp.fc3.weight" in trunk.state_dict()


def test_plain_script_takes_model_family(tmp_path: Path) -> None:
    data = tmp_path / "images"
    write_images(data, 8, size=(40, 36))
    cmd = [sys.executable, str(PRETRAIN), *QUICK, "--model.family", "aimv2", "--data", str(data),
           "--checkpoint.dir", str(tmp_path / "run"), "--train.steps", "2", "--data.num_workers", "0",
           "--log.eval_every", "0"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_metrics(tmp_path / "run")) == 2
