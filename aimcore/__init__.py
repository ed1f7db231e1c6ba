"""aimcore: the one AIM model definition (v1 and AIMv2, `AimConfig.family`) shared by training, export and the service.

Public API (other packages and our checks use these names):
    AimConfig, FLAVORS, get_flavor, build_model, load_model, save_checkpoint, preprocess, PreprocessConfig,
    AimModel, AimFeatures, count_params, count_flops.
"""

from aimcore.checkpoint import CheckpointError, save_checkpoint, sha256_file
from aimcore.config import FLAVORS, AimConfig, flavor_names, get_flavor
from aimcore.flops import count_flops, count_params
from aimcore.layers import prefix_causal_attn_mask, prefix_mask_from_lengths, sincos_pos_embed_2d
from aimcore.model import FEATURE_OUTPUTS, AimFeatures, AimModel, build_model
from aimcore.preprocess import PreprocessConfig, preprocess, preprocess_batch, to_rgb
from aimcore.sources import ModelUnavailableError, load_model

__all__ = [
    "FEATURE_OUTPUTS",
    "FLAVORS",
    "AimConfig",
    "AimFeatures",
    "AimModel",
    "CheckpointError",
    "ModelUnavailableError",
    "PreprocessConfig",
    "build_model",
    "count_flops",
    "count_params",
    "flavor_names",
    "get_flavor",
    "load_model",
    "prefix_causal_attn_mask",
    "prefix_mask_from_lengths",
    "preprocess",
    "preprocess_batch",
    "save_checkpoint",
    "sha256_file",
    "sincos_pos_embed_2d",
    "to_rgb",
]
