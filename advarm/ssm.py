"""Selective-scan (Mamba-1) and SSD (Mamba-2) mixers.

`Mamba2` is the Adventurer mixer (mamba-ssm 2.0.4 `Mamba2` with d_state 64) and `Mamba1` the ARM mixer
(Vim's `Mamba` plus ARM's four-direction "v3" branch). Parameter names, order, shapes and the
module-level initialisation follow the official classes so official checkpoints load strictly.
Each forward asks `advarm.kernels` whether the mamba-ssm kernels run on its tensors and otherwise uses
the PyTorch scans of `advarm.scans`; both give the same numbers.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from advarm.kernels import causal_conv1d_layout, kernels_for, split_conv1d_scan_accepts
from advarm.scans import selective_scan_of, ssd_chunked

__all__ = ["Mamba2", "Mamba1", "GatedRMSNorm", "column_order", "V3_DIRECTIONS"]


def _causal_conv1d_silu(x, weight, bias, kernels=None):
    """SiLU(depthwise causal conv) over the last axis of x (b, c, l), left zero padding of kernel-1.

    Uses causal-conv1d's CUDA kernel when the kernels are in use and it is installed, on a copy where
    x's layout is one the kernel rejects (a channel-last view whose strides are not multiples of 8).
    """
    if kernels is not None and kernels.causal_conv1d is not None:
        return kernels.causal_conv1d(causal_conv1d_layout(x), weight.squeeze(1), bias, activation="silu")
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]])


# ----------------------------------------------------------------------------------------------------
# Mamba-2 (Adventurer)
# ----------------------------------------------------------------------------------------------------

def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _log_uniform_dt(n, dt_min, dt_max, dt_init_floor, **factory_kwargs):
    """Step sizes log-uniform in [dt_min, dt_max], floored (the official dt bias initialisation)."""
    dt = torch.exp(torch.rand(n, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=dt_init_floor)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * SiLU(z)) per group of channels, float32 math, result in x's dtype.

    mamba-ssm's layernorm_gated.RMSNorm with norm_before_gate=False (gate first, then normalise).
    """

    def __init__(self, dim, eps=1e-5, group_size=None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x, z):
        gated = x.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(x.dtype)


class Mamba2(nn.Module):
    """Mamba-2 mixer of Adventurer: in_proj -> [z | xBC | dt], causal conv + SiLU on xBC, SSD with a
    scalar decay per head and a D skip, gated RMSNorm with z, out_proj. Parameters in official order:
    dt_bias, A_log, D, in_proj, conv1d, norm, out_proj.
    """

    def __init__(self, d_model, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, norm_eps=1e-5, layer_idx=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim or self.d_inner // headdim % ngroups:
            raise ValueError(f"d_inner={self.d_inner} must split into heads of {headdim} and {ngroups} groups")
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.nheads = self.d_inner // headdim
        self.layer_idx = layer_idx
        conv_dim = self.d_inner + 2 * ngroups * d_state
        # creation order = official order, so a seed draws the same initial weights
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias,
                                 **factory_kwargs)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias,
                                **factory_kwargs)
        dt = _log_uniform_dt(self.nheads, dt_min, dt_max, dt_init_floor, **factory_kwargs)
        self.dt_bias = nn.Parameter(_inverse_softplus(dt))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def forward(self, u):
        """u (B, L, d_model) -> (B, L, d_model), any L >= 1."""
        batch, seqlen, _ = u.shape
        zxbcdt = self.in_proj(u)
        A = -torch.exp(self.A_log.float())
        kernels = kernels_for("Mamba2", zxbcdt)
        conv_dim = self.conv1d.weight.shape[0]
        if (kernels is not None and kernels.split_conv1d_scan is not None
                and split_conv1d_scan_accepts(zxbcdt.shape[-1], conv_dim)):
            return kernels.split_conv1d_scan(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A, D=self.D,
                chunk_size=self.chunk_size, activation="silu", rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
                headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False)
        groups_dim = self.ngroups * self.d_state
        z, xBC, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * groups_dim, self.nheads], dim=-1)
        xBC = _causal_conv1d_silu(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, kernels).transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, groups_dim, groups_dim], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = B.unflatten(-1, (self.ngroups, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        if kernels is not None:  # Triton SSD (no fused path: no causal_conv1d extension, or widths it rejects)
            y = kernels.chunk_scan(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float())
            y = ssd_chunked(x, dt, A, B, C, self.chunk_size) + x.float() * self.D.float()[:, None]
        y = self.norm(y.flatten(-2).to(zxbcdt.dtype), z)
        return self.out_proj(y)


# ----------------------------------------------------------------------------------------------------
# Mamba-1 (ARM)
# ----------------------------------------------------------------------------------------------------

V3_DIRECTIONS = ("", "_b", "_c", "_c_b")  # forward, backward, column-major, column-major backward


def column_order(seq_len: int) -> torch.Tensor:
    """ARM v3 column-major order: position q of the new sequence holds token column_order[q].

    The token at L//2 (cls) stays in place; the other L-1 tokens form a square grid in raster order
    which is transposed. The map is an involution. Raises ValueError unless L-1 is a perfect square.
    """
    side = math.isqrt(seq_len - 1)
    if seq_len < 2 or side * side != seq_len - 1:
        raise ValueError(f"ARM v3 scan needs a cls token plus a square grid of tokens, got sequence length {seq_len}")
    cls = seq_len // 2
    patch_positions = torch.arange(seq_len - 1)
    patch_positions += patch_positions >= cls  # skip the cls slot
    transposed = patch_positions.view(side, side).T.reshape(-1)
    return torch.cat([transposed[:cls], torch.tensor([cls]), transposed[cls:]])


@functools.lru_cache(maxsize=32)
def _direction_rows(seq_len: int, batch: int, device: torch.device):
    """Row indices for the four v3 scans: (4, b, L) rows of the flattened (b*L, C) input in each scan's
    order, and (4, b, L) rows of the flattened (4*b*L, C) scan outputs in raster order."""
    forward, columns = torch.arange(seq_len), column_order(seq_len)
    orders = torch.stack([forward, forward.flip(0), columns, columns.flip(0)])
    starts = seq_len * torch.arange(4 * batch).view(4, batch, 1)  # first row of each (direction, sample)
    return (orders[:, None] + starts[0]).to(device), (orders.argsort(dim=1)[:, None] + starts).to(device)


class Mamba1(nn.Module):
    """Mamba-1 mixer of ARM. bimamba_type="v3" runs four scans (forward, backward, column-major and its
    reverse) with their own conv/x_proj/dt_proj/A/D but shared in_proj and out_proj, and averages them;
    any other value is the plain unidirectional Mamba. The directions are gathered with one index
    tensor and stacked along channels, so the four scans are one scan call.

    Initialisation follows the official code: the base dt_proj gets the special weight/bias init (bias
    flagged `_no_reinit`); the `_b/_c/_c_b` dt_proj layers keep PyTorch's default Linear init and no flag
    (so a model-level bias reset zeroes them, as officially) - SPEC 1.6 says "same scheme", the code not.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=1, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 bimamba_type="none", layer_idx=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.bimamba_type = bimamba_type
        self.layer_idx = layer_idx
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.directions = V3_DIRECTIONS if bimamba_type == "v3" else V3_DIRECTIONS[:1]

        def conv():
            return nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                             bias=conv_bias, **factory_kwargs)

        def x_proj():
            return nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs)

        def dt_proj():
            return nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        def s4d_real_A_log():  # A[d, n] = n + 1, kept as log in float32
            A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
            return self._no_decay(nn.Parameter(torch.log(A)))

        def ones_D():
            return self._no_decay(nn.Parameter(torch.ones(self.d_inner, device=device)))

        # creation order = official order (same seed -> same weights; same state_dict order)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory_kwargs)
        self.conv1d, self.x_proj, self.dt_proj = conv(), x_proj(), dt_proj()
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            self.dt_proj.bias.copy_(_inverse_softplus(_log_uniform_dt(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                                      **factory_kwargs)))
        self.dt_proj.bias._no_reinit = True
        self.A_log, self.D = s4d_real_A_log(), ones_D()
        for suffix in self.directions[1:]:
            setattr(self, f"A{suffix}_log", s4d_real_A_log())
            setattr(self, f"conv1d{suffix}", conv())
            setattr(self, f"x_proj{suffix}", x_proj())
            setattr(self, f"dt_proj{suffix}", dt_proj())
            setattr(self, f"D{suffix}", ones_D())
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    @staticmethod
    def _no_decay(param):
        param._no_weight_decay = True
        return param

    def _direction_params(self):
        """Every direction's conv/x_proj/dt_proj/A/D parameters, grouped by kind (`_PARAMS` order)."""
        def get(name, suffix):
            if name in ("A", "D"):
                return getattr(self, f"{name}{suffix}_log" if name == "A" else f"{name}{suffix}")
            module_name, attr = name.split(".")
            return getattr(getattr(self, f"{module_name}{suffix}"), attr)
        return [get(name, suffix) for name in self._PARAMS for suffix in self.directions]

    _PARAMS = ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A", "D")

    def forward(self, hidden_states):
        """hidden_states (B, L, C) -> (B, L, C). v3 expects the cls token at L//2 and L-1 square."""
        xz = self.in_proj(hidden_states)  # (b, l, 2d)
        kernels = kernels_for("Mamba1", xz)
        if kernels is not None:
            y = self._kernel_scan(kernels, xz, self._direction_params())
        else:  # training keeps only xz (and the parameters); the rest is recomputed in backward
            y = selective_scan_of(self._scan_inputs, xz, *self._direction_params())
        ndir, (batch, seqlen, _) = len(self.directions), xz.shape
        if ndir > 1:  # each direction's outputs back in raster order, averaged (indexing keeps no activations)
            y = y.flatten(0, 2)[_direction_rows(seqlen, batch, xz.device)[1]].sum(0) / ndir
        else:
            y = y[0]
        return self.out_proj(y.to(xz.dtype))

    def _scan_inputs(self, xz, *params):
        """(u, delta, A, B, C, D, z, delta_bias) of the selective scan for all k directions at once, in
        the scan's (k, b, l, .) layout: tokens gathered in each direction's order, causal conv + SiLU,
        x_proj, dt_proj without its bias (the scan adds it before the softplus, as the kernels do).
        params: `_direction_params()`, stacked here so that backward keeps the parameters, not copies.
        """
        ndir, (batch, seqlen, _) = len(self.directions), xz.shape
        stacked = [torch.cat(params[i:i + ndir]) if ndir > 1 else params[i] for i in range(0, len(params), ndir)]
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D = stacked
        if ndir > 1:
            xz = xz.flatten(0, 1)[_direction_rows(seqlen, batch, xz.device)[0]]  # (k, b, l, 2d)
        else:
            xz = xz[None]
        x, z = xz.chunk(2, dim=-1)
        conv = _causal_conv_tokens(x.float(), conv_weight.view(ndir, self.d_inner, -1), conv_bias.view(ndir, 1, 1, -1))
        u = F.silu(conv)
        u_proj = u.to(x_proj_weight.dtype).flatten(1, 2)  # a bfloat16 model projects in bfloat16
        x_dbl = u_proj @ x_proj_weight.view(ndir, -1, self.d_inner).mT  # (k, b*l, R+2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ dt_proj_weight.view(ndir, self.d_inner, self.dt_rank).mT
        tokens = (ndir, batch, seqlen, -1)
        A = -torch.exp(A_log.float()).view(ndir, self.d_inner, -1)
        return (u, delta.view(tokens), A, B.reshape(tokens), C.reshape(tokens), D.float().view(ndir, -1), z,
                dt_proj_bias.float().view(ndir, -1))

    def _kernel_scan(self, kernels, xz, params):
        """The mamba-ssm CUDA selective scan on the same inputs, channels first: (k, b, l, d) result."""
        u, delta, A, B, C, D, z, bias = self._scan_inputs(xz, *params)
        ndir, batch, seqlen, _ = u.shape
        dtype = xz.dtype  # the CUDA kernel wants u, delta, B, C, z in one dtype

        def channels_first(t):  # (k, b, l, c) -> (b, k*c, l)
            return t.to(dtype).permute(1, 0, 3, 2).reshape(batch, -1, seqlen)

        y = kernels.selective_scan(channels_first(u), channels_first(delta), A.flatten(0, 1),
                                   B.to(dtype).permute(1, 0, 3, 2).contiguous(),
                                   C.to(dtype).permute(1, 0, 3, 2).contiguous(), D.flatten(),
                                   z=channels_first(z), delta_bias=bias.flatten(), delta_softplus=True)
        return y.view(batch, ndir, self.d_inner, seqlen).permute(1, 0, 3, 2)


def _causal_conv_tokens(x, weight, bias):
    """Depthwise causal conv along the tokens of x (k, b, l, d): weight (k, d, w), bias (k, 1, 1, d),
    left zero padding of w-1. One shifted multiply-add per tap, in place: no padded or channels-first copy
    (the taps are made contiguous: strided broadcast operands run ~5x slower on CPUs)."""
    taps = weight.float().permute(2, 0, 1).flip(0).contiguous()[:, :, None, None]  # taps[s] (k,1,1,d): x_{t-s}
    out = torch.addcmul(bias.float(), taps[0], x)
    for shift in range(1, min(len(taps), x.shape[2])):
        out[:, :, shift:].addcmul_(taps[shift], x[:, :, :-shift])
    return out
