"""The two SSM scans in plain PyTorch: Mamba-2 SSD (`ssd_chunked`) and the Mamba-1 selective scan.

Both run on any device, are differentiable, and keep their state math in float32 with autocast off.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked", "selective_scan", "SCAN_CHUNK"]

SCAN_CHUNK = 16  # tokens per chunk of the torch selective scan: (B, D, 16, N) states per step; shorter
# chunks mean fewer doubling steps per token (log2 16 = 4), which measured fastest on CPU (B=64, L=128)



def _autocast_off(device_type: str):
    """Autocast disabled for the fp32 state math; devices without autocast (meta) need no context."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(device_type: str) -> torch.dtype:
    """The autocast dtype where autocast is on (bf16/fp16 matmuls with fp32 accumulation), else float32."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def _segment_sums(cum: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = cum[i] - cum[j] for j <= i, -inf above the diagonal; float32 from a float64 cumsum.

    cum is split into float32 hi + lo parts, so each difference is as exact as summing its segment
    directly (mamba-ssm ssd_minimal's stable `segsum`) while costing broadcast subtractions only, no
    cumsum over the (l, l) matrix; a plain float32 difference of cumsums is off by up to eps * |cum|
    (2e-5 relative in 256-token chunks).
    """
    hi = cum.float()
    lo = (cum - hi).float()
    sums = (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])
    length = cum.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=cum.device).tril()
    return sums.masked_fill(~causal, -math.inf)


class _IntraChunk(torch.autograd.Function):
    """Outputs of each chunk from its own inputs: y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) xdt_j.

    C, B (b, c, l, g, n) and xdt (b, c, l, g, r, p) in the compute dtype, cum (b, g, r, c, l) float64;
    returns float32 (b, c, l, g, r, p). The (l, l) score matrices exist only inside forward and
    backward: backward recomputes them from the inputs (elementwise work and the small C.B product)
    instead of autograd keeping three of them per layer, which is what long sequences ran out of
    memory on.
    """

    @staticmethod
    def _scores(C, B, cum):
        """The decays exp(cum_i - cum_j) and the scores (C_i . B_j) * decay, (b, g, r, c, l, l) float32."""
        CB = torch.einsum("bcign,bcjgn->bgcij", C, B).float()
        decay = torch.exp(_segment_sums(cum))
        return decay, CB[:, :, None] * decay

    @staticmethod
    def forward(ctx, C, B, cum, xdt):
        ctx.save_for_backward(C, B, cum, xdt)
        _, scores = _IntraChunk._scores(C, B, cum)
        return torch.einsum("bgrcij,bcjgrp->bcigrp", scores.to(xdt.dtype), xdt).float()

    @staticmethod
    def backward(ctx, dy):
        C, B, cum, xdt = ctx.saved_tensors
        with _autocast_off(dy.device.type):
            decay, scores = _IntraChunk._scores(C, B, cum)
            dy = dy.to(xdt.dtype)
            dscores = torch.einsum("bcigrp,bcjgrp->bgrcij", dy, xdt).float()
            dxdt = torch.einsum("bgrcij,bcigrp->bcjgrp", scores.to(xdt.dtype), dy)
            dsums = dscores * scores  # d loss / d (cum_i - cum_j), zero above the diagonal
            dcum = dsums.sum(-1) - dsums.sum(-2)
            dCB = (dscores * decay).sum(2).to(C.dtype)  # summed over the heads sharing a group
            dC = torch.einsum("bgcij,bcjgn->bcign", dCB, B)
            dB = torch.einsum("bgcij,bcign->bcjgn", dCB, C)
        return dC, dB, dcum.to(cum.dtype), dxdt


def ssd_chunked(x, dt, A, B, C, chunk_size=256):
    """Mamba-2 SSD: y_t = sum_{s<=t} (C_t . B_s) exp(A * sum_{s<r<=t} dt_r) dt_s x_s, without the D skip.

    x (b, l, h, p), dt (b, l, h) (already softplus-ed), A (h,), B and C (b, l, g, n) with the h heads
    split into g groups. Computed as in mamba-ssm's ssd_minimal: an attention-like quadratic form
    inside chunks, plus states passed between chunks by a small (chunks x chunks) decay matrix; no
    loop over tokens or chunks, and only the quadratic form when one chunk covers the sequence (198
    tokens at 224 px). Decays and states are float32 with autocast off; under autocast the matrix
    products take autocast-dtype operands with float32 accumulation, as mamba-ssm's kernels do.
    Returns float32 y.
    """
    compute = _compute_dtype(x.device.type)
    with _autocast_off(x.device.type):
        batch, seqlen, nheads, headdim = x.shape
        ngroups, dstate = B.shape[-2:]
        chunk = min(chunk_size, seqlen)  # a single short chunk is exact: no padding to 256 needed
        pad = -seqlen % chunk
        dt = dt.float()
        xdt = x.float() * dt[..., None]
        if pad:  # zero input and dt=0 (no decay) after the end: the real tokens are unaffected
            xdt, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xdt, dt, B, C))
        nchunks = (seqlen + pad) // chunk
        heads = (ngroups, nheads // ngroups)
        xdt = xdt.to(compute).view(batch, nchunks, chunk, *heads, headdim)
        B = B.to(compute).view(batch, nchunks, chunk, ngroups, dstate)
        C = C.to(compute).view(batch, nchunks, chunk, ngroups, dstate)
        log_decay = (dt * A.float()).view(batch, nchunks, chunk, *heads).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
        cum = log_decay.double().cumsum(-1)

        # 1. outputs from inputs of the same chunk
        y = _IntraChunk.apply(C, B, cum, xdt)
        if nchunks > 1:
            # 2. state each chunk leaves behind from its own inputs
            decay_to_end = torch.exp((cum[..., -1:] - cum).float()).permute(0, 3, 4, 1, 2)[..., None]
            states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, (xdt * decay_to_end).to(compute)).float()
            # 3. state entering each chunk: decayed sum of all earlier chunks' states
            chunk_starts = F.pad(cum[..., -1].cumsum(-1), (1, 0))  # (b, g, r, c + 1) log decay since token 0
            chunk_decay = torch.exp(_segment_sums(chunk_starts))[..., :-1, 1:]  # [z, j]: chunk j -> z
            entering = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
            # 4. outputs from the entering state
            decay_in = torch.exp(cum.float()).permute(0, 3, 4, 1, 2)[..., None]  # (b, c, l, g, r, 1)
            y = y + torch.einsum("bcign,bcgrpn->bcigrp", C, entering.to(compute)).float() * decay_in
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
