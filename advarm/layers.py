"""Small model blocks and helpers shared by the Adventurer and ARM models.

They keep the official parameter names (``proj``, ``w1/w2/w3``) so official checkpoints load strictly,
and the official initialisers (timm 0.4.12 semantics, SPEC 2.3) so from-scratch runs start alike.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

# timm 0.4.12 divided the lecun std by this constant (std of a +-2 sigma truncated unit normal).
_TRUNC_STD_CORRECTION = 0.87962566103423978


class SwiGLU(nn.Module):
    """Gated MLP ``w3(SiLU(w1 x) * w2 x)`` with the official ``w1/w2/w3`` names (timm's SwiGLU renames them)."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.w1 = nn.Linear(in_features, hidden_features)
        self.w2 = nn.Linear(in_features, hidden_features)
        self.ffn_ln = nn.Identity()  # official subln=False: present as a name, no parameters
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


def square_img_size(img_size, model_name):
    """timm passes ``input_size[-2:]`` as img_size; the official models take square inputs only."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"{model_name} needs a square input, got img_size={tuple(img_size)}")
        return int(img_size[0])
    return int(img_size)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> ``(B, N, C)`` tokens in raster order, for one fixed square input size.

    ``grid_size`` is an int (official); models are built per resolution, so a wrong input size is an error.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size - patch_size) // patch_size + 1
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        height, width = x.shape[-2:]
        if (height, width) != (self.img_size, self.img_size):
            raise ValueError(
                f"input size {height}x{width} does not match the model's img_size "
                f"{self.img_size}x{self.img_size}; build the model with img_size={height}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_path_rates(drop_path_rate, depth, official_offset=True):
    """Per-layer stochastic-depth rates.

    The official lists are ``[0] + linspace(0, rate, depth)`` indexed by layer (SPEC 9 item 3): the first
    two layers get 0 and the nominal maximum is never reached. ``official_offset=False`` gives the usual
    ``linspace(0, rate, depth)``.
    """
    # float32 torch.linspace like the official lists; on the CPU even inside a `torch.device("meta")` block
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
    if official_offset:
        rates = [0.0] + rates[:-1]
    return rates


def lecun_normal_official_(tensor):
    """timm 0.4.12 ``lecun_normal_``: normal with std sqrt(1/fan_in)/0.8796, truncated at ABSOLUTE +-2.

    Current timm truncates at +-2 sigma instead (a narrower distribution), see ECOSYSTEM.md.
    """
    fan_in = tensor[0].numel()  # in_channels * receptive field
    return trunc_normal_(tensor, std=math.sqrt(1.0 / fan_in) / _TRUNC_STD_CORRECTION)


def init_weights_official(module, n_layer):
    """One step of the official ``self.apply`` init walk (mamba-ssm ``_init_weights``, SPEC 2.3 step 4).

    Linear biases -> 0 unless flagged ``_no_reinit``; a module owning ``out_proj.weight`` or ``fc2.weight``
    (the SSM mixer, an MLP) gets that weight re-drawn kaiming-uniform(a=sqrt 5) and scaled by 1/sqrt(n_layer),
    the GPT-2 rescaling of residual-branch outputs.
    """
    if isinstance(module, nn.Linear) and module.bias is not None:
        if not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    for name, param in module.named_parameters():
        if name in ("out_proj.weight", "fc2.weight"):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            with torch.no_grad():
                param /= math.sqrt(n_layer)


def init_classifier_official(model, n_layer):
    """Official init of a classifier with ``patch_embed``, ``head``, ``pos_embed`` and ``cls_token`` (SPEC 2.3, 4.3).

    Lecun-normal patch conv, trunc-normal (0.02) head, pos_embed and cls_token, then the
    ``init_weights_official`` walk; this order is the official RNG order, so a seed gives the official weights.
    """
    lecun_normal_official_(model.patch_embed.proj.weight)
    nn.init.zeros_(model.patch_embed.proj.bias)
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
    trunc_normal_(model.pos_embed, std=0.02)
    trunc_normal_(model.cls_token, std=0.02)
    model.apply(lambda module: init_weights_official(module, n_layer))


def run_block(block, x, grad_checkpointing):
    """``block(x)``, recomputed in backward (activation checkpointing) when asked for and gradients are on."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class TokenFeatures:
    """The part of timm's model interface that Adventurer and the ARM classifier share.

    Both models run `_embed` -> `layers` -> `norm_f` over patch tokens in raster order with one class token
    inserted at `cls_index` (Adventurer: the end; ARM: the middle). Intermediates are the block outputs
    without the class token, as NCHW maps (or NLC); `return_prefix_tokens` pairs each with its class token.
    """

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        """Layer-decay groups equal to the official `param_groups_lrd` (SPEC 6.3).

        head and norm_f match nothing, so timm puts them in the last group with scale 1.0 as the official
        rule does (timm's usual `^norm` -> last block pattern would give them layer_decay^1).
        """
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=r"^layers\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def _replace_head(self, num_classes):
        """A fresh head on the model's device/dtype and in its train/eval mode (num_classes 0: Identity)."""
        self.num_classes = num_classes
        like = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **like) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x):
        """Patch tokens with the class token inserted at `cls_index`, plus position embedding and dropout."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :self.cls_index], cls, x[:, self.cls_index:]], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x):
        """Images -> normalised token sequence (B, N+1, C), class token at `cls_index`."""
        x = self._embed(x)
        for layer in self.layers:
            x = run_block(layer, x, self.grad_checkpointing)
        return self.norm_f(x)

    def forward_intermediates(self, x, indices=None, return_prefix_tokens=False, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False):
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        x = self._embed(x)
        taken = []
        for i, layer in enumerate(layers):
            x = run_block(layer, x, self.grad_checkpointing)
            if i in take_indices:
                taken.append(self.norm_f(x) if norm else x)
        t, grid = self.cls_index, self.patch_embed.grid_size
        intermediates = [torch.cat([y[:, :t], y[:, t + 1:]], dim=1) for y in taken]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], grid, grid, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, [y[:, t:t + 1] for y in taken]))
        if intermediates_only:
            return intermediates
        return self.norm_f(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the layers after the last wanted intermediate (and optionally norm_f / head and pooling)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")  # timm convention: no head, no pooling
        return take_indices


def _sincos_1d(embed_dim, positions):
    """``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000^(-k / (embed_dim/2))`` (float64, MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.reshape(-1, 1).to(torch.float64) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos table ``(G*G, D)`` float32 in raster order, MAE/ARM channel order (SPEC 1.8).

    The first half of the channels encodes the COLUMN index and the second half the ROW index; timm's
    ``build_sincos2d_pos_embed`` interleaves differently, so it is not a drop-in replacement.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_2d_pos_embed needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1).float()
