"""Networks: the UNI-TransUNet segmentation model and its ViT encoder presets."""

from .checkpoint import initialised, load_trained_weights, read_checkpoint
from .record import NETWORK_KEYS, WINDOW_KEYS, model_record, stored_record, trained_settings
from .encoders import ENCODER_PRESETS, build_encoder, encoder_patch_size, load_encoder_weights, read_state_dict
from .transunet import CascadedDecoder, ProjectionHead, SkipStem, TransUNetOutput, UNITransUNet

__all__ = [
    "ENCODER_PRESETS",
    "build_encoder",
    "encoder_patch_size",
    "load_encoder_weights",
    "read_state_dict",
    "load_trained_weights",
    "initialised",
    "read_checkpoint",
    "NETWORK_KEYS",
    "WINDOW_KEYS",
    "model_record",
    "trained_settings",
    "stored_record",
    "UNITransUNet",
    "TransUNetOutput",
    "SkipStem",
    "CascadedDecoder",
    "ProjectionHead",
]
