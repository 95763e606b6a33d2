"""Small model blocks and helpers shared by the Adventurer and ARM models.

They keep the official parameter names (``proj``, ``w1/w2/w3``) so official checkpoints load strictly,
and the official initialisers (timm 0.4.12 semantics, SPEC 2.3) so from-scratch runs start alike.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_patch_embed, trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from advarm.checkpoint import resize_pos_embed

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
    """Non-overlapping patches -> ``(B, N, C)`` tokens in raster order.

    ``grid_size`` is an int (official): the square grid of the size the model is built at. With
    ``strict_img_size=True`` another input size is an error; ``False`` (the models' ``dynamic_img_size``)
    accepts any size, whose grid ``feat_size`` gives. ``set_input_size`` changes the built size in place.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, strict_img_size=True):
        super().__init__()
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self._set_geometry(img_size, patch_size)

    def _set_geometry(self, img_size, patch_size):
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = self.feat_size(img_size, img_size)[0]
        self.num_patches = self.grid_size ** 2

    def feat_size(self, height, width):
        """Patch grid (rows, columns) of an input of this size (trailing pixels that fill no patch are dropped)."""
        return (height - self.patch_size) // self.patch_size + 1, (width - self.patch_size) // self.patch_size + 1

    def set_input_size(self, img_size=None, patch_size=None):
        """New built size and/or patch size; the kernel is resampled with timm's ``resample_patch_embed``
        (its defaults, as timm's PatchEmbed.set_input_size: bicubic, antialiased)."""
        img_size = self.img_size if img_size is None else square_img_size(img_size, "PatchEmbed")
        patch_size = self.patch_size if patch_size is None else square_img_size(patch_size, "PatchEmbed patch")
        if patch_size != self.patch_size:
            old = self.proj
            self.proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=patch_size, stride=patch_size,
                                  device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                self.proj.weight.copy_(resample_patch_embed(old.weight, [patch_size, patch_size]))
                self.proj.bias.copy_(old.bias)
            self.proj.requires_grad_(old.weight.requires_grad)
            self.proj.train(old.training)
        self._set_geometry(img_size, patch_size)

    def forward(self, x):
        height, width = x.shape[-2:]
        if self.strict_img_size and (height, width) != (self.img_size, self.img_size):
            raise ValueError(
                f"input size {height}x{width} does not match the model's img_size "
                f"{self.img_size}x{self.img_size}; build the model with img_size={height} "
                f"(or dynamic_img_size=True, or call set_input_size)"
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
    With `dynamic_img_size` the position table is resampled on the fly to each input's patch grid, as timm's
    ViT does; `set_input_size` resamples it once, in place.
    """

    cls_layout = "last"  # where the class token sits: "last" or "middle" (index N // 2), as resize_pos_embed says
    square_grid_only = False  # True: only square patch grids can run (ARM's column-order scans)

    @property
    def cls_index(self):
        """Sequence position of the class token at the built input size."""
        return self._cls_slot(self.patch_embed.num_patches)

    def _cls_slot(self, num_patches):
        return num_patches if self.cls_layout == "last" else num_patches // 2

    @torch.jit.ignore
    def set_input_size(self, img_size=None, patch_size=None):
        """Rebuild for another input size and/or patch size in place (the API of timm's ViT).

        The position table is resampled as the checkpoint filters resample it when weights are loaded at
        another size (bicubic, antialias off, class token kept in its family's slot), so the model equals
        one built at the new size from resized weights. timm's ViT resamples with antialias on, which
        differs only when the grid shrinks.
        """
        old = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size, patch_size)
        new = self.patch_embed.grid_size
        if new != old:
            with torch.no_grad():
                table = resize_pos_embed(self.pos_embed, (new, new), (old, old), cls_position=self.cls_layout)
            self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        for info in self.feature_info:
            info["reduction"] = self.patch_embed.patch_size

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

    def _input_grid(self, x):
        """Patch grid (rows, columns) of this input: the built grid, or with dynamic_img_size the input's own."""
        if not self.dynamic_img_size:
            return self.patch_embed.grid_size, self.patch_embed.grid_size
        grid = self.patch_embed.feat_size(*x.shape[-2:])
        if self.square_grid_only and grid[0] != grid[1]:
            raise ValueError(f"{type(self).__name__} needs a square patch grid (its four-direction scan reads the "
                             f"grid by columns too), got a {grid[0]}x{grid[1]} grid from a "
                             f"{x.shape[-2]}x{x.shape[-1]} input")
        return grid

    def _embed(self, x):
        """Patch tokens with the class token inserted at its slot, plus position embedding and dropout."""
        grid = self._input_grid(x)
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        t = self._cls_slot(grid[0] * grid[1])
        x = torch.cat([x[:, :t], cls, x[:, t:]], dim=1)
        return self.pos_drop(x + self._pos_embed_for(grid))

    def _pos_embed_for(self, grid):
        """The position table, resampled to `grid` when that is not the built one (dynamic_img_size)."""
        built = self.patch_embed.grid_size
        if grid == (built, built):
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, (built, built), cls_position=self.cls_layout)

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
        grid = self._input_grid(x)
        x = self._embed(x)
        taken = []
        for i, layer in enumerate(layers):
            x = run_block(layer, x, self.grad_checkpointing)
            if i in take_indices:
                taken.append(self.norm_f(x) if norm else x)
        t = self._cls_slot(grid[0] * grid[1])
        intermediates = [torch.cat([y[:, :t], y[:, t + 1:]], dim=1) for y in taken]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
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
