"""ARM (arXiv:2406.07537): autoregressive Mamba pretraining and the four-direction finetune classifier.

* `VisionMamba` - pretraining model (official `models_pretrain.py`). The patch grid is cut into 4x4-patch
  clusters; a unidirectional Mamba-1 encoder reads every cluster but the last, and a small cross-attention
  decoder predicts the normalised pixels of cluster k+1 from encoder clusters 0..k. `forward` returns the
  per-token loss vector, so it is deliberately NOT in the timm registry.
* `ARM` - finetune classifier (official `Finetuning/models_mamba.py`): cls token in the MIDDLE of the raster
  sequence, four-direction ("v3") Mamba-1 mixers, registered in timm as `arm_{base,large,huge}_pz16`.
* `pretrain_to_finetune` + `init_head_for_finetune` - the official weight transfer (SPEC 4.4, 11.6);
  `python3 models_arm.py convert PRETRAIN.pth OUT.pth --model arm_base_pz16 --input-size 224` applies it.

State-dict keys, order and shapes equal the official ones (SPEC 5.2, 5.3); the official flags that change
nothing (`rms_norm`, `fused_add_norm`, `residual_in_fp32`, ...; SPEC 9 item 4) are accepted and ignored.
"""
import argparse
import re
import sys
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from advarm.checkpoint import (
    CheckpointError,
    extract_state_dict,
    insert_token,
    load_checkpoint_file,
    resize_pos_embed,
    save_checkpoint,
)
from advarm.layers import (
    PatchEmbed,
    SwiGLU,
    TokenFeatures,
    drop_path_rates,
    init_classifier_official,
    init_weights_official,
    lecun_normal_official_,
    run_block,
    sincos_2d_pos_embed,
    square_img_size,
)
from advarm.ssm import V3_DIRECTIONS, Mamba1

__all__ = ["VisionMamba", "ARM", "MODEL_CONFIGS", "create_pretrain_model", "create_finetune_model",
           "pretrain_to_finetune", "init_head_for_finetune", "checkpoint_filter_fn", "is_pretrain_state_dict"]

# Official flags of both ARM classes that have no effect on the computation (SPEC 4.1, 9 item 4).
INERT_KWARGS = frozenset({
    "rms_norm", "residual_in_fp32", "fused_add_norm", "norm_epsilon", "initializer_cfg", "if_bidirectional",
    "if_devide_out", "final_pool_type", "ft_seq_len", "pt_hw_seq_len", "flip_img_sequences_ratio", "if_bimamba",
    "device", "dtype", "drop_block_rate",
})
# Official flags whose other values are dead or broken options (SPEC 4.1): only the registered value is built.
FIXED_KWARGS = {"if_abs_pos_embed": True, "if_cls_token": True, "use_middle_cls_token": True, "if_rope": False,
                "if_rope_residual": False, "use_double_cls_token": False, "init_layer_scale": None}

# Official sizes (SPEC 3.1, 4.1): the same names build the pretraining and the finetuning model.
MODEL_CONFIGS = {
    "arm_base_pz16": dict(patch_size=16, embed_dim=768, depth=12),
    "arm_large_pz16": dict(patch_size=16, embed_dim=1024, depth=24),
    "arm_huge_pz16": dict(patch_size=16, embed_dim=1536, depth=24),
}


def _check_official_flags(kwargs, cls_name):
    """Accept the official constructor flags that change nothing; reject typos and unsupported values."""
    unknown = sorted(set(kwargs) - INERT_KWARGS - set(FIXED_KWARGS))
    if unknown:
        raise TypeError(f"{cls_name} got unexpected keyword arguments: {', '.join(unknown)}")
    for name, supported in FIXED_KWARGS.items():
        if name in kwargs and kwargs[name] != supported:
            raise ValueError(f"{cls_name} implements only {name}={supported!r} (the official models), "
                             f"got {kwargs[name]!r}")


def _make_patch_embed(img_size, patch_size, stride, channels, embed_dim, strict_img_size=True):
    """`stride=None` means `patch_size` (the official models always use stride = patch size)."""
    if stride is not None and stride != patch_size:
        raise ValueError(f"ARM uses non-overlapping patches: stride ({stride}) must equal patch_size ({patch_size})")
    return PatchEmbed(square_img_size(img_size, "ARM"), patch_size, channels, embed_dim, strict_img_size)


def _warn_if_odd(num_patches):
    """At build time and after set_input_size: the official v3 mixer misplaces the cls slot on odd grids."""
    if num_patches % 2:
        warnings.warn(f"ARM with an odd patch count ({num_patches}): the four-direction mixer assumes the cls "
                      f"token at {(num_patches + 1) // 2}, the model puts it at {num_patches // 2} (official "
                      f"behaviour, SPEC 9 item 6)")


def default_tap_layers(depth):
    """Four encoder taps ending at the last layer: (6,8,10,12) for depth 12, (12,16,20,24) for 24 (official),
    steps of depth//6 elsewhere (depth 4 -> (1,2,3,4))."""
    if depth < 4:
        raise ValueError(f"VisionMamba needs depth >= 4 for its four encoder taps, got depth={depth}; "
                         f"pass tap_layers explicitly")
    step = max(1, depth // 6)
    return tuple(depth - step * k for k in (3, 2, 1, 0))


class _GatedProjection(torch.autograd.Function):
    """`F.linear(SiLU(h1) * h2, weight, bias)` keeping only h1 and h2 for backward, which recomputes the
    gate (elementwise, no matmul): SwiGLU's training memory drops from four hidden-size tensors to two."""

    @staticmethod
    def forward(ctx, h1, h2, weight, bias):
        ctx.save_for_backward(h1, h2, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(h1) * h2, weight, bias)  # under autocast: the same casts as SwiGLU's w3

    @staticmethod
    def backward(ctx, grad):
        h1, h2, weight = ctx.saved_tensors
        sigmoid = torch.sigmoid(h1)
        gate = h1 * sigmoid
        grad_hidden = grad @ weight.to(grad.dtype)
        grad_weight = grad.flatten(0, -2).mT @ (gate * h2).flatten(0, -2)
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        grad_h1 = grad_hidden * h2 * sigmoid * (1 + h1 * (1 - sigmoid))
        return grad_h1, grad_hidden * gate, grad_weight, grad_bias


class Block(nn.Module):
    """`x + DropPath(Mamba1(LN(x)))`, then `x + DropPath(SwiGLU(LN(x)))`.

    Registration order mixer, mlp, norm1, norm2 gives the official key order. The official blocks always
    use `nn.LayerNorm` (eps 1e-5), whatever `rms_norm` says. The SwiGLU runs through `_GatedProjection`
    (same numbers, less training memory; its `ffn_ln` is the official Identity).
    """

    def __init__(self, dim, bimamba_type, drop_path=0.0, layer_idx=None, ssm_cfg=None):
        super().__init__()
        self.mixer = Mamba1(dim, expand=1, bimamba_type=bimamba_type, layer_idx=layer_idx, **(ssm_cfg or {}))
        self.mlp = SwiGLU(dim, dim * 4 * 2 // 3)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        h, mlp = self.norm2(x), self.mlp
        return x + self.drop_path(_GatedProjection.apply(mlp.w1(h), mlp.w2(h), mlp.w3.weight, mlp.w3.bias))


# ---------------------------------------------------------------------------------------------------
# Pretraining model
# ---------------------------------------------------------------------------------------------------

def to_clusters(x, grid_size, cluster_size):
    """Raster tokens `(B, G*G, D)` -> `(B, K, c*c, D)`: K clusters of c x c patches, both levels in raster order."""
    batch, _, dim = x.shape
    per_side = grid_size // cluster_size
    x = x.reshape(batch, per_side, cluster_size, per_side, cluster_size, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, per_side * per_side, cluster_size * cluster_size, dim)


def block_causal_mask(num_blocks, block_len):
    """Additive attention mask: query block i sees key blocks 0..i (0), later blocks are -inf."""
    visible = torch.ones(num_blocks, num_blocks).tril().bool()
    mask = torch.zeros(num_blocks, num_blocks).masked_fill(~visible, float("-inf"))
    return mask.repeat_interleave(block_len, dim=0).repeat_interleave(block_len, dim=1)


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries onto encoder features (same length), with an additive mask."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, context, mask):
        batch, length, dim = query.shape
        head_dim = dim // self.num_heads
        q = self.q(query).reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class DecoderBlock(nn.Module):
    """`q + CrossAttn(LN(q), LN(kv))`, then `q + Mlp(LN(q))` (GELU, ratio 4).

    Official names: attn2, norm2_1 (queries), norm2_2 (keys/values), norm2 (MLP), mlp.fc1/fc2.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn2 = CrossAttention(dim, num_heads)
        self.norm2_1 = nn.LayerNorm(dim)
        self.norm2_2 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, query, context, mask):
        query = query + self.attn2(self.norm2_1(query), self.norm2_2(context), mask)
        return query + self.mlp(self.norm2(query))


class VisionMamba(nn.Module):
    """ARM pretraining model (SPEC 3); `forward(imgs)` returns the per-token loss vector.

    Generalised geometry: any grid divisible by `cluster_size`; the encoder reads all clusters but the
    last, the decoder predicts all but the first. With the official configuration (192 px, patch 16,
    cluster 4, depth 12/24) every number equals the official one (128 tokens, taps 6/8/10/12, ...).

    Switches (SPEC 11.5): `official_norm_pix=True` always normalises targets per patch, as the official code
    does whatever `--norm_pix_loss` says; with `official_norm_pix=False` the `norm_pix_loss` flag decides.
    `dec_num_heads=None` gives the official `dec_embed_dim // 64` (8 heads of 64 for 512).
    """

    def __init__(self, img_size=192, patch_size=16, stride=None, depth=12, embed_dim=768, dec_embed_dim=512,
                 channels=3, num_classes=1000, ssm_cfg=None, drop_rate=0.0, drop_path_rate=0.1,
                 bimamba_type="None", norm_pix_loss=True, official_norm_pix=True, cluster_size=4,
                 tap_layers=None, dec_depth=4, dec_num_heads=None, **kwargs):
        super().__init__()
        # num_classes and drop_path_rate are official arguments without effect: every block has drop-path 0.
        _check_official_flags(kwargs, type(self).__name__)
        self.patch_embed = _make_patch_embed(img_size, patch_size, stride, channels, embed_dim)
        grid = self.patch_embed.grid_size
        if grid % cluster_size:
            raise ValueError(f"patch grid {grid}x{grid} (img_size {img_size} / patch {patch_size}) is not "
                             f"divisible by cluster_size {cluster_size}")
        self.embed_dim = self.num_features = embed_dim
        self.dec_embed_dim = dec_embed_dim
        self.channels = channels
        self.cluster_size = cluster_size
        self.num_clusters = (grid // cluster_size) ** 2
        self.cluster_len = cluster_size * cluster_size
        self.num_steps = (self.num_clusters - 1) * self.cluster_len  # encoder length = number of predictions
        self.tap_layers = tuple(tap_layers) if tap_layers is not None else default_tap_layers(depth)
        increasing = sorted(set(self.tap_layers)) == list(self.tap_layers)
        if not increasing or not 1 <= self.tap_layers[0] <= self.tap_layers[-1] <= depth:
            raise ValueError(f"tap_layers must be increasing 1-based layer counts within 1..{depth}, "
                             f"got {self.tap_layers}")
        self.normalize_target = norm_pix_loss or official_norm_pix
        dec_num_heads = dec_num_heads or max(1, dec_embed_dim // 64)

        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim), requires_grad=False)
        self.ar_token = nn.Parameter(torch.zeros(1, 1, dec_embed_dim))
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, num_patches, dec_embed_dim), requires_grad=False)
        self.register_buffer("mask", block_causal_mask(self.num_clusters - 1, self.cluster_len))
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList(
            [Block(embed_dim, bimamba_type, layer_idx=i, ssm_cfg=ssm_cfg) for i in range(depth)])
        self.enc2dec = nn.Linear(embed_dim * len(self.tap_layers), dec_embed_dim * dec_depth)
        self.dec_block = nn.ModuleList([DecoderBlock(dec_embed_dim, dec_num_heads) for _ in range(dec_depth)])
        for i in range(len(self.tap_layers)):  # official names norm_1..norm_4, after dec_block
            self.add_module(f"norm_{i + 1}", nn.LayerNorm(embed_dim))
        self.ar_norm = nn.LayerNorm(dec_embed_dim)
        self.ar_pred = nn.Linear(dec_embed_dim, patch_size * patch_size * channels)
        self.grad_checkpointing = False
        self._init_weights(depth)

    def _init_weights(self, depth):
        """SPEC 3.6: lecun patch conv, sin-cos tables, ar_token, mamba walk, then xavier decoder."""
        lecun_normal_official_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        grid = self.patch_embed.grid_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_pos_embed(self.embed_dim, grid).unsqueeze(0))
            self.dec_pos_embed.copy_(sincos_2d_pos_embed(self.dec_embed_dim, grid).unsqueeze(0))
        trunc_normal_(self.ar_token, std=0.02)
        self.apply(partial(init_weights_official, n_layer=depth))
        self.dec_block.apply(_xavier_init)

    @torch.jit.ignore
    def no_weight_decay(self):
        """Official list; the official pretraining optimiser does not use it (SPEC 9 item 9)."""
        return {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward_features(self, imgs):
        """Encoder + tap norms + enc2dec -> `(B, num_steps, dec_embed_dim, dec_depth)`.

        The last axis is the stride-`dec_depth` channel interleave of enc2dec's output: decoder block k gets
        channels k, k+dec_depth, k+2*dec_depth, ... (official, not contiguous chunks).
        """
        x = self.pos_drop(self.patch_embed(imgs) + self.pos_embed)
        x = to_clusters(x, self.patch_embed.grid_size, self.cluster_size)[:, :-1].flatten(1, 2)
        taps = []
        for count, layer in enumerate(self.layers, start=1):
            x = run_block(layer, x, self.grad_checkpointing)
            if count in self.tap_layers:
                taps.append(getattr(self, f"norm_{len(taps) + 1}")(x))
        features = self.enc2dec(torch.cat(taps, dim=-1))
        return features.reshape(*features.shape[:2], self.dec_embed_dim, len(self.dec_block))

    def forward_decoder(self, latent):
        """Position-only queries for clusters 1..K-1 attend block-causally to the encoder features."""
        queries = to_clusters(self.ar_token + self.dec_pos_embed, self.patch_embed.grid_size, self.cluster_size)
        query = queries[:, 1:].flatten(1, 2).expand(latent.shape[0], -1, -1)
        for k, block in enumerate(self.dec_block):
            query = block(query, latent[..., k], self.mask)
        return self.ar_pred(self.ar_norm(query))

    def patchify(self, imgs):
        """`(B, c, H, W)` -> `(B, G*G, p*p*c)`, per patch ordered (pixel-row, pixel-col, channel)."""
        p, grid = self.patch_embed.patch_size, self.patch_embed.grid_size
        x = imgs.reshape(imgs.shape[0], self.channels, grid, p, grid, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(imgs.shape[0], grid * grid, p * p * self.channels)

    def forward_loss(self, imgs, pred):
        """Squared error per (sample, token, pixel) against the targets of clusters 1..K-1."""
        target = self.patchify(imgs)
        if self.normalize_target:  # unbiased variance, eps inside the sqrt (official)
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        target = to_clusters(target, self.patch_embed.grid_size, self.cluster_size)[:, 1:].flatten(1, 2)
        return (pred - target) ** 2

    def forward(self, imgs):
        """Per-token loss `(num_steps,)`: mean over pixels, then over the batch (the engine takes `.mean()`)."""
        pred = self.forward_decoder(self.forward_features(imgs))
        return self.forward_loss(imgs, pred).mean(-1).mean(0)


def _xavier_init(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------
# Finetuning classifier
# ---------------------------------------------------------------------------------------------------

def _as_global_pool(value):
    """Official `global_pool` is a bool (True: two-half mean, False: cls token); kept as timm's 'avg' / 'token',
    plus timm's '' (no pooling: the head sees the whole token sequence)."""
    if isinstance(value, str):
        if value not in ("avg", "token", ""):
            raise ValueError(f"ARM global_pool must be True/False, 'avg', 'token' or '', got {value!r}")
        return value
    return "avg" if value else "token"


class ARM(TokenFeatures, nn.Module):
    """ARM finetune classifier (SPEC 4): cls token inserted at index N//2, four-direction Mamba-1 blocks.

    `global_pool=True` ('avg') pools `(mean(tokens before cls) + mean(tokens after cls)) / 2`, False ('token')
    takes the cls token, '' keeps the token sequence.
    `official_drop_path=True` keeps the official `[0] + linspace` drop-path list (SPEC 9 item 3).
    `dynamic_img_size=True` accepts any input with a square patch grid, resampling the position table to it
    (timm's ViT flag); the cls token stays at N // 2 of that grid.

    Odd patch counts (e.g. a 15x15 grid): the v3 mixer places the cls slot at `L//2 = (N+1)//2` while the model
    inserts it at `N//2`, so the column-order scans treat one patch as the cls (official, SPEC 9 item 6).
    Even grids (14x14 at 224, 24x24 at 384) are unaffected.
    """

    cls_layout = "middle"
    square_grid_only = True

    def __init__(self, img_size=224, patch_size=16, stride=None, depth=24, embed_dim=192, channels=3,
                 num_classes=1000, ssm_cfg=None, drop_rate=0.0, drop_path_rate=0.1, bimamba_type="v3",
                 global_pool=False, official_drop_path=True, in_chans=None, dynamic_img_size=False, **kwargs):
        super().__init__()
        _check_official_flags(kwargs, type(self).__name__)
        channels = in_chans if in_chans is not None else channels  # timm passes in_chans
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = _make_patch_embed(img_size, patch_size, stride, channels, embed_dim,
                                             strict_img_size=not dynamic_img_size)
        num_patches = self.patch_embed.num_patches
        _warn_if_odd(num_patches)
        self.num_classes = num_classes
        self.in_chans = channels
        self.global_pool = _as_global_pool(global_pool)
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        rates = drop_path_rates(drop_path_rate, depth, official_offset=official_drop_path)
        self.layers = nn.ModuleList(
            [Block(embed_dim, bimamba_type, drop_path=rates[i], layer_idx=i, ssm_cfg=ssm_cfg) for i in range(depth)])
        self.norm_f = nn.LayerNorm(embed_dim)
        self.grad_checkpointing = False
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        init_classifier_official(self, n_layer=depth)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}

    def reset_classifier(self, num_classes, global_pool=None):
        if global_pool is not None:
            self.global_pool = _as_global_pool(global_pool)
        self._replace_head(num_classes)

    def set_input_size(self, img_size=None, patch_size=None):
        super().set_input_size(img_size, patch_size)
        _warn_if_odd(self.patch_embed.num_patches)

    def forward_head(self, x, pre_logits=False):
        t = (x.shape[1] - 1) // 2  # N // 2 of this input's N patches (dynamic_img_size)
        if self.global_pool == "avg":
            x = (x[:, :t].mean(1) + x[:, t + 1:].mean(1)) / 2
        elif self.global_pool == "token":
            x = x[:, t]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------
# Pretrain -> finetune transfer and checkpoint filter
# ---------------------------------------------------------------------------------------------------

# Single-direction mixer parameter -> name pattern of the same parameter for direction suffix {s}.
_MIXER_DIRECTION_NAMES = {
    "A_log": "A{s}_log", "D": "D{s}",
    "conv1d.weight": "conv1d{s}.weight", "conv1d.bias": "conv1d{s}.bias", "x_proj.weight": "x_proj{s}.weight",
    "dt_proj.weight": "dt_proj{s}.weight", "dt_proj.bias": "dt_proj{s}.bias",
}
_MIXER_KEY = re.compile(r"^(layers\.\d+\.mixer\.)(.+)$")
_PRETRAIN_ONLY_KEY = re.compile(r"^(mask|ar_token|dec_pos_embed|(enc2dec|dec_block|norm_\d+|ar_norm|ar_pred)\..+)$")


def is_pretrain_state_dict(state_dict):
    """A pretraining state dict has single-direction mixers (no `A_b_log`) and no cls token."""
    return "cls_token" not in state_dict and not any(".mixer.A_b_log" in k for k in state_dict)


def pretrain_to_finetune(state_dict, model):
    """Official pretrain -> finetune transfer (SPEC 4.4, 11.6) for `model` (an `ARM`).

    Every direction `_b/_c/_c_b` of each mixer starts as a copy of the single pretrained direction (explicit
    name map, not the official 'A'/'D' substring replacement); `pos_embed` (1, G0*G0, C) is resized bicubic
    (antialias=False) to the model grid and gets a zero row at N//2; decoder-side keys are dropped.
    `cls_token`, `head.*` and `norm_f.*` are left for the caller (fresh init; see `init_head_for_finetune`).
    """
    out = {}
    for key, value in state_dict.items():
        if _PRETRAIN_ONLY_KEY.match(key):
            continue
        out[key] = value
        match = _MIXER_KEY.match(key)
        if match and match.group(2) in _MIXER_DIRECTION_NAMES:
            prefix, pattern = match.group(1), _MIXER_DIRECTION_NAMES[match.group(2)]
            for suffix in V3_DIRECTIONS[1:]:
                out[prefix + pattern.format(s=suffix)] = value
    if "pos_embed" in out:
        grid = model.patch_embed.grid_size
        table = resize_pos_embed(out["pos_embed"], (grid, grid), cls_position="none")
        out["pos_embed"] = insert_token(table, model.cls_index)
    return out


def init_head_for_finetune(model):
    """Official re-init of the classifier after the transfer: head weight trunc-normal std 2e-5."""
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=2e-5)


def checkpoint_filter_fn(state_dict, model):
    """Adapt an official checkpoint for `model` (timm `pretrained_filter_fn`).

    Accepts a bare state dict or a container (`model`, `model_ema`, ...; `module.` prefixes stripped). A
    PRETRAINING checkpoint goes through `pretrain_to_finetune`; the keys it leaves out (`cls_token`, `head.*`,
    `norm_f.*`) are taken from the model after `init_head_for_finetune`, so the result loads strictly.
    A finetuned checkpoint at another resolution gets its pos_embed resized (cls slot kept at N//2).
    """
    state_dict = extract_state_dict(state_dict)
    if is_pretrain_state_dict(state_dict):
        state_dict = pretrain_to_finetune(state_dict, model)
        init_head_for_finetune(model)
        for key, value in model.state_dict().items():
            state_dict.setdefault(key, value)
    elif "pos_embed" in state_dict and state_dict["pos_embed"].shape != model.pos_embed.shape:
        grid = model.patch_embed.grid_size
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], (grid, grid), cls_position="middle")
    return state_dict


# ---------------------------------------------------------------------------------------------------
# Builders and timm registry
# ---------------------------------------------------------------------------------------------------

def _config(name):
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown ARM model '{name}'; valid names: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name]


def create_pretrain_model(name, **kwargs):
    """Pretraining `VisionMamba` for an official name (192 px, decoder 512; kwargs override)."""
    return VisionMamba(**{**_config(name), **kwargs})


def create_finetune_model(name, **kwargs):
    """Finetune `ARM` classifier for an official name (kwargs: num_classes, img_size, drop_path_rate, global_pool)."""
    return ARM(**{**_config(name), **kwargs})


def _cfg(input_size):
    """The official finetune eval transform (SPEC 8.2): SQUARE resize of both sides to int(size / crop_pct),
    bicubic, centre crop; crop_pct = 224/256 up to 224 px, else 1.0."""
    return dict(
        url="", num_classes=1000, input_size=(3, input_size, input_size), pool_size=None,
        crop_pct=224 / 256 if input_size <= 224 else 1.0, crop_mode="squash", interpolation="bicubic",
        fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj", classifier="head", license="unknown",  # the repository states no license
        paper_ids="arXiv:2406.07537", paper_name="Autoregressive Pretraining with Mamba in Vision",
        origin_url="https://github.com/OliverRensu/ARM", hf_hub_id="OliverRen/ARM")


# The released finetuned classifiers (README: 83.2 base, 85.0 huge, 85.5 huge at 384): input size and the
# pooling their head was trained with, applied at creation. The README finetunes base and large with
# `--global_pool True` (mean of the two halves); it gives no huge command, which is taken to be the same.
# The README links only the hub repository, not its file names, so none is recorded: pretrained=True needs
# pretrained_cfg_overlay=dict(file=PATH) (see _create_arm).
_RELEASED = {
    "arm_base_pz16.in1k": (224, "avg"),
    "arm_large_pz16.in1k": (224, "avg"),
    "arm_huge_pz16.in1k": (224, "avg"),
    "arm_huge_pz16.in1k_384": (384, "avg"),
}
default_cfgs = generate_default_cfgs({name: _cfg(size) for name, (size, _) in _RELEASED.items()})


def _create_arm(variant, pretrained=False, **kwargs):
    out_indices = kwargs.pop("out_indices", 3)
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    released = _RELEASED.get(f"{cfg.architecture}.{cfg.tag}")
    if released is not None:
        kwargs.setdefault("global_pool", released[1])
    if pretrained and not (cfg.file or cfg.url or cfg.hf_hub_filename or cfg.state_dict):
        raise ValueError(f"pretrained=True: the released ARM files are not named anywhere public (the official "
                         f"README links only https://huggingface.co/{cfg.hf_hub_id}); download the file and pass "
                         f"pretrained_cfg_overlay=dict(file=PATH)")
    # timm's create_model(device=..., dtype=...): allocate on that device (meta builds cost nothing), then cast.
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(ARM, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                     feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                     **{**MODEL_CONFIGS[variant], **kwargs})
    return model.to(dtype=dtype) if dtype is not None else model


@register_model
def arm_base_pz16(pretrained=False, **kwargs) -> ARM:
    return _create_arm("arm_base_pz16", pretrained, **kwargs)


@register_model
def arm_large_pz16(pretrained=False, **kwargs) -> ARM:
    return _create_arm("arm_large_pz16", pretrained, **kwargs)


@register_model
def arm_huge_pz16(pretrained=False, **kwargs) -> ARM:
    return _create_arm("arm_huge_pz16", pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------------
# CLI: convert a pretraining checkpoint into a finetune-ready one
# ---------------------------------------------------------------------------------------------------

def convert_pretrain_checkpoint(src, dst, model_name="arm_base_pz16", input_size=224, num_classes=1000,
                                key="model", seed=0):
    """Write `{'model': sd}` that loads strictly into `create_finetune_model(model_name, img_size=input_size)`:
    transferred encoder, fresh cls_token/norm_f, head with the official 2e-5 init."""
    torch.manual_seed(seed)
    model = create_finetune_model(model_name, img_size=input_size, num_classes=num_classes)
    state_dict = extract_state_dict(load_checkpoint_file(src), key=key)
    if not is_pretrain_state_dict(state_dict):
        raise CheckpointError(f"{src}: not an ARM pretraining checkpoint (it already has a cls token or "
                              f"four-direction mixers)")
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    save_checkpoint({"model": model.state_dict()}, dst)
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(description="ARM model utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="pretraining checkpoint -> finetune-ready {'model': sd}")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--model", default="arm_base_pz16", choices=sorted(MODEL_CONFIGS))
    convert.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=224)
    convert.add_argument("--nb-classes", "--nb_classes", dest="nb_classes", type=int, default=1000)
    convert.add_argument("--key", default="model", help="checkpoint entry holding the weights")
    convert.add_argument("--seed", type=int, default=0, help="seed of the fresh cls/head/norm_f init")
    args = parser.parse_args(argv)
    try:
        convert_pretrain_checkpoint(args.src, args.dst, args.model, args.input_size, args.nb_classes, args.key,
                                    args.seed)
    except (CheckpointError, ValueError, RuntimeError) as err:
        raise SystemExit(f"convert failed: {err}") from None
    print(f"wrote {args.dst} ({args.model} at {args.input_size}px, {args.nb_classes} classes)")


if __name__ == "__main__":
    sys.exit(main())
