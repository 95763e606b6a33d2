"""Adventurer and ARM vision-Mamba models, importable from anywhere once the project is installed.

    import timm, advarm                      # importing the package registers every model with timm
    model = timm.create_model("adventurer_base_patch16", pretrained=False)
    features = model.forward_features(images)   # (B, N + 1, C), class token last

The package holds the ground floor (mixers, scans, kernel dispatch, checkpoint I/O, shared layers and
run helpers); the model files `models_adventurer.py` and `models_arm.py` stay flat beside the training
scripts, as in the official repositories, and are re-exported here.
"""
import models_adventurer  # registers adventurer_* with timm
import models_arm  # registers arm_* with timm
from advarm.checkpoint import CheckpointError, load_checkpoint_file, load_weights, save_checkpoint
from advarm.kernels import available_backends, get_backend, set_backend
from advarm.ssm import Mamba1, Mamba2

# The model files import the ground floor from this package, so either may be imported first: their names
# are looked up on first access instead of being copied while a model file may still be half-loaded.
_MODEL_NAMES = {"Adventurer": models_adventurer, "ARM": models_arm, "VisionMamba": models_arm,
                "create_pretrain_model": models_arm, "create_finetune_model": models_arm,
                "pretrain_to_finetune": models_arm}


def __getattr__(name):
    if name in _MODEL_NAMES:
        return getattr(_MODEL_NAMES[name], name)
    raise AttributeError(f"module 'advarm' has no attribute {name!r}")


__version__ = "0.2.0"
__all__ = ["Adventurer", "ARM", "VisionMamba", "Mamba1", "Mamba2", "create_pretrain_model", "create_finetune_model",
           "pretrain_to_finetune", "load_weights", "load_checkpoint_file", "save_checkpoint", "CheckpointError",
           "set_backend", "get_backend", "available_backends"]
