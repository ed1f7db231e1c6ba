"""Checkpoint formats: our safetensors round trip, released .pth pairs, strictness, hub errors offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import aimcore
from aimcore import CheckpointError, ModelUnavailableError, build_model, get_flavor, load_model
from aimcore.checkpoint import clean_state_dict, infer_config


def split_released(model: aimcore.AimModel, folder: Path, layers: str = "best") -> tuple[Path, Path]:
    """Write the model as ml-aim releases it: a backbone .pth and a head .pth (plain tensor dicts)."""
    state = model.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    backbone = folder / "aim_debug_attnprobe_backbone.pth"
    head = folder / f"aim_debug_attnprobe_head_{layers}_layers.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, backbone)
    torch.save({k: v for k, v in state.items() if k.startswith("head.")}, head)
    return backbone, head


def outputs(model: aimcore.AimModel, x: torch.Tensor) -> aimcore.AimFeatures:
    with torch.no_grad():
        return model.features(x)


def assert_same_outputs(a: aimcore.AimModel, b: aimcore.AimModel, x: torch.Tensor) -> None:
    fa, fb = outputs(a, x), outputs(b, x)
    for name in ("tokens", "probe_average", "pooled", "logits"):
        torch.testing.assert_close(getattr(fa, name), getattr(fb, name), rtol=0, atol=0)


def test_safetensors_round_trip(debug_model, debug_checkpoint, debug_images) -> None:
    loaded = load_model(debug_checkpoint)
    assert loaded.config == debug_model.config
    assert not loaded.training
    assert loaded.labels == [f"class_{i}" for i in range(10)]
    assert loaded.provenance == {"test": True}
    assert loaded.preprocess_config.img_size == 32 and loaded.preprocess_config.resize_size == 37
    assert all(p.requires_grad for p in loaded.parameters())
    assert_same_outputs(debug_model, loaded, debug_images)
    for k, v in debug_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_save_is_atomic_and_leaves_no_temp_files(debug_model, tmp_path) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old contents")
    aimcore.save_checkpoint(debug_model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    load_model(target)


def test_released_pair_merged_and_folder_load_the_same(debug_model, debug_images, tmp_path) -> None:
    backbone, head = split_released(debug_model, tmp_path / "released")
    merged = tmp_path / "merged.pth"
    torch.save(debug_model.state_dict(), merged)
    cfg = get_flavor("aim-debug")
    from_pair = load_model(backbone, cfg, head=head)
    from_merged = load_model(merged, cfg)
    from_folder = load_model(tmp_path / "released", cfg)
    for m in (from_pair, from_merged, from_folder):
        assert m.config.probe_layers == (1, 2)
        assert_same_outputs(debug_model, m, debug_images)


def test_infers_config_from_released_shapes(debug_model, tmp_path, debug_images) -> None:
    merged = tmp_path / "merged.pth"
    torch.save(debug_model.state_dict(), merged)
    model = load_model(merged)  # aim-debug is recognised from (width, depth, patch)
    assert model.config == debug_model.config
    assert_same_outputs(debug_model, model, debug_images)


def test_head_file_name_selects_probe_layers(debug_model, tmp_path) -> None:
    backbone, head = split_released(debug_model, tmp_path / "r", layers="last")
    model = load_model(backbone, get_flavor("aim-debug"), head=head)
    assert model.config.probe_layers == (2, 3)
    model = load_model(backbone, get_flavor("aim-debug"), head=head, probe_layers="best")
    assert model.config.probe_layers == (1, 2)


def test_backbone_only_loads_without_head_and_says_so(debug_model, tmp_path, caplog, debug_images) -> None:
    backbone, _ = split_released(debug_model, tmp_path / "r")
    with caplog.at_level(logging.WARNING, logger="aimcore"):
        model = load_model(backbone, get_flavor("aim-debug"))
    assert model.head is None
    assert "head keys missing" in caplog.text and "head.linear.weight" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(
            model.features(debug_images).tokens, debug_model.features(debug_images).tokens, rtol=0, atol=0
        )


def test_optional_head_linear_bias(debug_model, tmp_path, debug_images) -> None:
    state = dict(debug_model.state_dict())
    bias = torch.randn(10)
    state["head.linear.bias"] = bias
    path = tmp_path / "with_bias.pth"
    torch.save(state, path)
    model = load_model(path)
    assert model.config.head_linear_bias
    with torch.no_grad():
        torch.testing.assert_close(model(debug_images), debug_model(debug_images) + bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("trunk.blocks.2.mlp.fc1.weight"), "missing keys (1): trunk.blocks.2.mlp.fc1.weight"),
        (
            lambda s: s.__setitem__("trunk.blocks.0.attn.mask", torch.zeros(1)),
            "unexpected keys (1): trunk.blocks.0.attn.mask",
        ),
        (
            lambda s: s.__setitem__("trunk.blocks.1.attn.qkv_renamed.weight", s.pop("trunk.blocks.1.attn.qkv.weight")),
            "trunk.blocks.1.attn.qkv_renamed.weight",
        ),
        (lambda s: s.__setitem__("head.k.weight", torch.zeros(64, 32)), "shape mismatch for head.k.weight"),
    ],
    ids=["missing", "extra", "renamed", "shape"],
)
def test_strict_loading_names_the_bad_key(debug_model, tmp_path, mutate, message) -> None:
    state = dict(debug_model.state_dict())
    mutate(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, get_flavor("aim-debug"))
    assert message in str(err.value)


def test_renamed_key_reports_both_sides(debug_model, tmp_path) -> None:
    state = dict(debug_model.state_dict())
    state["trunk.blocks.1.attn.qkv_renamed.weight"] = state.pop("trunk.blocks.1.attn.qkv.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): trunk\.blocks\.1\.attn\.qkv\.weight"):
        load_model(path, get_flavor("aim-debug"))


def test_pickles_are_loaded_weights_only(tmp_path) -> None:
    class Evil:
        def __reduce__(self):  # would run code on unpickling
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"preprocessor.patchifier.proj.weight": Evil()}, path)
    with pytest.raises(CheckpointError, match="tensor-only"):
        load_model(path)


def test_clean_state_dict_strips_wrappers(debug_model) -> None:
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in debug_model.state_dict().items()}}
    assert list(clean_state_dict(wrapped)) == list(debug_model.state_dict())


def test_hf_mixin_folder_with_config_json(debug_model, tmp_path, debug_images) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in debug_model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 64,
                "num_blocks": 4,
                "num_heads": 2,
                "probe_layers": [1, 2],
                "num_classes": 10,
            }
        )
    )
    model = load_model(folder)
    assert (model.config.num_heads, model.config.probe_layers) == (2, (1, 2))
    assert_same_outputs(debug_model, model, debug_images)


def test_infer_config_for_unknown_width_assumes_head_dim_128() -> None:
    model = build_model(get_flavor("aim-debug").replace(embed_dim=256, num_heads=2), device="meta")
    cfg = infer_config(model.state_dict())
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.num_classes) == (256, 2, 4, 10)


def test_hub_id_offline_names_the_id(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ModelUnavailableError, match="apple/AIM-600M"):
        load_model("apple/AIM-600M")
    with pytest.raises(ModelUnavailableError, match=r"aim_600m_2bimgs_attnprobe_backbone\.pth"):
        load_model("aim-600M")


def test_unknown_source_and_weightless_flavor_are_clear(tmp_path) -> None:
    with pytest.raises(ModelUnavailableError, match="not an existing file or folder"):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelUnavailableError, match="flavor with no weights"):
        load_model("aim-debug")
    with pytest.raises(ModelUnavailableError, match="no weight files"):
        load_model(tmp_path)


def test_manifest_round_trip_and_validation(tmp_path, debug_model) -> None:
    from aimcore.manifest import ExportManifest, read_manifest, write_manifest

    manifest = ExportManifest(
        artifact="model.onnx",
        kind="onnx",
        precision="fp32",
        artifact_sha256="0" * 64,
        config=debug_model.config.to_dict(),
        preprocess=aimcore.PreprocessConfig.for_size(32).to_dict(),
        source={"checkpoint": "x.safetensors", "sha256": "1" * 64},
        outputs={"embedding": ["B", 64], "pooled": ["B", 64], "logits": ["B", 10]},
        labels=[str(i) for i in range(10)],
    )
    write_manifest(manifest, tmp_path)
    back = read_manifest(tmp_path)
    assert back == manifest and back.model_config == debug_model.config
    with pytest.raises(ValueError, match="precision"):
        ExportManifest(**{**manifest.to_dict(), "precision": "fp8"})
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nowhere")


def test_config_may_be_a_flavor_name_or_a_dict(debug_model, tmp_path, debug_images) -> None:
    merged = tmp_path / "merged.pth"
    torch.save(debug_model.state_dict(), merged)
    by_name = load_model(merged, "aim-debug")
    as_dict = {
        "embed_dim": 64,
        "num_blocks": 4,
        "num_heads": 2,
        "patch_size": 8,
        "img_size": 32,
        "num_classes": 10,
        "probe_layers": [1, 2],
    }
    by_dict = load_model(merged, as_dict)
    assert by_name.config == by_dict.config.replace(name="aim-debug", decoder_dim=64, decoder_depth=2)
    assert_same_outputs(debug_model, by_dict, debug_images)
    assert aimcore.AimConfig.from_dict({**as_dict, "probe_layers": 2}).probe_layers == (2, 3)


def test_atomic_writes_get_normal_permissions(tmp_path) -> None:
    from aimcore.fsio import atomic_write_text

    target = atomic_write_text(tmp_path / "a.json", "{}")
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    target.chmod(0o640)
    atomic_write_text(target, "{}")
    assert target.stat().st_mode & 0o777 == 0o640


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_same_weights_saved_twice_are_the_same_bytes(debug_model, tmp_path) -> None:
    """safetensors keeps `__metadata__` in a hash map (random order per process and call): our saves sort the
    header so the file hash, and every cache or pipeline step keyed on it, is stable."""
    import hashlib

    from aimcore.fsio import save_safetensors

    digests = set()
    for i in range(6):
        aimcore.save_checkpoint(debug_model, tmp_path / f"m{i}.safetensors", labels=[f"c{j}" for j in range(10)])
        digests.add(hashlib.sha256((tmp_path / f"m{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    meta = {f"key{k}": "v" * k for k in range(40)}
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    files = [save_safetensors(tensors, tmp_path / f"t{i}.safetensors", metadata=meta).read_bytes() for i in range(6)]
    assert len(set(files)) == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "t0.safetensors"))["a"], tensors["a"])
