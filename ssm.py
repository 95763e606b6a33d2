"""Selective-scan (Mamba-1) and SSD (Mamba-2) mixers with their kernel dispatch.

`Mamba2` is the Adventurer mixer (mamba-ssm 2.0.4 `Mamba2` with d_state 64) and `Mamba1` the ARM mixer
(Vim's `Mamba` plus ARM's four-direction "v3" branch). Parameter names, order, shapes and the
module-level initialisation follow the official classes so official checkpoints load strictly.

Two backends compute the same function:
* "torch": plain PyTorch, runs anywhere, differentiable, state math in float32 even under autocast.
* "mamba_ssm": the official fused CUDA/Triton kernels, used only for CUDA tensors.
"auto" (the default; env var SSM_BACKEND overrides it, `set_backend` overrides both) takes the kernels
when they can run on the given tensors and the torch path otherwise. mamba_ssm is imported lazily on
first use, with its package `__init__` bypassed: that file imports the CUDA extension, which a
Triton-only install (MAMBA_SKIP_CUDA_BUILD=TRUE) lacks although the Triton SSD kernels work.
"""
import contextlib
import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Mamba2", "Mamba1", "GatedRMSNorm", "ssd_chunked", "selective_scan", "column_order",
    "set_backend", "get_backend", "available_backends", "BackendUnavailableError",
]

BACKENDS = ("auto", "torch", "mamba_ssm")
INSTALL_HINT = "pip install mamba-ssm causal-conv1d --no-build-isolation  (on a machine with CUDA and nvcc)"
SCAN_CHUNK = 16  # tokens per chunk of the torch selective scan: (B, D, 16, N) states per step; shorter
# chunks mean fewer doubling steps per token (log2 16 = 4), which measured fastest on CPU (B=64, L=128)


class BackendUnavailableError(RuntimeError):
    """The requested SSM backend cannot run here; the message says why and what to install."""


# ----------------------------------------------------------------------------------------------------
# torch backend: the two scans
# ----------------------------------------------------------------------------------------------------

def _autocast_off(device_type: str):
    """Autocast disabled for the fp32 state math; devices without autocast (meta) need no context."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum_{j < k <= i} a[..., k] (0 on the diagonal), -inf for j > i.

    Sums the masked increments directly instead of differencing one cumsum, which keeps 256-long
    chunks accurate in float32 (as mamba-ssm's ssd_minimal does).
    """
    length = a.shape[-1]
    tril = torch.ones(length, length, dtype=torch.bool, device=a.device).tril
    increments = a.unsqueeze(-1).expand(*a.shape, length)  # [..., k, j] = a[k]
    sums = increments.masked_fill(~tril(-1), 0).cumsum(-2)  # [..., i, j] = sum_{j < k <= i} a[k]
    return sums.masked_fill(~tril(0), -math.inf)


def ssd_chunked(x, dt, A, B, C, chunk_size=256):
    """Mamba-2 SSD: y_t = sum_{s<=t} (C_t . B_s) exp(A * sum_{s<r<=t} dt_r) dt_s x_s, without the D skip.

    x (b, l, h, p), dt (b, l, h) (already softplus-ed), A (h,), B and C (b, l, g, n) with the h heads
    split into g groups. Computed as in mamba-ssm's ssd_minimal: an attention-like quadratic form
    inside chunks, plus states passed between chunks by a small (chunks x chunks) decay matrix; no
    loop over tokens or chunks. Everything runs in float32 with autocast off. Returns float32 y.
    """
    with _autocast_off(x.device.type):
        x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
        batch, seqlen, nheads, headdim = x.shape
        ngroups, dstate = B.shape[-2:]
        chunk = min(chunk_size, seqlen)  # a single short chunk is exact: no padding to 256 needed
        pad = -seqlen % chunk
        if pad:  # zero input and dt=0 (no decay) after the end: the real tokens are unaffected
            x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        nchunks = (seqlen + pad) // chunk
        heads = (ngroups, nheads // ngroups)
        xdt = (x * dt[..., None]).view(batch, nchunks, chunk, *heads, headdim)
        B = B.view(batch, nchunks, chunk, ngroups, dstate)
        C = C.view(batch, nchunks, chunk, ngroups, dstate)
        log_decay = (dt * A).view(batch, nchunks, chunk, *heads).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
        cum = log_decay.cumsum(-1)

        # 1. outputs from inputs of the same chunk
        scores = torch.einsum("bcign,bcjgn->bgcij", C, B)[:, :, None] * torch.exp(_segsum(log_decay))
        y = torch.einsum("bgrcij,bcjgrp->bcigrp", scores, xdt)
        # 2. state each chunk leaves behind from its own inputs
        decay_to_end = torch.exp(cum[..., -1:] - cum)
        states = torch.einsum("bcjgn,bgrcj,bcjgrp->bcgrpn", B, decay_to_end, xdt)
        # 3. state entering each chunk: decayed sum of all earlier chunks' states
        chunk_decay = torch.exp(_segsum(F.pad(cum[..., -1], (1, 0))))[..., :-1, 1:]  # [z, j]: chunk j -> z
        entering = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
        # 4. outputs from the entering state
        y = y + torch.einsum("bcign,bcgrpn,bgrci->bcigrp", C, entering, torch.exp(cum))
        return y.reshape(batch, nchunks * chunk, nheads, headdim)[:, :seqlen]


def _linear_scan(decay, value):
    """All h_t = decay_t h_{t-1} + value_t (h_{-1} = 0) along dim -2, and the running products of decay.

    Log-depth (Hillis-Steele) doubling over (decay, value) pairs: every decay is <= 1, so no step can
    overflow, unlike cumsum-of-exp formulations.
    """
    length, step = value.shape[-2], 1
    value, decay = value.clone(), decay.clone()  # updated in place below: no padded copies per step
    while step < length:  # combine each position with the one `step` earlier
        value[..., step:, :] += decay[..., step:, :] * value[..., :-step, :]
        decay[..., step:, :] = decay[..., step:, :] * decay[..., :-step, :]
        step *= 2
    return value, decay


def _chunk_states(u, delta, A, B, state):
    """Per-step decays exp(delta_t A) and states h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t of a chunk.

    u, delta (b, g, d, l); A (g, d, n); B (b, g, n, l); state (b, g, d, n) entering the chunk.
    Returns two (b, g, d, l, n) tensors.
    """
    decay = torch.exp(delta[..., None] * A[:, :, None])
    value = (delta * u)[..., None] * B.transpose(-1, -2)[:, :, None]
    states, decay_products = _linear_scan(decay, value)
    return decay, states + decay_products * state[:, :, :, None]


class _ChunkScan(torch.autograd.Function):
    """One chunk of the selective scan, y_t = C_t . h_t, with a hand-written backward.

    Forward keeps only its inputs. Backward recomputes the states and solves the adjoint recurrence
    g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} with the same scan run in reverse, so a chunk costs a
    few (b, g, d, l, n) tensors instead of autograd's record of every doubling step.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, state):
        ctx.save_for_backward(u, delta, A, B, C, state)
        _, states = _chunk_states(u, delta, A, B, state)
        return torch.einsum("bgdln,bgnl->bgdl", states, C), states[..., -1, :]

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, state = ctx.saved_tensors
        with _autocast_off(dy.device.type):
            decay, states = _chunk_states(u, delta, A, B, state)
            adjoint = dy[..., None] * C.transpose(-1, -2)[:, :, None]
            adjoint[..., -1, :] += dlast
            next_decay = F.pad(decay[..., 1:, :], (0, 0, 0, 1), value=1.0)
            adjoint = _linear_scan(next_decay.flip(-2), adjoint.flip(-2))[0].flip(-2)  # dL/dh_t
            previous = torch.cat([state[..., None, :], states[..., :-1, :]], dim=-2)
            d_log_decay = adjoint * previous * decay  # dL/d(delta_t A)
            adjoint_B = torch.einsum("bgdln,bgnl->bgdl", adjoint, B)
            du = adjoint_B * delta
            ddelta = adjoint_B * u + torch.einsum("bgdln,gdn->bgdl", d_log_decay, A)
            dA = torch.einsum("bgdln,bgdl->gdn", d_log_decay, delta)
            dB = torch.einsum("bgdln,bgdl->bgnl", adjoint, delta * u)
            dC = torch.einsum("bgdl,bgdln->bgnl", dy, states)
            dstate = adjoint[..., 0, :] * decay[..., 0, :]
        return du, ddelta, dA, dB, dC, dstate


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, chunk_len=SCAN_CHUNK):
    """Mamba-1 selective scan with selective_scan_fn's interface and delta_softplus=True semantics.

    u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or (b, g, n, l), group k serving channels
    [k*d/g, (k+1)*d/g) (how the four v3 directions share one call); D, delta_bias (d,).
    Returns y = (scan + D u) * SiLU(z) in u's dtype. The scan runs chunk by chunk (a short loop over
    l / chunk_len chunks carrying the state, never over tokens); `_ChunkScan`'s backward recomputes
    each chunk, so training keeps O(b d l) activations instead of O(b d l n log l).
    """
    dtype = u.dtype
    with _autocast_off(u.device.type):
        batch, dim, seqlen = u.shape
        if B.dim() == 3:
            B, C = B[:, None], C[:, None]
        ngroups, dstate = B.shape[1], B.shape[2]
        u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
        if delta_bias is not None:
            delta = delta + delta_bias.float()[:, None]
        delta = F.softplus(delta)
        grouped = (batch, ngroups, dim // ngroups, seqlen)
        A_grouped = A.float().view(ngroups, dim // ngroups, dstate)
        u_g, delta_g = u.view(grouped), delta.view(grouped)
        state = u.new_zeros(batch, ngroups, dim // ngroups, dstate)
        outputs = []
        for start in range(0, seqlen, chunk_len):
            part = slice(start, start + chunk_len)
            args = (u_g[..., part], delta_g[..., part], A_grouped, B[..., part], C[..., part], state)
            y, state = _ChunkScan.apply(*args)
            outputs.append(y)
        y = torch.cat(outputs, dim=-1).reshape(batch, dim, seqlen)
        if D is not None:
            y = y + u * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(dtype)


def _causal_conv1d_silu(x, weight, bias, kernels=None):
    """SiLU(depthwise causal conv) over the last axis of x (b, c, l), left zero padding of kernel-1.

    Uses causal-conv1d's CUDA kernel when the kernels are in use and it is installed.
    """
    if kernels is not None and kernels.causal_conv1d is not None:
        return kernels.causal_conv1d(x, weight.squeeze(1), bias, activation="silu")
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]])


# ----------------------------------------------------------------------------------------------------
# kernel discovery and backend choice
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Kernels:
    """The mamba-ssm / causal-conv1d entry points that could be imported, and why others could not."""
    split_conv1d_scan: Optional[Callable] = None  # Mamba2 fully fused (needs causal_conv1d's CUDA ext)
    chunk_scan: Optional[Callable] = None  # Mamba2 Triton SSD
    selective_scan: Optional[Callable] = None  # Mamba1 CUDA selective scan
    causal_conv1d: Optional[Callable] = None
    problems: dict = field(default_factory=dict)


def _import_bypassing_init(package: str, submodule: str):
    """Import `package.submodule` without running `package/__init__.py` (which may import a CUDA ext)."""
    if package not in sys.modules:
        spec = importlib.util.find_spec(package)
        stub = types.ModuleType(package)
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__spec__ = spec
        sys.modules[package] = stub
    return importlib.import_module(f"{package}.{submodule}")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def _kernels() -> _Kernels:
    """Import the kernels once; records, per missing piece, whether it is not installed or failed."""
    found = _Kernels()
    if importlib.util.find_spec("causal_conv1d") is None:
        found.problems["causal_conv1d"] = "not installed"
    else:
        try:  # its __init__ only re-exports the interface, which needs the CUDA extension anyway
            found.causal_conv1d = importlib.import_module("causal_conv1d").causal_conv1d_fn
        except Exception as exc:
            found.problems["causal_conv1d"] = f"import failed ({_error_text(exc)})"
    if importlib.util.find_spec("mamba_ssm") is None:
        found.problems["mamba_ssm"] = "not installed"
        return found
    try:
        ssd = _import_bypassing_init("mamba_ssm", "ops.triton.ssd_combined")
        found.chunk_scan = ssd.mamba_chunk_scan_combined
        # 2.3.x names the fused path's conv entry causal_conv1d_fwd_function, 2.2.x causal_conv1d_cuda
        if getattr(ssd, "causal_conv1d_fwd_function", None) or getattr(ssd, "causal_conv1d_cuda", None):
            found.split_conv1d_scan = ssd.mamba_split_conv1d_scan_combined
    except Exception as exc:
        found.problems["mamba_ssm Triton SSD (Mamba2)"] = f"import failed ({_error_text(exc)})"
    try:
        found.selective_scan = _import_bypassing_init("mamba_ssm", "ops.selective_scan_interface").selective_scan_fn
    except Exception as exc:
        found.problems["mamba_ssm selective_scan_cuda (Mamba1)"] = f"import failed ({_error_text(exc)})"
    return found


def _mixer_kernel_problem(mixer: str, kernels: _Kernels) -> Optional[str]:
    """Why `mixer` has no kernel on this install (None when it has one); CUDA is checked separately."""
    if "mamba_ssm" in kernels.problems:
        return f"mamba_ssm is {kernels.problems['mamba_ssm']}"
    needed = kernels.chunk_scan if mixer == "Mamba2" else kernels.selective_scan
    if needed is None:
        return "; ".join(f"{k}: {v}" for k, v in kernels.problems.items() if mixer in k)
    return None


_backend_override: Optional[str] = None
_announced: set = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown SSM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend asked for: set_backend(), else env var SSM_BACKEND, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    return _check_name(os.environ.get("SSM_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Choose "auto", "torch" or "mamba_ssm"; "mamba_ssm" raises BackendUnavailableError if unusable here."""
    global _backend_override
    _check_name(name)
    if name == "mamba_ssm":
        problems = {m: _unavailable_reason(m, None) for m in ("Mamba2", "Mamba1")}
        if all(problems.values()):
            raise BackendUnavailableError(_unavailable_message(problems))
    _backend_override = name


def _unavailable_reason(mixer: str, tensor: Optional[torch.Tensor]) -> Optional[str]:
    """Why the kernels cannot run `mixer` on `tensor` (or on this machine when tensor is None)."""
    if tensor is not None and tensor.device.type != "cuda":  # decided without importing anything
        return f"the tensors are on {tensor.device.type}; the kernels need CUDA tensors"
    reasons = [_mixer_kernel_problem(mixer, _kernels())]
    if tensor is None and not torch.cuda.is_available():
        reasons.insert(0, "no CUDA device (torch.cuda.is_available() is False)")
    return "; ".join(r for r in reasons if r) or None


def _unavailable_message(problems: dict) -> str:
    reasons = "; ".join(f"{mixer}: {why}" for mixer, why in problems.items() if why)
    return f"SSM backend 'mamba_ssm' cannot run ({reasons}). Install the kernels with `{INSTALL_HINT}`."


def _announce(mixer: str, backend: str, why: str = "") -> None:
    """Say once per (mixer, backend) which implementation runs, on rank 0 only."""
    if (mixer, backend) in _announced:
        return
    _announced.add((mixer, backend))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"ssm: {mixer} uses the {backend} backend" + (f" ({why})" if why else ""), flush=True)


def _kernels_for(mixer: str, tensor: torch.Tensor) -> Optional[_Kernels]:
    """The kernels to use for `mixer` on `tensor`, or None for the torch path (per the backend choice)."""
    backend = get_backend()
    if backend == "torch":
        _announce(mixer, "torch", "requested")
        return None
    why = _unavailable_reason(mixer, tensor)
    if why is None:
        _announce(mixer, "mamba_ssm")
        return _kernels()
    if backend == "mamba_ssm":
        raise BackendUnavailableError(_unavailable_message({mixer: why}))
    _announce(mixer, "torch", why)
    return None


def available_backends() -> dict:
    """{backend: None if usable else why}; the per-mixer keys tell a partial mamba_ssm install apart.

    "mamba_ssm" is None only when both mixers have kernels and CUDA is present; "mamba_ssm:Mamba2" and
    "mamba_ssm:Mamba1" give each mixer's status (a Triton-only install serves Mamba2 but not Mamba1,
    which then falls back to torch under "auto"). Imports the kernels (cached) to find out.
    """
    per_mixer = {m: _unavailable_reason(m, None) for m in ("Mamba2", "Mamba1")}
    result = {"torch": None}
    result["mamba_ssm"] = _unavailable_message(per_mixer) if any(per_mixer.values()) else None
    result.update({f"mamba_ssm:{m}": why for m, why in per_mixer.items()})
    return result


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
        kernels = _kernels_for("Mamba2", zxbcdt)
        if kernels is not None and kernels.split_conv1d_scan is not None:
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
        if kernels is not None:  # Triton SSD (no fused path: causal_conv1d's CUDA extension is missing)
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
def _v3_orders(seq_len: int, device: torch.device):
    """(4, L) source positions of the four v3 scans and (4, L) positions to scatter results back."""
    forward, columns = torch.arange(seq_len), column_order(seq_len)
    orders = torch.stack([forward, forward.flip(0), columns, columns.flip(0)])
    return orders.to(device), orders.argsort(dim=1).to(device)


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

    def _stacked(self, name):
        """The per-direction tensors `name{suffix}` concatenated along dim 0 (directions stacked)."""
        def get(suffix):
            if name in ("A", "D"):
                return getattr(self, f"{name}{suffix}_log" if name == "A" else f"{name}{suffix}")
            module_name, attr = name.split(".")
            return getattr(getattr(self, f"{module_name}{suffix}"), attr)
        parts = [get(s) for s in self.directions]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, hidden_states):
        """hidden_states (B, L, C) -> (B, L, C). v3 expects the cls token at L//2 and L-1 square."""
        batch, seqlen, _ = hidden_states.shape
        xz = self.in_proj(hidden_states)  # (b, l, 2d)
        ndir = len(self.directions)
        if ndir > 1:
            orders, restore = _v3_orders(seqlen, xz.device)
            xz = xz[:, orders]  # (b, 4, l, 2d): each direction's token order
        else:
            xz = xz[:, None]
        x, z = xz.chunk(2, dim=-1)
        channels_first = (batch, ndir * self.d_inner, seqlen)  # directions stacked along channels
        x = x.permute(0, 1, 3, 2).reshape(channels_first)
        z = z.permute(0, 1, 3, 2).reshape(channels_first)
        y = self._scan(x, z)  # (b, ndir*d, l), gated by z
        y = y.view(batch, ndir, self.d_inner, seqlen).transpose(2, 3)  # (b, ndir, l, d)
        if ndir > 1:
            y = y[:, torch.arange(ndir, device=y.device)[:, None], restore].sum(1) / ndir
        else:
            y = y[:, 0]
        return self.out_proj(y)

    def _scan(self, x, z):
        """Conv + SiLU, x_proj, dt_proj and the selective scan for all directions at once.

        x, z: (b, k*d, l) with the k directions stacked along channels; returns (b, k*d, l).
        """
        batch, _, seqlen = x.shape
        ndir = len(self.directions)
        kernels = _kernels_for("Mamba1", x)
        conv_weight, conv_bias = self._stacked("conv1d.weight"), self._stacked("conv1d.bias")
        x = _causal_conv1d_silu(x, conv_weight, conv_bias, kernels)
        x_dirs = x.view(batch, ndir, self.d_inner, seqlen)
        x_proj_weight = self._stacked("x_proj.weight").view(ndir, -1, self.d_inner)
        x_dbl = torch.einsum("bkdl,ked->bkel", x_dirs, x_proj_weight)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dt_proj_weight = self._stacked("dt_proj.weight").view(ndir, self.d_inner, self.dt_rank)
        delta = torch.einsum("bkrl,kdr->bkdl", dt, dt_proj_weight).reshape_as(x)
        A = -torch.exp(self._stacked("A").float())
        D, delta_bias = self._stacked("D").float(), self._stacked("dt_proj.bias").float()
        if kernels is not None:
            dtype = x.dtype  # the CUDA kernel wants u, delta, B, C, z in one dtype
            return kernels.selective_scan(x, delta.to(dtype), A, B.to(dtype).contiguous(), C.to(dtype).contiguous(),
                                          D, z=z.to(dtype), delta_bias=delta_bias, delta_softplus=True)
        return selective_scan(x, delta, A, B, C, D, z=z, delta_bias=delta_bias)


if __name__ == "__main__":
    print(f"SSM backend requested: {get_backend()} (set_backend() / env SSM_BACKEND; one of {', '.join(BACKENDS)})")
    print(f"CUDA available: {torch.cuda.is_available()}")
    for name, reason in available_backends().items():
        print(f"  {name:16s} {'usable' if reason is None else 'unavailable: ' + reason}")
    pieces = _kernels()
    for piece, fn in (("mamba_split_conv1d_scan_combined (Mamba2 fused)", pieces.split_conv1d_scan),
                      ("mamba_chunk_scan_combined (Mamba2 Triton SSD)", pieces.chunk_scan),
                      ("selective_scan_fn (Mamba1 CUDA)", pieces.selective_scan),
                      ("causal_conv1d_fn", pieces.causal_conv1d)):
        print(f"  {piece:50s} {'imported' if fn is not None else 'missing'}")
    for piece, why in pieces.problems.items():
        print(f"  why {piece}: {why}")
