"""AIMv2 in the one model definition, with transformers' own `Aimv2VisionModel` as the oracle (random weights from a
small config, no download): every layout loads with no config and gives transformers' `last_hidden_state`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import aimcore
from aimcore import CheckpointError, build_model, get_flavor
from aimcore.layouts import convert_from_ours, convert_to_ours
from aimcore.preprocess import CLIP_MEAN, CLIP_STD

transformers = pytest.importorskip("transformers")

# Head dim 128 as released, so even a weights-only folder (timm) infers the head count right.
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
TOL = dict(rtol=0, atol=2e-5)  # the bound; float32 noise here is ~1e-6 on O(1) RMS-normed tokens


def oracle(native: bool, image_size: int = 56, use_head: bool = False) -> torch.nn.Module:
    cfg = transformers.Aimv2VisionConfig(**SMALL, image_size=image_size, is_native=native, use_head=use_head)
    torch.manual_seed(1 if native else 0)
    model = transformers.Aimv2VisionModel(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them non-trivial so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def reference_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def apple_config_json(model: torch.nn.Module) -> dict:
    c = model.config
    return {
        "model_type": "aimv2",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "rms_norm_eps": c.rms_norm_eps,
    }


def write_folder(folder: Path, state: dict[str, torch.Tensor], config: dict | None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def layout_folders(tmp_path: Path, model: torch.nn.Module) -> dict[str, Path]:
    """The same weights as transformers saves them, with Apple's keys, and with timm's keys (no config.json)."""
    tf_dir = tmp_path / "transformers"
    model.save_pretrained(tf_dir)
    ours, layout = convert_to_ours(model.state_dict())
    assert layout == "transformers-aimv2-vision"
    return {
        "transformers": tf_dir,
        "apple": write_folder(tmp_path / "apple", ours, apple_config_json(model)),
        "timm": write_folder(tmp_path / "timm", convert_from_ours(ours, "timm-aimv2"), None),
    }


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["transformers", "apple", "timm"])
def test_fixed_resolution_folders_load_with_no_config_and_match_transformers(tmp_path: Path, layout: str) -> None:
    ref = oracle(native=False)
    folder = layout_folders(tmp_path, ref)[layout]
    model = aimcore.load_model(folder)
    assert model.config.family == "aimv2" and not model.config.native and model.head is None
    assert (model.config.img_size, model.config.mlp_hidden_dim, model.config.num_heads) == (56, 688, 2)
    x = images(3, 3, 56, 56)
    with torch.no_grad():
        feats = model.features(x, outputs=("tokens", "blocks"))
    torch.testing.assert_close(feats.tokens, reference_tokens(ref, x), **TOL)
    assert len(feats.blocks) == 2 and feats.blocks[-1].shape == (3, 16, 256)


@pytest.mark.parametrize("layout", ["transformers", "apple", "timm"])
@pytest.mark.parametrize("hw", [(56, 56), (42, 84), (98, 28)])
def test_native_folders_match_transformers_on_square_and_non_square_inputs(
    tmp_path: Path, layout: str, hw: tuple[int, int]
) -> None:
    ref = oracle(native=True)
    folder = layout_folders(tmp_path, ref)[layout]
    model = aimcore.load_model(folder)
    assert model.config.native and "preprocessor.pos_embed" not in model.state_dict()
    x = images(2, 3, *hw, seed=hw[0])
    with torch.no_grad():
        tokens = model.features(x, outputs=("tokens",)).tokens
    assert tokens.shape == (2, (hw[0] // 14) * (hw[1] // 14), 256)
    torch.testing.assert_close(tokens, reference_tokens(ref, x), **TOL)


def test_apple_transformers_ours_round_trip_is_identical() -> None:
    ref = oracle(native=False)
    tf_state = ref.state_dict()
    ours, _ = convert_to_ours(tf_state)
    back = convert_from_ours(ours, "transformers-aimv2-vision")
    assert set(back) == set(tf_state)
    for key, value in tf_state.items():
        assert torch.equal(back[key], value), key
    via_timm, layout = convert_to_ours(convert_from_ours(ours, "timm-aimv2"))
    assert layout == "timm-aimv2" and set(via_timm) == set(ours)
    assert all(torch.equal(via_timm[k], ours[k]) for k in ours)
    again, layout = convert_to_ours(ours)  # Apple's keys are ours: the identity
    assert layout == "aimcore" and all(again[k] is ours[k] for k in ours)


def test_unmappable_layouts_are_refused_with_the_keys(tmp_path: Path) -> None:
    headed = oracle(native=False, use_head=True)  # transformers' optional pooling head: not a vision-encoder key
    headed.save_pretrained(tmp_path / "headed")
    with pytest.raises(CheckpointError, match=r"head\.cls_token.*head\.k_proj\.weight"):
        aimcore.load_model(tmp_path / "headed")
    odd = write_folder(tmp_path / "odd", {"encoder.weird.weight": torch.zeros(2), "foo.bar": torch.zeros(1)}, None)
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout.*encoder\.weird\.weight"):
        aimcore.load_model(odd)


def test_fixed_resolution_refuses_a_wrong_size_and_native_caps_the_patch_count() -> None:
    model = build_model(get_flavor("aimv2-debug")).eval()
    with pytest.raises(ValueError, match=r"fixed-resolution model: it takes 28x28 inputs .* got 42x28"):
        model.features(torch.zeros(1, 3, 42, 28))
    native = build_model(get_flavor("aimv2-large-patch14-native"), device="meta")
    with pytest.raises(ValueError, match="more than the native maximum 4096"):
        native.features(torch.zeros(1, 3, 14 * 65, 14 * 64, device="meta"))


V2_RELEASED = [n for n, c in aimcore.FLAVORS.items() if c.is_v2 and n != "aimv2-debug"]
# AIMV2_FACTS §1, in billions as published (one decimal, truncated: huge is 0.68 B and published as 0.6 B).
PUBLISHED_B = {"large": 0.3, "huge": 0.6, "1B": 1.2, "3B": 2.7}


def test_every_released_v2_flavor_is_listed() -> None:
    expected = {f"aimv2-{s}-patch14-{r}" for s in PUBLISHED_B for r in (224, 336, 448)}
    expected |= {"aimv2-large-patch14-224-distilled", "aimv2-large-patch14-336-distilled"}
    expected |= {"aimv2-large-patch14-native"}
    assert set(V2_RELEASED) == expected


@pytest.mark.parametrize("name", V2_RELEASED)
def test_released_v2_flavors_have_the_released_keys_shapes_and_sizes(name: str) -> None:
    cfg = get_flavor(name)
    ours = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    # The released key set is transformers' layout mapped to ours: build transformers' model for the same shape.
    tf_cfg = transformers.Aimv2VisionConfig(
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_hidden_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        is_native=cfg.native,
        use_head=False,
    )
    with torch.device("meta"):
        tf_model = transformers.Aimv2VisionModel(tf_cfg)
    released, _ = convert_to_ours(tf_model.state_dict())
    assert ours == {k: tuple(v.shape) for k, v in released.items()}
    size = name.split("-")[1]
    params = sum(math.prod(s) for s in ours.values())
    assert math.floor(params / 1e8) / 10 == PUBLISHED_B[size]
    assert aimcore.count_params(cfg).backbone == params
    assert cfg.head_dim == 128
    if name == "aimv2-large-patch14-224":  # AIMV2_FACTS §3, verbatim
        assert ours["preprocessor.pos_embed"] == (1, 256, 1024)
        assert ours["preprocessor.patchifier.proj.weight"] == (1024, 3, 14, 14)
        assert ours["trunk.blocks.0.attn.qkv.weight"] == (3072, 1024)
        assert ours["trunk.blocks.23.mlp.fc1.weight"] == ours["trunk.blocks.23.mlp.fc3.weight"] == (2816, 1024)
        assert ours["trunk.blocks.23.mlp.fc2.weight"] == (1024, 2816)
        assert ours["trunk.post_trunk_norm.weight"] == (1024,)


def test_info_cli_describes_a_v2_flavor(capsys: pytest.CaptureFixture[str]) -> None:
    from aimcore.__main__ import main

    assert main(["info", "aimv2-large-patch14-336"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["family"] == "aimv2" and info["config"]["img_size"] == 336
    assert info["params"]["backbone"] == aimcore.count_params(get_flavor("aimv2-large-patch14-336")).backbone
    assert info["memory_gib"]["weights_bf16"] == pytest.approx(info["params"]["backbone"] * 2 / 2**30, abs=1e-3)
    assert info["gflops_per_image"]["forward_full"] > 0


HF_PREPROCESSOR = {  # apple/aimv2-*-224's preprocessor_config.json fields (CLIPImageProcessor), AIMV2_FACTS §4
    "crop_size": {"height": 56, "width": 56},
    "do_center_crop": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 56},
}


def test_preprocessor_config_json_is_the_checkpoints_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    from tests.conftest import make_photo

    ref = oracle(native=False)
    folder = layout_folders(tmp_path, ref)["transformers"]
    assert aimcore.load_model(folder).preprocess_config.origin == "apple"  # no preprocessor_config.json yet
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_PREPROCESSOR))
    model = aimcore.load_model(folder)
    cfg = model.preprocess_config
    assert (cfg.img_size, cfg.resize_size, cfg.origin) == (56, 56, "preprocessor_config.json")
    assert cfg.mean == CLIP_MEAN and cfg.std == CLIP_STD
    photo = make_photo(90, 70, seed=3)
    # CLIP recipe by hand: short side 70 -> 56 (long 72), centre crop 56 (offset round(8 / 2) = 4), /255, mean/std.
    resized = photo.resize((72, 56), Image.Resampling.BICUBIC).crop((8, 0, 64, 56))
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    expected = (pixels - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    torch.testing.assert_close(model.preprocess(photo)[0], expected, rtol=0, atol=1e-6)
    override = aimcore.PreprocessConfig.for_size(56)
    assert aimcore.load_model(folder, preprocess=override).preprocess_config.origin == "override"
    with pytest.raises(TypeError, match=r"model\.preprocess_config"):
        aimcore.preprocess(photo)


def test_native_preprocessing_keeps_the_aspect_ratio_within_max_patches(tmp_path: Path) -> None:
    from tests.conftest import make_photo

    ref = oracle(native=True)
    folder = layout_folders(tmp_path, ref)["apple"]
    native = dict(HF_PREPROCESSOR, do_resize=False, do_center_crop=False)
    (folder / "preprocessor_config.json").write_text(json.dumps(native))
    model = aimcore.load_model(folder)
    cfg = model.preprocess_config
    assert cfg.mode == "native" and cfg.max_patches == 16 and cfg.to_dict()["origin"] == "preprocessor_config.json"
    x = model.preprocess(make_photo(84, 42, seed=1))  # 6x3 patches = 18 > 16: scaled to 5x3 (aspect 2:1 -> 5:3)
    assert x.shape == (1, 3, 42, 70)
    x = model.preprocess(make_photo(56, 28, seed=1))  # already whole patches and within the cap: untouched
    assert x.shape == (1, 3, 28, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x, outputs=("tokens",)).tokens, reference_tokens(ref, x), **TOL)


def test_v2_flavor_and_hub_id_offline_name_the_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for source in ("aimv2-large-patch14-224", "apple/aimv2-large-patch14-224", "apple/aimv2-large-patch14-native"):
        with pytest.raises(aimcore.ModelUnavailableError, match=r"apple/aimv2-large-patch14-(224|native).*OFFLINE"):
            aimcore.load_model(source)


def test_a_hub_snapshot_folder_loads_like_the_hub_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path is `_files_in(snapshot)`: point the snapshot at a transformers folder and load by hub id."""
    import aimcore.sources as sources

    ref = oracle(native=False)
    folder = layout_folders(tmp_path, ref)["transformers"]
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_PREPROCESSOR))
    asked: list[str] = []
    monkeypatch.setattr(sources, "_snapshot_from_hub", lambda repo, patterns=None: asked.append(repo) or folder)
    model = aimcore.load_model("apple/aimv2-large-patch14-224")
    assert asked == ["apple/aimv2-large-patch14-224"]
    assert model.preprocess_config.origin == "preprocessor_config.json"
    x = images(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x, outputs=("tokens",)).tokens, reference_tokens(ref, x), **TOL)
