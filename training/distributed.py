"""Process groups, devices and the wrappers applied to the model from outside: activation checkpointing,
torch.compile (per block), and DDP or FSDP2 (`torch.distributed.fsdp.fully_shard`).

Launch with `torchrun` for one or many nodes (`--nnodes N --node_rank i --rdzv_endpoint host:port`); a plain
`python training/pretrain.py` is one process with no process group. gloo on the CPU, nccl on CUDA.
None of the wrappers changes a state-dict key: AC replaces a block's bound `forward`, compile uses
`nn.Module.compile` (in place), and FSDP2 swaps the module class in place.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "barrier",
    "gather_objects",
    "init_distributed",
    "shutdown",
    "wrap_model",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str, strategy: str, backend: str) -> DistEnv:
    """Read torchrun's environment, pick the device and start the process group when there is more than one
    process (or when FSDP is asked for on a single process, since it needs a device mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use --train.device auto or cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world > 1 and strategy == "none":
        raise RuntimeError(f"{world} processes but dist.strategy=none; use ddp or fsdp")
    if world > 1 or strategy == "fsdp":
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" not in os.environ:  # a single process asked for FSDP: a one-member group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
        logger.info("process group: %s, rank %d of %d, device %s, %s", backend, rank, world, dev, strategy)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=strategy)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------
# Wrappers applied from outside the model
# ----------------------------------------------------------------------------------------------------------------
def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Full activation checkpointing per block: keep only each block's input, recompute the rest in backward.
    Non-reentrant checkpointing, which composes with torch.compile and FSDP2."""
    for block in blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


def apply_compile(blocks: list[nn.Module], backend: str = "inductor") -> None:
    """Regional compilation: each block compiled once and reused (all blocks of a stack share one graph)."""
    for block in blocks:
        block.compile(backend=backend)


def apply_fsdp(
    model: nn.Module, blocks: list[nn.Module], *, device_type: str, reshard_after_forward: bool
) -> nn.Module:
    """FSDP2: shard every block, then the root (patch embedding, norms, decoder projection and prediction).
    Parameters stay float32 (autocast does the bf16 compute) and gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns at every start that the root returned a view (Linear on (B, N, D) reshapes its 2-D matmul). The
    # warning is about in-place ops on that output; the loss reads the predictions out of place only (loss.py),
    # so the warning is silenced for this exact message instead of paying a copy of the predictions per step.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def wrap_model(
    model: nn.Module,
    blocks: list[nn.Module],
    env: DistEnv,
    *,
    ac: bool,
    compile: bool,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Move to the device, then AC -> compile -> DDP/FSDP (torchtitan's order). Returns the module to call;
    the unwrapped model stays the one to read state from (DDP only adds a `module.` prefix)."""
    model.to(env.device)
    if ac:
        apply_activation_checkpointing(blocks)
    if compile:
        apply_compile(blocks)
    if env.strategy == "fsdp":
        return apply_fsdp(model, blocks, device_type=env.device.type, reshard_after_forward=reshard_after_forward)
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model
