"""Pre-training configuration: nested dataclasses, YAML files and dotted command-line overrides.

Precedence: dataclass defaults < `--config FILE.yaml` < `--section.option VALUE` on the command line. Every leaf
option has a help string (the `doc` metadata) so `--help` documents all of them. Unknown keys are rejected, and
`TrainConfig.__post_init__` refuses invalid combinations with a message saying how to fix them. Checks that need
the world size (batch divisibility) live in `check_runtime`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aimcore.config import AimConfig, canonical_flavor, flavor_names, get_flavor

__all__ = ["ConfigError", "TrainConfig", "build_arg_parser", "load_config"]


def family_changes(base: AimConfig, family: str) -> dict[str, Any]:
    """Switch a flavor's architecture family, keeping its width, depth, heads and probe layers. AIMv2's SwiGLU
    width is 2.75 x the model width (2816 for 1024, AIMV2_FACTS §1), rounded to a multiple of 8; RMSNorm eps 1e-5."""
    if family == "aimv2":
        hidden = round(base.embed_dim * 2.75 / 8) * 8
        return {"family": "aimv2", "mlp_hidden_dim": hidden, "norm_eps": 1e-5, "native": False}
    if family == "aim":
        return {"family": "aim", "mlp_hidden_dim": 0, "norm_eps": 1e-6, "native": False}
    raise ConfigError(f"model.family must be 'aim' or 'aimv2', got {family!r}")


class ConfigError(ValueError):
    """An invalid option or combination of options; the message says how to fix it."""


def opt(default: Any, doc: str) -> Any:
    """A config field with its help text. Mutable defaults (tuples are fine) are wrapped in a factory."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelSection:
    flavor: str = opt("aim-debug", f"aimcore flavor to pre-train: {', '.join(flavor_names())}")
    img_size: int = opt(0, "override the flavor's image size (0 = the flavor's)")
    family: str = opt(
        "",
        "trunk architecture: aim (v1: LayerNorm, GELU MLP, sin-cos) | aimv2 (RMSNorm, SwiGLU, learned positions); "
        "empty = the flavor's. aimv2 on a v1 flavor keeps its width/depth/heads with AIMv2's SwiGLU ratio 2.75",
    )
    decoder_dim: int = opt(0, "override the prediction head width (0 = the flavor's decoder_dim)")
    decoder_depth: int = opt(-1, "override the number of head blocks (-1 = the flavor's decoder_depth)")
    decoder_block: str = opt(
        "l3m", "head block form: 'l3m' = x+LN1(x) then x+MLP(LN2(x)) as ml-l3m computes it; 'plain' = x+MLP(LN(x))"
    )
    decoder_norm_eps: float = opt(1e-5, "LayerNorm eps in the prediction head (ml-l3m uses 1e-5)")
    attention: str = opt("auto", "prefix attention kernel: auto (flex on CUDA, sdpa elsewhere) | sdpa | flex")


@dataclass
class DataSection:
    path: str = opt("", "training images: a folder (recursive), a list file (.txt) or WebDataset .tar shards")
    format: str = opt("auto", "how to read data.path: auto | folder | list | wds")
    val_path: str = opt("", "separate validation images (same forms as data.path); empty = hold out val_fraction")
    val_fraction: float = opt(0.01, "fraction of data.path held out for validation (stable hash of the name)")
    val_max_samples: int = opt(512, "at most this many validation images per evaluation")
    num_workers: int = opt(2, "data worker processes per rank (0 = load in the training process)")
    prefetch_factor: int = opt(2, "batches each worker prepares ahead")
    crop_scale: tuple[float, float] = opt((0.4, 1.0), "RandomResizedCrop area fraction range")
    crop_ratio: tuple[float, float] = opt((0.75, 4.0 / 3.0), "RandomResizedCrop aspect-ratio range")
    hflip_p: float = opt(0.5, "probability of a horizontal flip")
    color_jitter: tuple[float, float, float, float] = opt(
        (0.4, 0.4, 0.2, 0.1), "ColorJitter strengths: brightness, contrast, saturation, hue"
    )
    color_jitter_p: float = opt(0.8, "probability of applying ColorJitter")
    max_retries: int = opt(16, "replacement draws for an unreadable image before the batch fails")
    max_image_pixels: int = opt(89_478_485, "images with more pixels are treated as corrupt (decompression bombs)")
    jpeg_draft: bool = opt(True, "let libjpeg decode large JPEGs at a reduced scale (>= 2x the crop size)")


@dataclass
class OptimSection:
    lr: float = opt(1e-3, "peak learning rate (no automatic scaling with the batch size)")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas")
    eps: float = opt(1e-8, "AdamW eps")
    weight_decay: float = opt(0.05, "AdamW weight decay; never applied to norms, biases or position tables")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value (0 = off)")
    warmup_fraction: float = opt(0.025, "fraction of train.steps spent in linear warmup")
    warmup_init_lr: float = opt(1e-6, "learning rate at step 0 of the warmup")
    end_lr: float = opt(0.0, "learning rate at the end of the cosine decay")


@dataclass
class TrainSection:
    steps: int = opt(1000, "optimizer steps in the whole run (the schedule's length)")
    global_batch_size: int = opt(0, "images per optimizer step over all ranks (0 = micro_batch_size x world size)")
    micro_batch_size: int = opt(32, "images per forward pass on each rank; accumulation = global / (micro x world)")
    precision: str = opt("bf16", "autocast dtype: bf16 | fp16 (CUDA only, with a grad scaler) | fp32")
    seed: int = opt(0, "seed for initialisation, data order, augmentation and prefix lengths")
    device: str = opt("auto", "auto (CUDA when present) | cpu | cuda")
    threads: int = opt(0, "torch intra-op threads per process (0 = torch's default)")
    nan_policy: str = opt("skip", "on a non-finite loss or gradient: skip (drop the update) | stop (exit with error)")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (slower on CUDA)")


@dataclass
class DistSection:
    strategy: str = opt("auto", "auto (ddp when world > 1) | none | ddp | fsdp")
    backend: str = opt("auto", "process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo")
    compile: bool = opt(False, "torch.compile each block (regional compilation, state-dict keys unchanged)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass")
    fsdp_reshard_after_forward: bool = opt(True, "FSDP2: free gathered parameters after forward (ZeRO-3 style)")


@dataclass
class CheckpointSection:
    dir: str = opt("runs/aim", "run directory: checkpoints, metrics.jsonl, tensorboard/ and the exported trunk")
    every: int = opt(500, "save a checkpoint every this many steps (and at the end)")
    keep_last: int = opt(3, "keep this many most recent checkpoints")
    keep_best: bool = opt(True, "also keep the checkpoint with the lowest validation loss")
    resume: str = opt("auto", "auto (latest complete checkpoint in dir, if any) | never | PATH to a checkpoint")
    export: bool = opt(True, "at the end, write the trunk as aimcore safetensors (trunk.safetensors)")


@dataclass
class LogSection:
    every: int = opt(10, "log training metrics every this many steps")
    eval_every: int = opt(500, "validation loss every this many steps (0 = only at checkpoints and the end)")
    progress_bar: bool = opt(True, "tqdm progress bar on rank 0")
    jsonl: bool = opt(True, "append metrics to <dir>/metrics.jsonl")
    tensorboard: bool = opt(True, "write TensorBoard scalars to <dir>/tensorboard")
    peak_tflops: float = opt(0.0, "per-device peak for MFU (0 = known GPU table, else a measured matmul peak)")


@dataclass
class DebugSection:
    sigkill_at_step: int = opt(0, "testing: SIGKILL this process in the middle of this step (0 = never)")
    sigkill_during_save_at_step: int = opt(0, "testing: SIGKILL while the checkpoint of this step is half written")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "dist": DistSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
    "debug": DebugSection,
}

_CHOICES = {
    ("model", "family"): ("", "aim", "aimv2"),
    ("model", "decoder_block"): ("l3m", "plain"),
    ("model", "attention"): ("auto", "sdpa", "flex"),
    ("data", "format"): ("auto", "folder", "list", "wds"),
    ("train", "precision"): ("bf16", "fp16", "fp32"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "nan_policy"): ("skip", "stop"),
    ("dist", "strategy"): ("auto", "none", "ddp", "fsdp"),
    ("dist", "backend"): ("auto", "nccl", "gloo"),
}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))

    # ----- validation -----
    def _problems(self) -> list[str]:
        p: list[str] = []
        for (section, name), choices in _CHOICES.items():
            value = getattr(getattr(self, section), name)
            if value not in choices:
                p.append(f"{section}.{name}={value!r} is not one of {choices}; set --{section}.{name} to one of them")
        if canonical_flavor(self.model.flavor) is None:
            p.append(f"model.flavor={self.model.flavor!r} is unknown; use one of {flavor_names()}")
        else:
            try:
                self.aim_config()
            except ValueError as exc:
                p.append(f"the model overrides give an invalid architecture ({exc}); change model.img_size/decoder_*")
        d, o, t = self.data, self.optim, self.train
        if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            p.append(f"data.crop_scale={d.crop_scale} must satisfy 0 < low <= high <= 1, e.g. --data.crop_scale 0.4,1")
        if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
            p.append(f"data.crop_ratio={d.crop_ratio} must satisfy 0 < low <= high, e.g. 0.75,1.3333")
        for name in ("hflip_p", "color_jitter_p"):
            if not 0 <= getattr(d, name) <= 1:
                p.append(f"data.{name}={getattr(d, name)} is a probability: give a value in [0, 1]")
        b, c, s, h = d.color_jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            p.append(f"data.color_jitter={d.color_jitter}: strengths must be >= 0 and hue in [0, 0.5]")
        if not 0 <= d.val_fraction < 1:
            p.append(f"data.val_fraction={d.val_fraction} must be in [0, 1); use 0 with data.val_path or no val")
        if d.num_workers < 0 or d.prefetch_factor < 1 or d.max_retries < 0:
            p.append("data.num_workers >= 0, data.prefetch_factor >= 1 and data.max_retries >= 0 are required")
        if o.lr <= 0 or o.warmup_init_lr < 0 or o.end_lr < 0 or o.end_lr > o.lr:
            p.append(f"optim: need lr > 0 and 0 <= end_lr <= lr, warmup_init_lr >= 0 (got lr={o.lr}, end={o.end_lr})")
        if not 0 <= o.warmup_fraction < 1:
            p.append(f"optim.warmup_fraction={o.warmup_fraction} must be in [0, 1), e.g. 0.025 (2.5 %)")
        if not (0 <= o.betas[0] < 1 and 0 <= o.betas[1] < 1) or o.weight_decay < 0 or o.grad_clip < 0:
            p.append("optim: betas must be in [0, 1), weight_decay >= 0 and grad_clip >= 0 (0 turns clipping off)")
        if t.steps < 1 or t.micro_batch_size < 1 or t.global_batch_size < 0:
            p.append("train.steps >= 1, train.micro_batch_size >= 1 and train.global_batch_size >= 0 are required")
        if t.global_batch_size and t.global_batch_size % t.micro_batch_size:
            p.append(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{t.micro_batch_size}; change one of them"
            )
        if t.precision == "fp16" and t.device == "cpu":
            p.append("train.precision=fp16 needs CUDA (a grad scaler on CPU is pointless); use --train.precision bf16")
        if self.model.attention == "flex" and t.device == "cpu":
            p.append(
                "model.attention=flex cannot train on the CPU (FlexAttention has no CPU backward in torch 2.13); "
                "use --model.attention sdpa or auto"
            )
        ck = self.checkpoint
        if ck.every < 1 or ck.keep_last < 1:
            p.append(f"checkpoint.every ({ck.every}) and checkpoint.keep_last ({ck.keep_last}) must be >= 1")
        if not ck.dir:
            p.append("checkpoint.dir is empty; give a run directory, e.g. --checkpoint.dir runs/my-run")
        if self.log.every < 1 or self.log.eval_every < 0 or self.log.peak_tflops < 0:
            p.append("log.every >= 1, log.eval_every >= 0 and log.peak_tflops >= 0 are required")
        return p

    def check_runtime(self, world_size: int, device_type: str) -> None:
        """Checks that need the launch: batch divisibility over the ranks and the device."""
        p: list[str] = []
        t = self.train
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size and t.global_batch_size % per_step:
            p.append(
                f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x world size = "
                f"{t.micro_batch_size} x {world_size}; pick a global batch that is a multiple of {per_step}"
            )
        if device_type != "cuda":
            if t.precision == "fp16":
                p.append("train.precision=fp16 needs CUDA; use --train.precision bf16 on the CPU")
            if self.model.attention == "flex":
                p.append("model.attention=flex needs CUDA for training; use --model.attention auto")
            if self.dist.backend == "nccl":
                p.append("dist.backend=nccl needs CUDA; use --dist.backend gloo (or auto)")
        if p:
            raise ConfigError("invalid training config for this launch:\n  - " + "\n  - ".join(p))

    # ----- derived -----
    def aim_config(self) -> AimConfig:
        """The trunk's architecture: the flavor with the overrides, and no classification head."""
        base = get_flavor(self.model.flavor)
        changes: dict[str, Any] = {"num_classes": 0}
        if self.model.img_size:
            changes["img_size"] = self.model.img_size
        if self.model.decoder_dim:
            changes["decoder_dim"] = self.model.decoder_dim
        if self.model.decoder_depth >= 0:
            changes["decoder_depth"] = self.model.decoder_depth
        if self.model.family and self.model.family != base.family:
            changes |= family_changes(base, self.model.family)
        return base.replace(**changes)

    def global_batch(self, world_size: int) -> int:
        return self.train.global_batch_size or self.train.micro_batch_size * world_size

    def accumulation(self, world_size: int) -> int:
        return self.global_batch(world_size) // (self.train.micro_batch_size * world_size)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config sections {unknown}; known sections are {list(SECTIONS)}")
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            values = dict(data.get(name) or {})
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - set(known))
            if bad:
                raise ConfigError(f"unknown options {[f'{name}.{b}' for b in bad]}; {name} has {sorted(known)}")
            hints = typing.get_type_hints(section_cls)
            sections[name] = section_cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})
        return cls(**sections)


# ----------------------------------------------------------------------------------------------------------------
# Parsing values
# ----------------------------------------------------------------------------------------------------------------
def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn a YAML value or a command-line string into the field's type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, Sequence) or len(value) != len(args):
            raise ConfigError(f"{name} needs {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if origin in (types.UnionType, typing.Union):
        return value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {value!r} as {hint.__name__}") from exc
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python training/pretrain.py",
        description="Pre-train an AIM v1 trunk (autoregressive next-patch pixel regression with a prefix-causal "
        "trunk). Options come from the dataclass defaults, then --config, then --section.option overrides.",
    )
    parser.add_argument("--config", default="", help="YAML file with any subset of the options below")
    parser.add_argument("--data", default=None, help="shorthand for --data.path")
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
            kind = getattr(hints[f.name], "__name__", "value").replace("tuple", "list")
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{section}.{f.name}",
                default=None,
                metavar=kind.upper(),
                help=f"{f.metadata['doc']} (default: {shown})",
            )
    return parser


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (or `argv`) into a validated TrainConfig."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    data: dict[str, dict[str, Any]] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; configs live in training/configs/")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...)")
        data = {k: dict(v or {}) for k, v in loaded.items()}
    for key, value in vars(args).items():
        if value is None or "." not in key:
            continue
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = value
    if args.data is not None:
        data.setdefault("data", {})["path"] = args.data
    return TrainConfig.from_dict(data)
