"""The module that gets traced: AimModel seen through the graph contract of `aimcore.manifest`.

pixels (B, C, S, S) float32 -> a tuple of the requested outputs, in the order of `CONTRACT_OUTPUTS`:
- embedding (B, D): mean over tokens of post_trunk_norm(last block), not L2-normalised (needs the full trunk);
- pooled (B, D): the head's attention-pooled vector; logits (B, num_classes).
A graph without `embedding` stops after the last probe layer, exactly as `AimModel.features` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from aimcore import AimConfig, AimModel, build_model
from aimcore.manifest import OUTPUT_EMBEDDING, OUTPUT_LOGITS, OUTPUT_POOLED

__all__ = [
    "CONTRACT_OUTPUTS",
    "ContractGraph",
    "FrozenBatchNorm",
    "blocks_run",
    "frozen_head_norm",
    "output_shapes",
    "resolve_outputs",
    "with_dtype",
]

CONTRACT_OUTPUTS = (OUTPUT_EMBEDDING, OUTPUT_POOLED, OUTPUT_LOGITS)
# Graph output -> the AimModel.features output it is computed from.
_FEATURE_OF = {OUTPUT_EMBEDDING: "tokens", OUTPUT_POOLED: "pooled", OUTPUT_LOGITS: "logits"}


def resolve_outputs(config: AimConfig, outputs: Iterable[str] | str | None) -> tuple[str, ...]:
    """The graph outputs in contract order. Default: embedding, plus pooled and logits when there is a head."""
    if outputs is None:
        wanted = set(CONTRACT_OUTPUTS) if config.has_head else {OUTPUT_EMBEDDING}
    else:
        items = outputs.split(",") if isinstance(outputs, str) else list(outputs)
        wanted = {o.strip() for o in items if o.strip()}
    unknown = wanted - set(CONTRACT_OUTPUTS)
    if unknown or not wanted:
        raise ValueError(f"graph outputs must be a non-empty subset of {CONTRACT_OUTPUTS}, got {sorted(wanted)}")
    if not config.has_head and wanted & {OUTPUT_POOLED, OUTPUT_LOGITS}:
        raise ValueError(f"outputs {sorted(wanted)} need a classification head; {config.name!r} has none")
    return tuple(o for o in CONTRACT_OUTPUTS if o in wanted)


def blocks_run(config: AimConfig, outputs: Iterable[str]) -> int:
    """Trunk blocks the graph executes: all of them for `embedding`, else up to the last probe layer."""
    return config.depth if OUTPUT_EMBEDDING in outputs else max(config.probe_layers) + 1


def output_shapes(config: AimConfig, outputs: Iterable[str]) -> dict[str, list[int | str]]:
    """Manifest shapes with "B" for the dynamic batch axis."""
    widths = {OUTPUT_EMBEDDING: config.embed_dim, OUTPUT_POOLED: config.embed_dim, OUTPUT_LOGITS: config.num_classes}
    return {name: ["B", widths[name]] for name in outputs}


class ContractGraph(nn.Module):
    """forward(pixels) -> tuple of the requested outputs. compute_dtype (e.g. float16) casts the input after it
    enters and every output before it leaves, so the graph's interface stays float32 whatever runs inside."""

    def __init__(self, model: AimModel, outputs: Iterable[str], compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)
        self.compute_dtype = compute_dtype
        self._features = tuple(_FEATURE_OF[o] for o in self.outputs)

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        x = pixels if self.compute_dtype is None else pixels.to(self.compute_dtype)
        feats = self.model.features(x, outputs=self._features)
        result: list[Tensor] = []
        for name in self.outputs:
            if name == OUTPUT_EMBEDDING:
                assert feats.tokens is not None
                result.append(feats.tokens.mean(dim=1))  # (B, N, D) -> (B, D)
            elif name == OUTPUT_POOLED:
                assert feats.pooled is not None
                result.append(feats.pooled)
            else:
                assert feats.logits is not None
                result.append(feats.logits)
        return tuple(t.float() for t in result)


class FrozenBatchNorm(nn.Module):
    """Eval-mode BatchNorm1d(affine=False) as x * scale + shift over the channel axis of (B, D, N).

    Why: the TorchScript ONNX exporter must know BatchNorm's channel count, and with a dynamic batch axis the shape
    after the head's reshapes is unknown to it, so it refuses. Eval BatchNorm is this affine map; PyTorch's CPU
    kernel computes the same x * invstd + (-mean * invstd), so outputs agree to float rounding.
    """

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        invstd = torch.rsqrt(bn.running_var.float() + bn.eps)  # (D,)
        self.register_buffer("scale", invstd[:, None])  # (D, 1) broadcasts over tokens
        self.register_buffer("shift", (-bn.running_mean.float() * invstd)[:, None])

    def forward(self, x: Tensor) -> Tensor:  # (B, D, N) -> (B, D, N)
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


@contextlib.contextmanager
def frozen_head_norm(model: AimModel) -> Iterator[AimModel]:
    """Swap the head's BatchNorm for FrozenBatchNorm while exporting, and put the original back after."""
    head = model.head
    if head is None:
        yield model
        return
    original = head.bn
    head.bn = FrozenBatchNorm(original)  # type: ignore[assignment]
    try:
        yield model
    finally:
        head.bn = original


def with_dtype(model: AimModel, dtype: torch.dtype) -> AimModel:
    """A copy of `model` with floating weights in `dtype`, built on the meta device so only the new weights are
    allocated (a float16 copy of a 7B model costs 14 GB, not 28 + 14). BatchNorm statistics stay float32."""
    copy = build_model(model.config, device="meta")
    state = {
        k: v if (not v.is_floating_point() or ".bn." in k) else v.to(dtype)
        for k, v in model.state_dict().items()  # names are identical: same class, same config
    }
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()
