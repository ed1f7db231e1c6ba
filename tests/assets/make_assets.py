"""Regenerate the test images and the aim-debug reference weights (deterministic).

    python tests/assets/make_assets.py

The reference *outputs* beside them (`reference/*.json`, `reference/*.npz`) were computed by running Apple's ml-aim
v1 code (commit 3762121, `aim.v1.torch`) and torchvision 0.29.1's `val_transforms` on these files in a separate
environment; see tests/assets/README.md. They are data, not code from ml-aim.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))

from aimcore import build_model, get_flavor  # noqa: E402
from tests.conftest import make_photo  # noqa: E402

logger = logging.getLogger(__name__)


def write_images(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    photo = make_photo(640, 427, seed=1)
    photo.save(out / "landscape_640x427.jpg", quality=90)
    make_photo(427, 640, seed=2).save(out / "portrait_427x640.jpg", quality=90)
    make_photo(301, 255, seed=3).save(out / "odd_301x255.png")
    make_photo(255, 333, seed=4).save(out / "odd_255x333.png")
    make_photo(300, 256, seed=5).save(out / "exact_short_300x256.png")
    make_photo(100, 80, seed=6).save(out / "small_100x80.png")
    make_photo(224, 224, seed=7).save(out / "square_224.jpg", quality=95)
    # EXIF orientation 6 (rotate 90° clockwise to display): stored 427 wide, displayed 427 tall.
    exif = Image.Exif()
    exif[0x0112] = 6
    make_photo(427, 300, seed=8).save(out / "exif_rot6_427x300.jpg", quality=90, exif=exif.tobytes())
    make_photo(320, 240, seed=9).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(
        out / "palette_320x240.png"
    )
    make_photo(280, 350, seed=10).convert("L").save(out / "gray_280x350.jpg", quality=90)
    rgba = make_photo(260, 300, seed=11).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 260, dtype=np.uint8), (300, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(out / "rgba_260x300.png")
    buf = io.BytesIO()
    make_photo(330, 270, seed=12).convert("CMYK").save(buf, format="JPEG", quality=90)
    (out / "cmyk_330x270.jpg").write_bytes(buf.getvalue())


def write_debug_weights(path: Path) -> None:
    """aim-debug weights in the reference key layout, with non-trivial norms and BatchNorm statistics so every
    parameter matters in a parity check."""
    torch.manual_seed(1234)
    model = build_model(get_flavor("aim-debug"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.ndim >= 2:
                p.mul_(1.5)
        model.head.bn.running_mean.normal_(0, 0.5)
        model.head.bn.running_var.uniform_(0.3, 3.0)
        model.head.bn.num_batches_tracked.fill_(1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    write_images(ROOT / "images")
    write_debug_weights(ROOT / "reference" / "aim_debug_reference_layout.safetensors")
    logger.info("wrote %s", sorted(p.name for p in (ROOT / "images").iterdir()))
