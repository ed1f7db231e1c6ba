"""The attentive probe end to end on a toy problem: learning, the head file, caching, list files."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import aimcore
from training.probe_lib.data import ImageDataset, load_probe_data
from training.probe_lib.features import load_trunk
from training.probe_lib.runner import RunOptions, run_probe
from training.probe_lib.train import ProbeConfig, lr_at

RELEASED_HEAD_KEYS = {
    "head.cls_token",
    "head.k.weight",
    "head.v.weight",
    "head.linear.weight",
    "head.bn.running_mean",
    "head.bn.running_var",
    "head.bn.num_batches_tracked",
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probed(toy_folder: Path, trunk_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("probe_out")
    data = load_probe_data(toy_folder, val_fraction=0.25)
    metrics = run_probe(
        load_trunk(trunk_file), data, ProbeConfig(epochs=8, batch_size=16), out_dir=out, trunk_source=str(trunk_file)
    )
    return metrics, out


def test_probe_learns_a_separable_toy_problem(probed: tuple[dict, Path]) -> None:
    metrics, _ = probed
    assert metrics["num_classes"] == 2 and metrics["num_val"] == 20 and metrics["num_train"] == 60
    assert metrics["chance_top1"] == 0.5
    assert metrics["top1"] >= 0.85, metrics  # chance is 0.5
    assert metrics["top5"] == 1.0  # k capped at the class count
    assert metrics["knn_top1"] >= 0.85
    assert set(metrics["per_class_top1"]) == {"blobs", "stripes"}
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]


def test_head_file_has_the_released_layout_and_labels(probed: tuple[dict, Path]) -> None:
    metrics, out = probed
    with safe_open(str(out / "head.safetensors"), framework="pt") as f:
        assert set(f.keys()) == RELEASED_HEAD_KEYS
        assert f.get_tensor("head.cls_token").shape == (1, 1, 64)
        assert f.get_tensor("head.linear.weight").shape == (2, 64)
        assert f.get_tensor("head.bn.num_batches_tracked").dtype == torch.int64
        assert int(f.get_tensor("head.bn.num_batches_tracked")) > 0  # running statistics were learned
    assert json.loads((out / "labels.json").read_text()) == {"0": "blobs", "1": "stripes"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["top1"] == metrics["top1"] and saved["head_round_trip"]["ok"] is True


def test_head_loads_through_aimcore_and_classifies_like_the_probe(
    probed: tuple[dict, Path], trunk_file: Path, toy_folder: Path
) -> None:
    metrics, out = probed
    model = aimcore.load_model(trunk_file, head=out / "head.safetensors")
    assert model.head is not None and model.config.num_classes == 2
    assert model.labels == ["blobs", "stripes"]
    assert model.config.probe_layers == (1, 2)
    data = load_probe_data(toy_folder, val_fraction=0.25)
    ds = ImageDataset(data.val, model.preprocess_config)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        pred = model(images).argmax(-1)
    accuracy = float((pred == torch.as_tensor(data.val.labels)).float().mean())
    assert accuracy == pytest.approx(metrics["top1"])
    assert metrics["head_round_trip"]["max_abs_diff"] <= metrics["head_round_trip"]["tolerance"]


def test_feature_cache_equals_the_uncached_path(toy_folder: Path, trunk_file: Path) -> None:
    data = load_probe_data(toy_folder, val_fraction=0.25, train_per_class=12)
    opts = RunOptions(knn=False)
    cached = run_probe(load_trunk(trunk_file), data, ProbeConfig(epochs=2, batch_size=8, cache=True), opts)
    uncached = run_probe(load_trunk(trunk_file), data, ProbeConfig(epochs=2, batch_size=8, cache=False), opts)
    for a, b in zip(cached["history"], uncached["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert cached["top1"] == uncached["top1"]


def test_augmented_probe_runs(toy_folder: Path, trunk_file: Path) -> None:
    data = load_probe_data(toy_folder, val_fraction=0.25, train_per_class=8)
    m = run_probe(
        load_trunk(trunk_file), data, ProbeConfig(epochs=1, batch_size=8, augment=True), RunOptions(knn=False)
    )
    assert 0.0 <= m["top1"] <= 1.0 and "knn_top1" not in m


def test_list_file_input(toy_folder: Path, tmp_path: Path) -> None:
    lines = ["# path<TAB>label", ""]
    for kind in ("blobs", "stripes"):
        lines += [f"{p.relative_to(toy_folder)}\t{kind}" for p in sorted((toy_folder / kind).glob("*.png"))[:10]]
    listing = toy_folder / "list.tsv"
    listing.write_text("\n".join(lines) + "\n")
    data = load_probe_data(listing, val_fraction=0.2)
    assert data.class_names == ["blobs", "stripes"]
    assert (len(data.train), len(data.val)) == (16, 4)
    assert all(p.is_file() for p in data.train.paths)

    numeric = tmp_path / "numeric.tsv"
    numeric.write_text("".join(f"{p}\t{i % 3}\n" for i, p in enumerate(sorted(toy_folder.rglob("*.png"))[:12])))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "zero", "1": "one", "2": "two"}))
    data = load_probe_data(numeric, labels_file=labels, val_fraction=0.25)
    assert data.class_names == ["zero", "one", "two"]
    assert sorted(set(data.val.labels.tolist())) == [0, 1, 2]

    bad = tmp_path / "bad.tsv"
    bad.write_text("only-a-path.png\n")
    with pytest.raises(ValueError, match="path<TAB>label"):
        load_probe_data(bad)


def test_split_folders_are_used_as_given(toy_folder: Path, tmp_path: Path) -> None:
    for split, names in (("train", slice(0, 30)), ("val", slice(30, 40))):
        for kind in ("blobs", "stripes"):
            (tmp_path / split / kind).mkdir(parents=True)
            for p in sorted((toy_folder / kind).glob("*.png"))[names]:
                (tmp_path / split / kind / p.name).symlink_to(p)
    data = load_probe_data(tmp_path)
    assert (len(data.train), len(data.val)) == (60, 20)
    assert "split folders" in data.description


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = ProbeConfig(lr=1.0, warmup_fraction=0.1, min_lr=0.0)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_probe_script_runs_as_a_plain_script(toy_folder: Path, trunk_file: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "training" / "probe.py"),
        "--checkpoint",
        str(trunk_file),
        "--data",
        str(toy_folder),
        "--out",
        str(tmp_path / "out"),
        "--epochs",
        "1",
        "--threads",
        "2",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "head.safetensors").is_file()
    assert "round trip" in done.stderr


def test_released_style_backbone_pth_takes_our_head(toy_folder: Path, trunk_file: Path, tmp_path: Path) -> None:
    """A plain ml-aim-layout backbone .pth (no config in it), probed with last-layer features: our head file goes
    back onto it through aimcore.load_model with the probe layers it was trained on."""
    backbone = tmp_path / "aim_debug_attnprobe_backbone.pth"
    torch.save(dict(aimcore.load_model(trunk_file).state_dict()), backbone)
    trunk = load_trunk(backbone, config="aim-debug", probe_layers="last")
    assert trunk.config.probe_layers == (2, 3)
    data = load_probe_data(toy_folder, val_fraction=0.25, train_per_class=10)
    m = run_probe(trunk, data, ProbeConfig(epochs=2, batch_size=8), out_dir=tmp_path / "o", trunk_source=str(backbone))
    assert m["head_round_trip"]["ok"] is True
    model = aimcore.load_model(backbone, head=tmp_path / "o" / "head.safetensors")
    assert model.config.probe_layers == (2, 3) and model.labels == ["blobs", "stripes"]
