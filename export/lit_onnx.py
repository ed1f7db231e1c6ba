"""ONNX export of an AIMv2-LiT model: two graphs, one per tower, with parity in one manifest.

    DIR/image.onnx   pixels (B, 3, S, S) float32   -> image_embeds (B, P)   pooling head + image_projector
    DIR/text.onnx    input_ids (B, L) int64         -> text_embeds (B, P)    causal tower, first EOS, text_projector
    DIR/lit_manifest.json   config, preprocessing, logit scale, checksums, opset, parity figures
    DIR/reference.npz       torch fp32 outputs of the parity inputs (the service's boot self-check re-runs them)
    DIR/tokenizer.json ...  the checkpoint's tokenizer files, copied, so the directory serves text on its own

Both outputs are projected and not normalised, as `LitModel.encode_image` / `encode_text`. The batch axis is
dynamic; the text length is the model's context length (the tokenizer always pads to it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aimcore.lit import LitModel

__all__ = ["LIT_MANIFEST", "LitParityError", "export_lit_onnx", "read_lit_manifest"]

logger = logging.getLogger(__name__)

LIT_MANIFEST = "lit_manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# fp32 graphs against fp32 torch: float32 noise, relative to each vector's largest entry.
MAX_REL_ERR, MIN_COSINE = 1e-4, 0.99999


class LitParityError(RuntimeError):
    pass


class _ImageGraph(nn.Module):
    def __init__(self, model: LitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class _TextGraph(nn.Module):
    def __init__(self, model: LitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model.encode_text(input_ids)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _export(graph: nn.Module, example: Tensor, path: Path, names: tuple[str, str], opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and trace-time shape checks
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: {0: "B"}, names[1]: {0: "B"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def _figures(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    scale = np.maximum(np.abs(ref).max(axis=1), 1e-12)
    rel = (np.abs(got - ref).max(axis=1) / scale).max()
    cos = np.sum(got * ref, axis=1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return {"max_abs": float(np.abs(got - ref).max()), "max_rel": float(rel), "min_cosine": float(cos.min())}


def _parity_ids(model: LitModel, tokenizer: Any, n: int, seed: int) -> np.ndarray:
    """(n, L) ids: real tokenised texts when the tokenizer is here, else random ids with EOS at varied places."""
    t = model.config.text
    if tokenizer is not None:
        texts = ["a photo of a cat.", "A red running shoe", "café ünïcode 東京", "x", "a " * 200]
        return tokenizer([texts[i % len(texts)] for i in range(n)])
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, t.eos_token_id, size=(n, t.context_length), dtype=np.int64)
    for row in range(n):
        end = int(rng.integers(1, t.context_length))
        ids[row, end], ids[row, end + 1 :] = t.eos_token_id, 0
    return ids


def export_lit_onnx(
    model: LitModel,
    out: str | Path,
    *,
    max_batch: int = 8,
    opset: int = 17,
    source: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write both graphs, check them against torch fp32 on ONNX Runtime (batch 1 and max_batch), write the
    manifest. Raises LitParityError (after writing the figures) when a tower is out of tolerance."""
    import onnxruntime as ort

    from aimcore.tokenizer import TextTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    cfg = model.config
    v = cfg.vision
    tok_dir = getattr(model, "tokenizer_dir", None)
    tokenizer = TextTokenizer.from_dir(tok_dir, context_length=cfg.text.context_length) if tok_dir else None
    # aimcore's RMSNorm is written with elementary ops, so both towers export at opset 17.
    _export(
        _ImageGraph(model),
        torch.randn(2, v.num_channels, v.img_size, v.img_size),
        out / "image.onnx",
        ("pixels", "image_embeds"),
        opset,
    )
    example_ids = torch.from_numpy(_parity_ids(model, None, 2, seed))
    _export(_TextGraph(model), example_ids, out / "text.onnx", ("input_ids", "text_embeds"), opset)

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((max_batch, v.num_channels, v.img_size, v.img_size)).astype(np.float32)
    ids = _parity_ids(model, tokenizer, max_batch, seed)
    with torch.no_grad():
        ref_img = model.encode_image(torch.from_numpy(pixels)).numpy()
        ref_txt = model.encode_text(torch.from_numpy(ids)).numpy()
    opts = ort.SessionOptions()
    sessions = {
        name: ort.InferenceSession(str(out / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        for name in ("image", "text")
    }
    parity: dict[str, Any] = {"tolerance": {"max_rel": MAX_REL_ERR, "min_cosine": MIN_COSINE}}
    for name, feed, ref in (("image", {"pixels": pixels}, ref_img), ("text", {"input_ids": ids}, ref_txt)):
        key = next(iter(feed))
        full = sessions[name].run(None, feed)[0]
        single = np.concatenate([sessions[name].run(None, {key: feed[key][i : i + 1]})[0] for i in range(len(ref))])
        parity[name] = {f"batch_{max_batch}": _figures(full, ref), "batch_1": _figures(single, ref)}
    np.savez(out / "reference.npz", pixels=pixels, image_embeds=ref_img, input_ids=ids, text_embeds=ref_txt)
    copied = []
    if tok_dir:
        for fname in TOKENIZER_FILES:
            if (Path(tok_dir) / fname).is_file():
                shutil.copy2(Path(tok_dir) / fname, out / fname)
                copied.append(fname)
    files = [Path(f) for f in getattr(model, "checkpoint_files", []) or []]
    prep = getattr(model, "preprocess_config", None)
    manifest = {
        "kind": "lit-onnx",
        "config": cfg.to_dict(),
        "preprocess": prep.to_dict() if prep is not None else None,
        "logit_scale": float(model.logit_scale.detach()),
        "opset": opset,
        "image": {
            "file": "image.onnx",
            "sha256": _sha256(out / "image.onnx"),
            "input": "pixels",
            "output": "image_embeds",
        },
        "text": {
            "file": "text.onnx",
            "sha256": _sha256(out / "text.onnx"),
            "input": "input_ids",
            "output": "text_embeds",
            "context_length": cfg.text.context_length,
        },
        "tokenizer": copied,
        "source": {
            "checkpoint": source or getattr(model, "source", None),
            "files": [{"path": str(f), "sha256": _sha256(f)} for f in files if f.is_file()],
        },
        "reference": "reference.npz",
        "parity": parity,
    }
    (out / LIT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    bad = [
        f"{name} {b}: {fig}"
        for name in ("image", "text")
        for b, fig in parity[name].items()
        if fig["max_rel"] > MAX_REL_ERR or fig["min_cosine"] < MIN_COSINE
    ]
    if bad:
        raise LitParityError("LiT ONNX parity out of tolerance: " + "; ".join(bad))
    logger.info("LiT ONNX export in %s: image %s, text %s", out, parity["image"], parity["text"])
    return manifest


def read_lit_manifest(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / LIT_MANIFEST).read_text())
