"""The AIM pixel loss against an independent NumPy computation written patch by patch from AIM_FACTS §7."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.loss import normalize_patches, patchify, pixel_loss, pixel_loss_terms
from training.masking import prefix_mask_from_lengths


def numpy_loss(pred: np.ndarray, images: np.ndarray, prefix_lens: list[int], p: int) -> float:
    """Loops over images and patches: target patch t (row-major grid), flattened (row, col, channel), normalised by
    its mean and unbiased variance + 1e-6; output t-1 predicts patch t; only patches t >= prefix count."""
    b, _, height, width = images.shape
    h, w = height // p, width // p
    total, count = 0.0, 0
    for i in range(b):
        for t in range(1, h * w):
            if t < prefix_lens[i]:
                continue
            r, q = divmod(t, w)
            patch = images[i, :, r * p : (r + 1) * p, q * p : (q + 1) * p]  # (C, P, P)
            flat = patch.transpose(1, 2, 0).reshape(-1).astype(np.float64)  # (row, col, channel), channel fastest
            target = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-6)
            total += np.mean((pred[i, t - 1].astype(np.float64) - target) ** 2)
            count += 1
    return total / count


@pytest.mark.parametrize(("b", "c", "size", "p"), [(3, 3, 32, 8), (2, 3, 28, 14), (4, 1, 12, 4)])
def test_loss_matches_numpy(b: int, c: int, size: int, p: int) -> None:
    g = torch.Generator().manual_seed(b * 100 + size)
    n = (size // p) ** 2
    images = torch.randn(b, c, size, size, generator=g) * 2 + 0.5
    pred = torch.randn(b, n, p * p * c, generator=g)
    lens = torch.randint(1, n, (b,), generator=g)
    mask = prefix_mask_from_lengths(lens, n)
    got = pixel_loss(pred, images, mask, p).item()
    want = numpy_loss(pred.numpy(), images.numpy(), lens.tolist(), p)
    assert got == pytest.approx(want, rel=2e-6)


def test_patchify_order_is_row_col_channel() -> None:
    # Image whose value encodes (channel, y, x): decode it back from the patch layout.
    c, size, p = 3, 8, 4
    ch, yy, xx = np.meshgrid(np.arange(c), np.arange(size), np.arange(size), indexing="ij")
    img = torch.from_numpy((ch * 10000 + yy * 100 + xx).astype(np.float32))[None]
    patches = patchify(img, p)  # (1, 4, 48)
    assert patches.shape == (1, 4, p * p * c)
    second = patches[0, 1].reshape(p, p, c)  # patch 1 = grid row 0, column 1
    for r in range(p):
        for q in range(p):
            for k in range(c):
                assert second[r, q, k].item() == k * 10000 + r * 100 + (p + q)


def test_targets_use_the_unbiased_variance() -> None:
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    out = normalize_patches(x)
    expected = (x - 2.5) / np.sqrt(np.var([1, 2, 3, 4], ddof=1) + 1e-6)
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, (x - 2.5) / np.sqrt(np.var([1, 2, 3, 4]) + 1e-6))


def test_only_targets_outside_the_prefix_count() -> None:
    """With prefix length k, changing the predictions at outputs 0..k-2 changes nothing; output k-1 counts."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 16, 16, generator=g)
    pred = torch.randn(1, 16, 48, generator=g)
    k = 5
    mask = prefix_mask_from_lengths(torch.tensor([k]), 16)
    base = pixel_loss(pred, images, mask, 4)
    early = pred.clone()
    early[0, : k - 1] += 100.0
    assert pixel_loss(early, images, mask, 4).item() == base.item()
    last_prefix = pred.clone()
    last_prefix[0, k - 1] += 1.0
    assert pixel_loss(last_prefix, images, mask, 4).item() != base.item()
    _, count = pixel_loss_terms(pred, images, mask, 4)
    assert count.item() == 16 - k  # targets k..15
    final_out = pred.clone()
    final_out[0, -1] += 100.0  # the last output predicts nothing
    assert pixel_loss(final_out, images, mask, 4).item() == base.item()


def test_perfect_prediction_gives_zero_and_bf16_pred_is_upcast() -> None:
    images = torch.randn(2, 3, 16, 16)
    target = normalize_patches(patchify(images, 4))
    pred = torch.zeros(2, 16, 48)
    pred[:, :-1] = target[:, 1:]
    mask = prefix_mask_from_lengths(torch.tensor([1, 9]), 16)
    assert pixel_loss(pred, images, mask, 4).item() == pytest.approx(0.0, abs=1e-10)
    loss = pixel_loss(pred.bfloat16(), images, mask, 4)
    assert loss.dtype == torch.float32


def test_shape_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match="does not match"):
        pixel_loss(torch.zeros(1, 16, 10), torch.zeros(1, 3, 16, 16), torch.ones(1, 16, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="multiple of the patch"):
        patchify(torch.zeros(1, 3, 15, 16), 4)
