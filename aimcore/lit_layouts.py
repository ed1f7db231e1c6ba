"""LiT checkpoint layouts: Apple's own keys (our names) and transformers' `Aimv2Model`, both ways.

Apple (ours)                                         transformers Aimv2Model
image_encoder.preprocessor.patchifier.proj.*         vision_model.embeddings.patch_embed.*
image_encoder.preprocessor.patchifier.norm.weight    vision_model.embeddings.rms_norm.weight
image_encoder.preprocessor.pos_embed (1, N, Dv)      vision_model.embeddings.position_embedding.weight (N, Dv)
{tower}.trunk.blocks.{i}.attn.qkv (3D, D)            {model}.encoder.layers.{i}.attention.{q,k,v}_proj (thirds)
{tower}.trunk.blocks.{i}.attn.proj                   {model}.encoder.layers.{i}.attention.out_proj
{tower}.trunk.blocks.{i}.norm_1 / norm_2             {model}.encoder.layers.{i}.rms_norm1 / rms_norm2
{tower}.trunk.blocks.{i}.mlp.fc1 / fc3 / fc2         {model}.encoder.layers.{i}.ffn.gate_proj / up_proj / down_proj
{tower}.trunk.post_trunk_norm.weight                 {model}.rms_norm.weight
image_encoder.head.cls_token / k / v                 vision_model.head.cls_token / k_proj / v_proj
image_encoder.head.linear.{weight,bias}              vision_model.head.output_proj.{weight,bias}
text_encoder.preprocessor.text_embedding.weight      text_model.embeddings.token_embedding.weight
text_encoder.preprocessor.positional_embedding       text_model.embeddings.position_embedding.weight
image_projector / text_projector                     visual_projection / text_projection
log_logit_scale                                      logit_scale

A transformers LiT folder is recognised by its config: `model_type: "aimv2"` *with* nested `vision_config` and
`text_config`. The remote-code vision-only config also says "aimv2", but flat: that is not a LiT model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from torch import Tensor

from aimcore.config import AimConfig
from aimcore.layouts import Layout, LayoutError, _ours_to_transformers, _transformers_to_ours, register_layout
from aimcore.lit import LitConfig, TextConfig

__all__ = [
    "detect_lit_layout",
    "is_lit_hf_config",
    "lit_config_from_hf",
    "lit_config_to_hf",
    "lit_from_transformers",
    "lit_to_transformers",
]

# The keys only a LiT checkpoint has; each tower's trunk goes through aimcore.layouts' transformers table.
_LIT_ONLY = {
    "image_encoder.head.cls_token": "vision_model.head.cls_token",
    "image_encoder.head.k.weight": "vision_model.head.k_proj.weight",
    "image_encoder.head.v.weight": "vision_model.head.v_proj.weight",
    "image_encoder.head.linear.weight": "vision_model.head.output_proj.weight",
    "image_encoder.head.linear.bias": "vision_model.head.output_proj.bias",
    "text_encoder.preprocessor.text_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text_encoder.preprocessor.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "image_projector.weight": "visual_projection.weight",
    "text_projector.weight": "text_projection.weight",
    "log_logit_scale": "logit_scale",
}
_TOWERS = (("image_encoder.", "vision_model."), ("text_encoder.", "text_model."))


def detect_lit_layout(keys: Collection[str]) -> str | None:
    """ "apple", "transformers" or None (not a LiT state dict)."""
    names = set(keys)
    if "log_logit_scale" in names and any(k.startswith("text_encoder.") for k in names):
        return "apple"
    if "logit_scale" in names and any(k.startswith("text_model.") for k in names):
        return "transformers"
    return None


def _split(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Tower prefix -> that tower's keys with the prefix stripped; and keys under no prefix."""
    towers: dict[str, dict[str, Tensor]] = {p: {} for p in prefixes}
    rest = []
    for key, value in sd.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            rest.append(key)
        else:
            towers[prefix][key[len(prefix) :]] = value
    return towers, rest


def lit_from_transformers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers `Aimv2Model` state dict -> Apple's keys. Unknown keys raise (strict)."""
    inverse = {v: k for k, v in _LIT_ONLY.items()}
    out = {inverse[k]: v for k, v in sd.items() if k in inverse}
    left = {k: v for k, v in sd.items() if k not in inverse and not k.endswith("position_ids")}  # ids: a buffer
    towers, rest = _split(left, tuple(hf for _, hf in _TOWERS))
    if rest:
        raise LayoutError(f"transformers Aimv2Model: {len(rest)} key(s) belong to no tower: {sorted(rest)[:8]}")
    for ours, hf in _TOWERS:
        for key, value in _transformers_to_ours(towers[hf]).items():  # trunk + patch embed, q/k/v fused
            out[ours + key] = value
    return out


def lit_to_transformers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Apple's keys -> transformers `Aimv2Model` (the inverse of lit_from_transformers)."""
    out = {_LIT_ONLY[k]: v for k, v in sd.items() if k in _LIT_ONLY}
    towers, rest = _split({k: v for k, v in sd.items() if k not in _LIT_ONLY}, tuple(o for o, _ in _TOWERS))
    if rest:
        raise LayoutError(f"LiT state dict: {len(rest)} key(s) belong to no tower: {sorted(rest)[:8]}")
    for ours, hf in _TOWERS:
        for key, value in _ours_to_transformers(towers[ours]).items():
            out[hf + key] = value
    return out


def is_lit_hf_config(data: Mapping[str, Any]) -> bool:
    """A transformers `Aimv2Config` (nested towers), not the flat remote-code vision config of the same name."""
    return (
        data.get("model_type") == "aimv2"
        and isinstance(data.get("vision_config"), Mapping)
        and isinstance(data.get("text_config"), Mapping)
    )


def lit_config_from_hf(data: Mapping[str, Any], name: str = "aimv2-lit") -> LitConfig:
    """transformers `Aimv2Config` dict -> LitConfig (transformers' defaults for fields the file leaves out)."""
    if not is_lit_hf_config(data):
        raise ValueError("not a transformers Aimv2Config with nested vision_config and text_config")
    v, t = data["vision_config"], data["text_config"]
    if v.get("is_native") or not v.get("use_head", True):
        raise ValueError("a LiT image tower has a pooling head and a learned position table (is_native false)")
    depth = int(v.get("num_hidden_layers", 24))
    img, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 14))
    vision = LitConfig.image_tower(
        AimConfig(
            name=name,
            img_size=img,
            patch_size=patch,
            embed_dim=int(v.get("hidden_size", 1024)),
            depth=depth,
            num_heads=int(v.get("num_attention_heads", 8)),
            mlp_hidden_dim=int(v.get("intermediate_size", 2816)),
            num_channels=int(v.get("num_channels", 3)),
            probe_layers=(depth - 1,),
            best_probe_layers=(depth - 1,),
            num_classes=0,
            norm_eps=float(v.get("rms_norm_eps", 1e-5)),
            family="aimv2",
        )
    )
    eos = t.get("eos_token_id", 49407)
    text = TextConfig(
        embed_dim=int(t.get("hidden_size", 768)),
        depth=int(t.get("num_hidden_layers", 12)),
        num_heads=int(t.get("num_attention_heads", 6)),
        mlp_hidden_dim=int(t.get("intermediate_size", 2048)),
        vocab_size=int(t.get("vocab_size", 49408)),
        context_length=int(t.get("max_position_embeddings", 77)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        norm_eps=float(t.get("rms_norm_eps", 1e-5)),
    )
    return LitConfig(
        name,
        vision,
        text,
        projection_dim=int(data.get("projection_dim", 512)),
        max_logit_scale=float(data.get("max_logit_scale", 100.0)),
    )


def lit_config_to_hf(cfg: LitConfig) -> dict[str, Any]:
    """LitConfig -> a transformers `Aimv2Config` dict (tests build the oracle from it)."""
    v, t = cfg.vision, cfg.text
    return {
        "model_type": "aimv2",
        "projection_dim": cfg.projection_dim,
        "max_logit_scale": cfg.max_logit_scale,
        "vision_config": {
            "hidden_size": v.embed_dim,
            "intermediate_size": v.hidden_dim,
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.img_size,
            "patch_size": v.patch_size,
            "rms_norm_eps": v.norm_eps,
            "use_head": True,
            "is_native": False,
        },
        "text_config": {
            "hidden_size": t.embed_dim,
            "intermediate_size": t.mlp_hidden_dim,
            "num_hidden_layers": t.depth,
            "num_attention_heads": t.num_heads,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.context_length,
            "eos_token_id": t.eos_token_id,
            "rms_norm_eps": t.norm_eps,
        },
    }


# Next to aimcore.layouts' own layouts: a LiT state dict met by aimcore's generic detection is named as such,
# never mistaken for a vision encoder (the model it loads into is LitModel: aimcore.lit_sources).
register_layout(Layout("aimcore-lit", lambda keys: detect_lit_layout(keys) == "apple", dict, dict))
register_layout(
    Layout(
        "transformers-aimv2-lit",
        lambda keys: detect_lit_layout(keys) == "transformers",
        lit_from_transformers,
        lit_to_transformers,
    )
)
