"""Per-rank memory plan of a pre-training run, built on the meta device (no weights, no data, any flavor).

    python -m training.memory_plan --config training/configs/aim-600M.yaml --world-size 64 [--ac] [--micro-batch 32]
    python training/pretrain.py --config ... --dry-run 64        # the same plan for that config, then exit

What it counts, per rank, with FSDP2 over `world_size` ranks (fp32 parameters, bf16 autocast, AdamW):
- parameters, gradients, AdamW moments: 4 + 4 + 8 bytes per parameter, divided by the world size (fully sharded);
- gathered working set: FSDP2 all-gathers one block at a time in fp32 and prefetches the next: 2 x the largest
  block's unsharded parameters;
- activations: the bytes of every tensor autograd saves for backward, counted by a `saved_tensors_hooks` around a
  meta-device forward of `micro_batch` images through the real model (trunk, prefix-causal mask and pixel head),
  with activation checkpointing applied as training applies it (then plus one block's share of the full
  activations, held while that block recomputes in backward). The saved tensors are counted at the compute
  dtype (bf16, 2 bytes) as under autocast. Attention is counted as SDPA's math path saves it (the (B, H, N, N)
  probabilities), an upper bound for the fused kernels (FlexAttention / flash save O(N) per head).
The plan omits the CUDA context (~0.5-1 GiB), the allocator's fragmentation and NCCL buffers: keep ~10-15 % free.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training.config import TrainConfig, load_config
from training.decoder import PretrainModel
from training.distributed import apply_activation_checkpointing
from training.masking import build_attention_mask

__all__ = ["MemoryPlan", "plan_memory"]

logger = logging.getLogger("training.memory_plan")
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    flavor: str
    world_size: int
    micro_batch: int
    activation_checkpointing: bool
    params: int  # parameters of trunk + head
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    gathered_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.params_gib + self.grads_gib + self.optimizer_gib + self.gathered_gib + self.activations_gib


def _saved_activation_bytes(model: PretrainModel, cfg: TrainConfig, micro_batch: int) -> int:
    """Bytes autograd keeps for backward during one forward of `micro_batch` images (meta tensors, bf16)."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t  # a weight's transpose is a view of the parameter: no new bytes
        if id(base) not in seen and not isinstance(base, torch.nn.Parameter):
            seen.add(id(base))
            total += t.numel() * min(t.element_size(), 2 if t.is_floating_point() else t.element_size())
        return t

    a = model.aim.config
    images = torch.empty(micro_batch, 3, a.img_size, a.img_size, device="meta", requires_grad=False)
    prefix = torch.ones(micro_batch, dtype=torch.int64, device="meta")
    _, attn_mask = build_attention_mask(prefix, a.num_patches, "sdpa")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, attn_mask)
    return total


def plan_memory(cfg: TrainConfig, world_size: int) -> MemoryPlan:
    """The plan for `cfg` (its flavor, micro-batch and activation-checkpointing setting) at `world_size` ranks."""
    aim_cfg = cfg.aim_config()
    with torch.device("meta"):
        model = PretrainModel(aim_cfg, decoder_style=cfg.model.decoder_block, decoder_eps=cfg.model.decoder_norm_eps)
    n = sum(p.numel() for p in model.parameters())
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks())
    activations = _saved_activation_bytes(model, cfg, cfg.train.micro_batch_size)
    if cfg.dist.activation_checkpointing:  # kept: block inputs; plus one block's activations while it recomputes
        apply_activation_checkpointing(model.blocks())
        activations = _saved_activation_bytes(model, cfg, cfg.train.micro_batch_size) + activations // len(
            model.blocks()
        )
    return MemoryPlan(
        flavor=aim_cfg.name, world_size=world_size, micro_batch=cfg.train.micro_batch_size,
        activation_checkpointing=cfg.dist.activation_checkpointing, params=n,
        params_gib=4 * n / world_size / GIB, grads_gib=4 * n / world_size / GIB,
        optimizer_gib=8 * n / world_size / GIB, gathered_gib=2 * 4 * largest_block / GIB,
        activations_gib=activations / GIB,
    )  # fmt: skip


def format_plan(plan: MemoryPlan) -> str:
    fields = {k: v for k, v in asdict(plan).items() if k.endswith("_gib")}
    parts = ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in fields.items())
    return (
        f"{plan.flavor} ({plan.params / 1e6:.0f} M params), {plan.world_size} ranks, micro-batch {plan.micro_batch}, "
        f"AC {'on' if plan.activation_checkpointing else 'off'}: per rank {parts} -> {plan.total_gib:.2f} GiB"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.memory_plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--ac", action="store_true", help="activation checkpointing on")
    parser.add_argument("--micro-batch", type=int, default=0, help="override train.micro_batch_size")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = ["--dist.activation_checkpointing", "true"] if args.ac else []
    if args.micro_batch:
        extra += ["--train.micro_batch_size", str(args.micro_batch)]
    plan = plan_memory(load_config([*rest, *extra]), args.world_size)
    logger.info("%s", format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
