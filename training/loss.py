"""AIM v1's pre-training loss: next-patch regression of per-patch-normalised pixels, outside the prefix only.

Exactly ml-l3m's `RasterPixelLoss` with `norm_pix_loss=True` (AIM_FACTS §7):
- patchify (B, C, H, W) -> (B, N, P*P*C), patches in raster order, values inside a patch in (row, col, channel)
  order with the channel fastest;
- normalise each target patch by its own mean and *unbiased* variance: (t - mean) / sqrt(var + 1e-6);
- the output at position i predicts patch i + 1: compare pred[:, :-1] with target[:, 1:];
- mean squared error over the P*P*C values of a patch, weighted by mask[:, 1:] (True = non-prefix patch), summed
  and divided by the number of weighted patches. The output at the last prefix position (which predicts the first
  non-prefix patch) counts; outputs at earlier prefix positions do not.
Everything is computed in float32 whatever the autocast dtype of the prediction.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["normalize_patches", "patchify", "pixel_loss", "pixel_loss_terms"]

TARGET_EPS = 1e-6


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, h*w, P*P*C) with (row-in-patch, col-in-patch, channel) order inside a patch."""
    b, c, height, width = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    h, w = height // p, width // p
    x = images.reshape(b, c, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P_row, P_col, C)
    return x.reshape(b, h * w, p * p * c)


def normalize_patches(patches: Tensor, eps: float = TARGET_EPS) -> Tensor:
    """Per-patch (last axis) standardisation with the unbiased variance, as the reference."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased (N - 1), torch's default, as in ml-l3m
    return (patches - mean) / (var + eps) ** 0.5


def pixel_loss_terms(pred: Tensor, images: Tensor, mask: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """(sum over weighted patches of the per-patch MSE, number of weighted patches), both float32 scalars.

    pred: (B, N, P*P*C) head outputs; images: (B, C, H, W) the normalised input images; mask: (B, N) bool,
    True = non-prefix. Returned separately so a validation pass can sum both over batches and ranks exactly.
    """
    target = normalize_patches(patchify(images.float(), patch_size))  # (B, N, L)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} does not match the targets {tuple(target.shape)}")
    if mask.shape != target.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, N) = {tuple(target.shape[:2])}")
    per_patch = (pred[:, :-1].float() - target[:, 1:]).pow(2).mean(dim=-1)  # (B, N-1): output i vs patch i+1
    weight = mask[:, 1:].to(per_patch.dtype)  # (B, N-1): 1 where the predicted patch is outside the prefix
    return (per_patch * weight).sum(), weight.sum()


def pixel_loss(pred: Tensor, images: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """The training loss: mean per-patch MSE over the non-prefix targets of the batch (a float32 scalar)."""
    total, count = pixel_loss_terms(pred, images, mask, patch_size)
    return total / count.clamp_min(1.0)
