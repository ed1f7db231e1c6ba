"""AimModel -> ONNX (fp32, fp16 or int8) with a dynamic batch axis, checked against PyTorch, plus its manifest.

Exporter choice: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. The torch.export-based exporter
(the default since torch 2.9) needs the `onnxscript` package, which is not one of our dependencies, while the
TorchScript path is built into torch, traces `AimModel.features` as it runs (so early exit is simply the blocks
that ran) and gives a plain graph of MatMul / LayerNormalization / Softmax / Erf that ONNX Runtime fuses and
TensorRT parses. Its one gap, BatchNorm after a reshape with a dynamic batch, is bridged by FrozenBatchNorm
(graph.py). Parity against the unmodified PyTorch model proves the rewrite.

Variants:
- fp16: the model is traced with float16 weights and activations (input cast in, outputs cast out, so the
  interface stays float32). Meant for GPU providers; ONNX Runtime's CPU provider runs it by casting nodes that lack
  float16 kernels back to float32, which validates the weights' rounding but is no speed-up on a CPU.
- int8: dynamic quantisation (onnxruntime.quantization.quantize_dynamic) of the MatMuls whose second input is a
  weight: int8 weights, per-batch uint8 activations. The attention products (activation x activation) and the
  patch convolution stay float32: they hold few FLOPs and most of the quantisation error.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from aimcore import AimModel, load_model, sha256_file
from aimcore.manifest import INPUT_NAME, ExportManifest, write_manifest
from export.artefact import clear_manifest, make_readable, write_reference
from export.graph import ContractGraph, blocks_run, frozen_head_norm, output_shapes, resolve_outputs, with_dtype
from export.parity import default_image_paths, load_images
from export.provenance import describe_source, model_preprocess
from export.validate import validate_onnx_file

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_LIMIT", "ONNX_NAME", "export_onnx", "quantize_int8"]

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
# 17: first opset with LayerNormalization; read by onnxruntime >= 1.14 and TensorRT >= 8.6.
DEFAULT_OPSET = 17
# protobuf cannot serialise a message over 2 GiB; keep 64 MiB for the graph itself.
EXTERNAL_DATA_LIMIT = 2**31 - 2**26
PRECISIONS = ("fp32", "fp16", "int8")


def _resolve_model(source_or_model: AimModel | str | os.PathLike[str]) -> tuple[AimModel, str | None]:
    if isinstance(source_or_model, AimModel):
        # load_model() records what it loaded (`source`, `checkpoint_files`), so a model loaded once and exported
        # several times keeps its provenance; a model built in memory is identified by its weights' digest.
        return source_or_model.eval(), getattr(source_or_model, "source", None)
    return load_model(source_or_model), str(source_or_model)


def _weight_bytes(model: AimModel, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize


def _trace(model: AimModel, path: Path, outputs: tuple[str, ...], opset: int, dtype: torch.dtype | None) -> None:
    """Trace the contract graph to `path` (the exporter writes external data beside it for models over 2 GB)."""
    traced = model if dtype is None else with_dtype(model, dtype)
    cfg = model.config
    # Batch 2, not 1: a batch of 1 invites the tracer to fold the batch size into constants.
    example = torch.randn(2, cfg.num_channels, cfg.img_size, cfg.img_size)
    dynamic = {name: {0: "B"} for name in (INPUT_NAME, *outputs)}
    if cfg.native:
        # AIMv2 native: any H x W (multiples of the patch); a non-square example keeps H and W from being unified.
        example = torch.randn(2, cfg.num_channels, cfg.img_size, cfg.img_size + cfg.patch_size)
        dynamic[INPUT_NAME] = {0: "B", 2: "H", 3: "W"}
    with frozen_head_norm(traced), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks in PatchEmbed are trace-time only
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter warns it is the old path
        torch.onnx.export(
            ContractGraph(traced, outputs, dtype),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _finalise(proto: onnx.ModelProto, model: AimModel, outputs: tuple[str, ...], path: Path, external: bool) -> None:
    """Name every output's shape (B, width), stamp metadata, save (one external data file when large), check."""
    shapes = output_shapes(model.config, outputs)
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[value.name]:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    proto.producer_name = "aim-stack export"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"aim.model": model.config.name, "aim.outputs": ",".join(outputs)})
    path.unlink(missing_ok=True)
    (path.parent / DATA_NAME).unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_NAME)
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB


def _weight_matmuls(proto: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose second input is a constant weight (the linear layers), by node name."""
    constants = {init.name for init in proto.graph.initializer}
    constants |= {out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def quantize_int8(fp32_path: Path, out_path: Path, *, external: bool = False) -> dict[str, Any]:
    """Dynamic int8 quantisation of the weight MatMuls; returns the manifest's description of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = _weight_matmuls(onnx.load(str(fp32_path), load_external_data=False))
    quant_logger = logging.getLogger("root")  # the quantiser logs its pre-processing advice on the root logger
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            nodes_to_quantize=nodes,
            weight_type=QuantType.QInt8,
            per_channel=False,
            use_external_data_format=external,
        )
    finally:
        quant_logger.setLevel(level)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "int8 per tensor",
        "activation_type": "uint8, dynamic per batch",
        "quantized_nodes": len(nodes),
        "kept_float32": "attention products, patch convolution, norms, softmax",
    }


def export_onnx(
    source_or_model: AimModel | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_batch: int = 32,
    precision: str = "fp32",
    opset: int | None = None,
    outputs: Iterable[str] | str | None = None,
    check_parity: bool = True,
    images: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> ExportManifest:
    """Export an AIM model to `<out_dir>/model.onnx` with `manifest.json` and `reference.npz` beside it.

    source_or_model: anything `aimcore.load_model` takes (file, folder, flavor, hub id) or an AimModel.
    precision: "fp32", "fp16" or "int8". outputs: a subset of embedding/pooled/logits (default: all the model has);
    without "embedding" the graph stops after the last probe layer. max_batch: the largest batch checked (and the
    top of the batch profile recorded for TensorRT). images: a folder of real images for parity (default: the
    repository's test images). external_data: force (True) or forbid (False) the external-data format; by default
    it is used when the weights exceed 2 GB. check_parity=False skips the check and records that it was skipped.
    Raises ParityError (no manifest is written) when the artefact disagrees with PyTorch beyond tolerance.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"ONNX precision must be one of {PRECISIONS}, got {precision!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opset = opset or DEFAULT_OPSET
    model, requested = _resolve_model(source_or_model)
    outs = resolve_outputs(model.config, outputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_manifest(out)
    dtype = torch.float16 if precision == "fp16" else None
    weight_bytes = _weight_bytes(model, dtype or torch.float32)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_LIMIT
    elif not external_data and weight_bytes > EXTERNAL_DATA_LIMIT and precision != "int8":
        raise ValueError(
            f"{weight_bytes / 2**30:.1f} GiB of weights cannot fit one protobuf (2 GiB): allow external data"
        )
    target = out / ONNX_NAME
    runtime: dict[str, Any] = {
        "exporter": f"torch.onnx TorchScript (dynamo=False), torch {torch.__version__}",
        "opset": opset,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "batch_profile": {"min": 1, "opt": max(1, max_batch // 2), "max": max_batch},
        "blocks_run": blocks_run(model.config, outs),
        "external_data": None,
    }
    logger.info("exporting %s (%s, outputs %s) to %s", model.config.name, precision, list(outs), target)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        traced = Path(tmp) / ONNX_NAME
        _trace(model, traced, outs, opset, dtype)
        proto = onnx.load(str(traced))  # pulls in external tensors the exporter may have written
        if precision == "int8":
            fp32 = Path(tmp) / "fp32" / ONNX_NAME
            fp32.parent.mkdir()
            _finalise(proto, model, outs, fp32, external_data)
            del proto
            int8_external = weight_bytes // 4 > EXTERNAL_DATA_LIMIT
            runtime["quantization"] = quantize_int8(fp32, target, external=int8_external)
            # The quantiser writes its own graph; name the shapes and check it like the others.
            _finalise(onnx.load(str(target)), model, outs, target, int8_external)
            external_data = int8_external
        else:
            _finalise(proto, model, outs, target, external_data)
            del proto
    if external_data:
        runtime["external_data"] = {"file": DATA_NAME, "sha256": sha256_file(out / DATA_NAME)}
    else:
        (out / DATA_NAME).unlink(missing_ok=True)

    image_paths = default_image_paths(images)
    pixels = load_images(image_paths, model_preprocess(model))
    if check_parity:
        parity, parity_runtime = validate_onnx_file(target, model, outs, precision, max_batch=max_batch, images=pixels)
        runtime |= parity_runtime
    else:
        parity = {"skipped": "check_parity=False"}
        logger.warning("parity check skipped for %s", target)
    reference = write_reference(
        out, model, outs, precision, pixels, seed=int(np.random.default_rng().integers(1 << 31))
    )
    manifest = ExportManifest(
        artifact=ONNX_NAME,
        kind="onnx",
        precision=precision,
        artifact_sha256=sha256_file(target),
        config=model.config.to_dict(),
        preprocess=model_preprocess(model).to_dict(),
        source=describe_source(model, requested),
        outputs=output_shapes(model.config, outs),
        parity=parity,
        runtime=runtime,
        labels=getattr(model, "labels", None) if model.config.has_head else None,
        reference=reference,
    )
    write_manifest(manifest, out)
    make_readable(out)
    logger.info("wrote %s (%s, sha256 %s)", target, precision, manifest.artifact_sha256[:12])
    return manifest
