"""Classifiers for evaluation and prediction, shared by validate.py, predict.py and main.py.

* `released_cfg` names the released checkpoint (`arch.tag`) that a file name, or a model name at an input
  size, refers to: its pretrained cfg holds the official eval crop (main.py's `--eval-crop-ratio auto`).
* `eval_data_config` is timm's data config of a pretrained cfg with explicit overrides, for
  `timm.data.create_transform`.
* `create_classifier` builds a timm classifier and loads a checkpoint strictly, through the model family's
  checkpoint filter (containers, `module.` prefixes, position tables at another size).
"""
import difflib
from pathlib import Path
from urllib.parse import urlparse

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, is_model, list_models, list_pretrained, split_model_name_tag

import models_adventurer
import models_arm
from advarm import checkpoint

PROJECT_MODULES = ("models_adventurer", "models_arm")
CHECKPOINT_FILTERS = {models_adventurer.Adventurer: models_adventurer.checkpoint_filter_fn,
                      models_arm.ARM: models_arm.checkpoint_filter_fn}


def check_model_name(name):
    """One line naming close registered names when `name` (optionally `arch.tag`) is not a timm model."""
    arch = split_model_name_tag(name)[0]
    if not is_model(arch):
        close = difflib.get_close_matches(arch, list_models(), n=5, cutoff=0.6)
        raise SystemExit(f"unknown model '{name}'" + (f"; close matches: {', '.join(close)}" if close else ""))


def released_cfg(model_name, img_size=None, file=None):
    """`arch.tag` of the released checkpoint that `file` or `model_name` refers to, else None.

    `file` (a path or URL) matches by base name among the architecture's released files. Otherwise the
    tag in `model_name`, or the architecture's release at `img_size`, is taken when its input size is
    `img_size` (any size when `img_size` is None and a tag is given).
    """
    arch, tag = split_model_name_tag(model_name)
    names = [f"{arch}.{tag}"] if tag else list_pretrained(f"{arch}.*")
    cfgs = {name: get_pretrained_cfg(name) for name in names}
    if file:
        base = Path(urlparse(str(file)).path).name
        for name, cfg in cfgs.items():
            if cfg is not None and cfg.hf_hub_filename == base:
                return name
    for name, cfg in cfgs.items():
        if cfg is not None and (cfg.input_size[-1] == img_size or (img_size is None and tag)):
            return name
    return None


def auto_crop_pct(model_name, img_size, file=None, default=0.875):
    """(crop, why) for main.py's `--eval-crop-ratio auto`: the crop of this project's released checkpoint that
    the run names, else `default` (other timm models keep the official default too)."""
    ours = split_model_name_tag(model_name)[0] in list_models(module=list(PROJECT_MODULES))
    name = released_cfg(model_name, img_size, file) if ours else None
    if name is None:
        return default, f"no released checkpoint is {model_name} at {img_size} px"
    return get_pretrained_cfg(name).crop_pct, f"pretrained cfg {name}"


def eval_data_config(cfg_name, img_size=None, crop_pct=None, crop_mode=None, interpolation=None):
    """timm's eval data config from the pretrained cfg of `cfg_name` (a model name, optionally `arch.tag`);
    the given values override it."""
    overrides = dict(img_size=img_size, crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation)
    return resolve_data_config({k: v for k, v in overrides.items() if v is not None},
                               pretrained_cfg=get_pretrained_cfg(cfg_name).to_dict())


def create_classifier(name, checkpoint_path=None, pretrained=False, num_classes=None, use_ema=False, **kwargs):
    """A timm classifier in eval mode, with the weights of `checkpoint_path` or the released ones (`pretrained`).

    The checkpoint (a state dict or training container, `.pth` or `.safetensors`, path or https URL) loads
    strictly: a mismatch is a `CheckpointError` naming the keys. Without `num_classes` the class count is the
    checkpoint head's. `use_ema` takes the `model_ema` entry. kwargs go to `timm.create_model`.
    """
    state_dict = None
    if checkpoint_path:
        container = checkpoint.load_checkpoint_container(checkpoint_path)
        state_dict = checkpoint.extract_state_dict(container, key="model_ema" if use_ema else None)
        if num_classes is None and "head.weight" in state_dict:
            num_classes = state_dict["head.weight"].shape[0]
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if state_dict is not None:
        if isinstance(model, models_arm.ARM) and models_arm.is_pretrain_state_dict(state_dict):
            raise checkpoint.CheckpointError(f"{checkpoint_path}: an ARM pretraining checkpoint has no classifier; "
                                             f"finetune it first (Finetuning/main_finetune.py --finetune)")
        filter_fn = CHECKPOINT_FILTERS.get(type(model))
        if filter_fn is not None and set(state_dict) == set(model.state_dict()):  # else: the mismatch is the error
            state_dict = filter_fn(state_dict, model)
        checkpoint.load_state_dict_strict(model, state_dict, source=checkpoint_path)
    return model.eval()


def create_classifier_or_exit(name, *args, **kwargs):
    """`create_classifier` for the command line: a model that cannot be built (misspelt --model-kwargs key,
    impossible geometry, weights that cannot be fetched) ends the run with one line."""
    try:
        return create_classifier(name, *args, **kwargs)
    except checkpoint.CheckpointError:
        raise
    except (TypeError, ValueError, RuntimeError, OSError) as err:
        raise SystemExit(f"cannot build {name}: {err}") from None
