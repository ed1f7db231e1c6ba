"""Training config: YAML files, dotted overrides, --help for every option, fix-it validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from training.config import SECTIONS, ConfigError, TrainConfig, build_arg_parser, load_config

from .conftest import ROOT

FLAVORS = ("aim-debug", "aim-demo", "aim-600M", "aim-1B", "aim-3B", "aim-7B")
CONFIGS = [ROOT / "training" / "configs" / f"{name}.yaml" for name in FLAVORS]


def test_every_flavor_has_a_valid_config_file() -> None:
    for path in CONFIGS:
        cfg = load_config(["--config", str(path)])
        assert cfg.model.flavor == path.stem
        assert cfg.aim_config().num_classes == 0  # pre-training builds a bare trunk


def test_released_configs_follow_the_recipe() -> None:
    for name in ("aim-600M", "aim-1B", "aim-3B", "aim-7B"):
        cfg = load_config(["--config", str(ROOT / "training" / "configs" / f"{name}.yaml")])
        o = cfg.optim
        assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.warmup_fraction) == (1e-3, (0.9, 0.95), 0.05, 1.0, 0.025)
        assert (o.warmup_init_lr, o.end_lr, cfg.train.precision) == (1e-6, 0.0, "bf16")
        assert cfg.aim_config().decoder_dim == 2048 and cfg.aim_config().decoder_depth == 12
        assert (cfg.data.crop_scale, cfg.data.color_jitter, cfg.data.color_jitter_p) == (
            (0.4, 1.0),
            (0.4, 0.4, 0.2, 0.1),
            0.8,
        )


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optim:\n  lr: 3.0e-4\ntrain:\n  steps: 50\n")
    cfg = load_config(
        ["--config", str(yaml_file), "--train.steps", "70", "--data", "/x", "--data.crop_scale", "0.5,0.9"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 70 and cfg.data.path == "/x"
    assert cfg.data.crop_scale == (0.5, 0.9) and cfg.optim.weight_decay == 0.05
    assert load_config(["--log.tensorboard", "false", "--optim.lr=1e-4"]).log.tensorboard is False
    assert load_config(["--optim.lr=1e-4"]).optim.lr == 1e-4


def test_help_documents_every_option() -> None:
    text = build_arg_parser().format_help()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}" in text
            assert f.metadata["doc"][:20] in " ".join(text.split())


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["--train.global_batch_size", "100", "--train.micro_batch_size", "32"], "multiple of train.micro_batch_size"),
        (["--optim.warmup_fraction", "1.5"], "e.g. 0.025"),
        (["--model.flavor", "aim-huge"], "use one of"),
        (["--model.attention", "flex", "--train.device", "cpu"], "use --model.attention sdpa or auto"),
        (["--train.precision", "fp16", "--train.device", "cpu"], "use --train.precision bf16"),
        (["--data.crop_scale", "0.9,0.4"], "0 < low <= high <= 1"),
        (["--train.nan_policy", "ignore"], "set --train.nan_policy to one of"),
        (["--data.hflip_p", "2"], "is a probability"),
    ],
)
def test_invalid_combinations_fail_with_a_fix(args: list[str], fix: str) -> None:
    with pytest.raises(ConfigError, match="invalid training config") as info:
        load_config(args)
    assert fix in str(info.value)


def test_runtime_checks_need_the_world_size() -> None:
    cfg = load_config(["--train.global_batch_size", "96", "--train.micro_batch_size", "16"])
    cfg.check_runtime(world_size=2, device_type="cpu")  # 96 = 16 x 2 x 3
    assert cfg.accumulation(2) == 3 and cfg.global_batch(2) == 96
    with pytest.raises(ConfigError, match="pick a global batch that is a multiple of 64"):
        cfg.check_runtime(world_size=4, device_type="cpu")


def test_unknown_keys_and_bad_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown options"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="unknown config sections"):
        TrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match="cannot read 'many' as int"):
        load_config(["--train.steps", "many"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        load_config(["--no-such-flag", "1"])
