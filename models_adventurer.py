"""Adventurer: a Mamba-2 image classifier that reads images as token streams (arXiv:2410.07599).

Same parameter names, token layout and initialisation as the official `models_mamba.py` (SPEC 2), so the
released checkpoints load strictly and give the official logits, plus timm's model interface
(`forward_features`/`forward_head`, `forward_intermediates`, features_only, layer-decay groups, pretrained
configs). Unlike ViT the class token sits at the END of the sequence, after the patch tokens.
"""
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from advarm.checkpoint import extract_state_dict, load_checkpoint_file, load_state_dict_strict, resize_pos_embed
from advarm.layers import PatchEmbed, SwiGLU, TokenFeatures, drop_path_rates, init_classifier_official, square_img_size
from advarm.ssm import Mamba2

__all__ = ["Adventurer", "checkpoint_filter_fn"]

FLIP_RULES = {
    "official": lambda n: n // 2 == 1,  # what the released code does: only layers 2 and 3 (SPEC 9 item 1)
    "every_two": lambda n: n % 2 == 1,  # what the paper figure draws: every second layer
}
GLOBAL_POOLS = ("token", "avg", "")


class Block(nn.Module):
    """Pre-norm Mamba-2 block with the "heading average" token and the optional patch-order flip.

    The average of all tokens is prepended so that the causal scan gives every patch a global summary; a
    flipped block reverses the patch tokens (class token stays last) before the mixer and restores the
    order afterwards, so every block sees and returns raster order.
    """

    def __init__(self, dim, norm_layer, drop_path=0.0, flip=False, layer_idx=None, **mixer_kwargs):
        super().__init__()
        self.flip = flip
        self.mixer = Mamba2(dim, layer_idx=layer_idx, **mixer_kwargs)
        self.norm = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = SwiGLU(dim, int(dim * 2.5))
        self.norm_mlp = norm_layer(dim)

    def forward(self, x):
        h = self.norm(x)
        patches, cls = h[:, :-1], h[:, -1:]
        if self.flip:
            patches = patches.flip(1)
        h = self.mixer(torch.cat([h.mean(dim=1, keepdim=True), patches, cls], dim=1))  # [avg, patches..., cls]
        h = torch.cat([h[:, 1:-1].flip(1), h[:, -1:]], dim=1) if self.flip else h[:, 1:]
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))


class Adventurer(TokenFeatures, nn.Module):
    """Adventurer classifier; constructor arguments are the official ones plus three switches.

    flip_rule: "official" (flip layers with n // 2 == 1) or "every_two" (n % 2 == 1, the paper figure).
    official_drop_path: True keeps the official drop-path list `[0] + linspace(0, rate, depth)`.
    global_pool: "token" (class token, official), "avg" (mean of the patch tokens) or "" (no pooling).
    dynamic_img_size: accept any input size, resampling the position table to its grid (timm's ViT flag).
    drop_block_rate is accepted and unused, as in the official class (its main.py passes it). Other unknown
    arguments raise TypeError (timm's contract) where the official class silently swallows them.
    """

    def __init__(
            self,
            img_size=224,
            patch_size=16,
            depth=12,
            embed_dim=256,
            channels=3,
            num_classes=1000,
            ssm_cfg=None,
            drop_rate=0.0,
            drop_path_rate=0.1,
            norm_epsilon=1e-5,
            rms_norm=True,
            mamba_expand=2,
            mamba_d_state=64,
            flip_rule="official",
            official_drop_path=True,
            global_pool="token",
            in_chans=None,
            drop_block_rate=None,
            dynamic_img_size=False,
    ):
        super().__init__()
        if flip_rule not in FLIP_RULES:
            raise ValueError(f"flip_rule must be one of {sorted(FLIP_RULES)}, got {flip_rule!r}")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        img_size = square_img_size(img_size, "Adventurer")
        self.in_chans = channels if in_chans is None else in_chans  # timm passes in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token, stored LAST
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size

        # Registration order = official state_dict order (SPEC 5.1) and official RNG consumption order.
        self.patch_embed = PatchEmbed(img_size, patch_size, self.in_chans, embed_dim,
                                      strict_img_size=not dynamic_img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        if rms_norm:
            norm_layer = partial(nn.RMSNorm, eps=norm_epsilon)
        else:
            norm_layer = partial(nn.LayerNorm, eps=norm_epsilon)
        rates = drop_path_rates(drop_path_rate, depth, official_offset=official_drop_path)
        flips = FLIP_RULES[flip_rule]
        self.layers = nn.ModuleList([
            Block(embed_dim, norm_layer, rates[i], flips(i), layer_idx=i,
                  d_state=mamba_d_state, expand=mamba_expand, **(ssm_cfg or {}))
            for i in range(depth)
        ])
        self.norm_f = norm_layer(embed_dim)
        self.feature_info = [
            dict(module=f"layers.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        init_classifier_official(self, n_layer=depth)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    def reset_classifier(self, num_classes, global_pool=None):
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self._replace_head(num_classes)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path, key=None):
        """Load an official checkpoint file (`.pth` container or `.safetensors`) into this model.

        Takes `model` unless `key` says otherwise (official evaluation reads `model`, timm's loader would
        prefer `model_ema`), unpickles only `args`-style objects, resizes `pos_embed` to this model's grid
        and keeps this model's fresh head when the class count differs.
        """
        state_dict = checkpoint_filter_fn(extract_state_dict(load_checkpoint_file(checkpoint_path), key), self)
        own = self.state_dict()
        head_keys = [k for k in state_dict if k.startswith("head.")]
        if any(k not in own or state_dict[k].shape != own[k].shape for k in head_keys):
            for k in head_keys:
                del state_dict[k]
            state_dict.update({k: v for k, v in own.items() if k.startswith("head.")})
        load_state_dict_strict(self, state_dict, source=checkpoint_path)

    def forward_head(self, x, pre_logits=False):
        if self.global_pool == "token":
            x = x[:, -1]
        elif self.global_pool == "avg":
            x = x[:, :-1].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x, return_features=False):
        """Logits; `return_features=True` gives the pooled, normalised features (official argument)."""
        return self.forward_head(self.forward_features(x), pre_logits=return_features)


def checkpoint_filter_fn(state_dict, model):
    """Adapt an official checkpoint to `model`: unwrap any container, resize pos_embed (class token last).

    Accepts a bare state dict or a training container (`model`, `model_ema`, `state_dict`, `module`
    prefixes). Same-grid tables pass unchanged; other grids are resampled bicubically (antialias off) with the
    class-token vector kept in the last slot. This is the correct resize; main.py's `--finetune` keeps the
    official one-token-shifted one (checkpoint.resize_pos_embed(..., cls_position="first")).
    """
    state_dict = extract_state_dict(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        grid = model.patch_embed.grid_size
        state_dict["pos_embed"] = resize_pos_embed(pos_embed, (grid, grid), cls_position="last")
    return state_dict


def _create_adventurer(variant, pretrained=False, **kwargs):
    if "channels" in kwargs:  # official spelling; timm fills in_chans from the pretrained cfg otherwise
        kwargs["in_chans"] = kwargs.pop("channels")
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    if overlay.get("file"):
        # Local official files go through Adventurer.load_pretrained: `model` entry, safe unpickling of args.
        overlay = {"custom_load": True, **overlay}
    # timm's create_model(device=..., dtype=...): allocate on that device (meta builds cost nothing), then cast.
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(
            Adventurer,
            variant,
            pretrained,
            pretrained_cfg_overlay=overlay,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
            **kwargs,
        )
    return model.to(dtype=dtype) if dtype is not None else model


def _cfg(file, img_size):
    return {
        "hf_hub_id": "Wangf3014/Adventurer",
        "hf_hub_filename": file,
        "num_classes": 1000,
        "input_size": (3, img_size, img_size),
        "fixed_input_size": True,
        "pool_size": None,
        "crop_pct": 0.875 if file.endswith("patch16_224.pth") else 1.0,  # official eval crop (SPEC 10.1)
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "unknown",  # neither the official repository nor its README states a license
        "paper_ids": "arXiv:2410.07599",
        "paper_name": "Adventurer: Optimizing Vision Mamba Architecture Designs for Extreme Efficiency",
        "origin_url": "https://github.com/wangf3014/Adventurer",
    }


# The eight released ImageNet-1k checkpoints (SPEC 10.1): (architecture, input size).
_RELEASED = [
    ("adventurer_tiny_patch16", 224),
    ("adventurer_small_patch16", 224),
    ("adventurer_base_patch16", 224),
    ("adventurer_large_patch16", 224),
    ("adventurer_base_patch8", 224),
    ("adventurer_base_patch16", 384),
    ("adventurer_base_patch16", 448),
    ("adventurer_base_patch8", 448),
]
# Each file is reachable as `<arch>.in1k_<size>` (official names) and as `<arch>_<size>.in1k` (file names).
default_cfgs = generate_default_cfgs({
    **{f"{arch}.in1k_{size}": _cfg(f"{arch}_{size}.pth", size) for arch, size in _RELEASED},
    **{f"{arch}_{size}.in1k": _cfg(f"{arch}_{size}.pth", size) for arch, size in _RELEASED},
})

_TINY = dict(patch_size=16, embed_dim=256, depth=12)
_SMALL = dict(patch_size=16, embed_dim=512, depth=12)
_BASE = dict(patch_size=16, embed_dim=768, depth=12)
_BASE_P8 = dict(patch_size=8, embed_dim=768, depth=12)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24)


@register_model
def adventurer_tiny_patch16(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_tiny_patch16", pretrained, **dict(_TINY, **kwargs))


@register_model
def adventurer_small_patch16(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_small_patch16", pretrained, **dict(_SMALL, **kwargs))


@register_model
def adventurer_base_patch16(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch16", pretrained, **dict(_BASE, **kwargs))


@register_model
def adventurer_base_patch8(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch8", pretrained, **dict(_BASE_P8, **kwargs))


@register_model
def adventurer_large_patch16(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_large_patch16", pretrained, **dict(_LARGE, **kwargs))


# Names of the released files and of the official main.py default; each builds at its own input size.
@register_model
def adventurer_tiny_patch16_224(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_tiny_patch16_224", pretrained, **dict(_TINY, **kwargs))


@register_model
def adventurer_small_patch16_224(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_small_patch16_224", pretrained, **dict(_SMALL, **kwargs))


@register_model
def adventurer_base_patch16_224(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch16_224", pretrained, **dict(_BASE, **kwargs))


@register_model
def adventurer_base_patch16_384(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch16_384", pretrained, **dict(_BASE, **kwargs))


@register_model
def adventurer_base_patch16_448(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch16_448", pretrained, **dict(_BASE, **kwargs))


@register_model
def adventurer_large_patch16_224(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_large_patch16_224", pretrained, **dict(_LARGE, **kwargs))


@register_model
def adventurer_base_patch8_224(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch8_224", pretrained, **dict(_BASE_P8, **kwargs))


@register_model
def adventurer_base_patch8_448(pretrained=False, **kwargs) -> Adventurer:
    return _create_adventurer("adventurer_base_patch8_448", pretrained, **dict(_BASE_P8, **kwargs))
