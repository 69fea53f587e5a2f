"""Networks: the UNI-TransUNet segmentation model and its ViT encoder presets."""

from .checkpoint import load_trained_weights, read_checkpoint
from .encoders import ENCODER_PRESETS, build_encoder, encoder_patch_size, load_encoder_weights, read_state_dict
from .transunet import CascadedDecoder, ProjectionHead, SkipStem, TransUNetOutput, UNITransUNet

__all__ = [
    "ENCODER_PRESETS",
    "build_encoder",
    "encoder_patch_size",
    "load_encoder_weights",
    "read_state_dict",
    "load_trained_weights",
    "read_checkpoint",
    "UNITransUNet",
    "TransUNetOutput",
    "SkipStem",
    "CascadedDecoder",
    "ProjectionHead",
]
