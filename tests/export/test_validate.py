"""`python -m export validate` and the onnx CLI: passes on good artefacts, fails loudly on corrupted weights or a
changed checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from aimcore import load_model, save_checkpoint
from aimcore.manifest import read_manifest
from export.__main__ import main
from export.onnx import export_onnx
from tests.export.conftest import REFERENCE_WEIGHTS


def run_cli(capsys, *argv: str) -> tuple[int, list[dict]]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else []


def test_validate_cli_passes_on_every_variant(exported, capsys) -> None:
    code, results = run_cli(capsys, "validate", str(exported.dir))
    assert code == 0
    assert sorted(r["precision"] for r in results) == ["fp16", "fp32", "int8"]
    assert all(r["passed"] and not r["problems"] for r in results)


def test_corrupted_initializer_fails_validation(exported, tmp_path, capsys) -> None:
    copy = tmp_path / "art"
    shutil.copytree(exported.dir, copy, ignore=shutil.ignore_patterns("fp16", "int8"))
    proto = onnx.load(str(copy / "model.onnx"))
    # Scale one fc1 weight matrix by 1.05: a subtle corruption that still loads and runs.
    target = next(
        init for init in proto.graph.initializer if len(init.dims) == 2 and init.dims[0] * init.dims[1] == 64 * 256
    )
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.05), target.name))
    onnx.save(proto, str(copy / "model.onnx"))
    code, [result] = run_cli(capsys, "validate", str(copy))
    assert code == 1 and not result["passed"]
    problems = " ".join(result["problems"])
    assert "model.onnx sha256 differs" in problems
    assert "max_rel_err" in problems  # the parity check itself caught it, not only the checksum


def test_changed_checkpoint_is_refused(reference_model, debug_model, tmp_path) -> None:
    ckpt = tmp_path / "weights.safetensors"
    save_checkpoint(reference_model, ckpt)
    export_onnx(load_model(ckpt), tmp_path / "art", max_batch=2, check_parity=False)
    save_checkpoint(debug_model, ckpt)  # same architecture, other weights
    from export.validate import validate_directory

    [result] = validate_directory(tmp_path / "art")
    assert not result.passed and "parity against different weights means nothing" in result.problems[0]


def test_validate_empty_folder_is_a_usage_error(tmp_path, capsys) -> None:
    code, _ = run_cli(capsys, "validate", str(tmp_path))
    assert code == 2


def test_onnx_cli_writes_variants_and_a_random_source(tmp_path, capsys) -> None:
    code, results = run_cli(
        capsys,
        "onnx",
        "--checkpoint",
        str(REFERENCE_WEIGHTS),
        "--out",
        str(tmp_path / "a"),
        "--int8",
        "--max-batch",
        "2",
    )
    assert code == 0 and [r["precision"] for r in results] == ["fp32", "int8"]
    assert read_manifest(tmp_path / "a" / "int8").source["checkpoint"] == str(REFERENCE_WEIGHTS)
    code, results = run_cli(
        capsys, "onnx", "--checkpoint", "aim-debug", "--random-weights", "--out", str(tmp_path / "r"),
        "--outputs", "embedding", "--max-batch", "2",
    )  # fmt: skip
    assert code == 0 and results[0]["outputs"] == {"embedding": ["B", 64]}
    manifest = read_manifest(tmp_path / "r")
    assert Path(manifest.source["checkpoint"]) == tmp_path / "r" / "source.safetensors"
    assert run_cli(capsys, "validate", str(tmp_path / "r"))[0] == 0
