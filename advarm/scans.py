"""The two SSM scans in plain PyTorch: Mamba-2 SSD (`ssd_chunked`) and the Mamba-1 selective scan.

Both run on any device, are differentiable, and keep their state math in float32 with autocast off.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked", "selective_scan", "selective_scan_of", "SCAN_CHUNK"]

SCAN_CHUNK = 16  # tokens per chunk of the torch selective scan: the work per token does not depend on it (a
# work-efficient scan), the working set is a few (g, b, 16, d, N) tensors that stay in cache


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


# ----------------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# ----------------------------------------------------------------------------------------------------

def _mul(a, b, out):
    """a * b written into `out`, a reused buffer, in eager mode; under torch.compile a plain product
    (inductor plans its own buffers and does not take strided `out=` views)."""
    if torch.compiler.is_compiling():
        return a * b
    return torch.mul(a, b, out=out)


def _scan_(decay, value, edges_out, reverse=False, last_only=False):
    """In place along dim 2 (a power-of-two length): value_t += decay_t value_{t-1} for every t, or with
    reverse the adjoint recurrence value_t += decay_{t+1} value_{t+1}.

    Blelloch's work-efficient scan on block views: the up-sweep folds the left half of every block of
    2, 4, 8, ... steps into the block's last (reverse: first) element, the down-sweep completes the other
    elements, so each element is updated about twice. `decay` is left unchanged; the decays across
    blocks (`edges`, written into `edges_out`) are products of numbers <= 1, so nothing can overflow.
    last_only stops after the up-sweep, when only the last (reverse: first) element is final.
    """
    length = value.shape[2]
    edges = decay[:, :, 1:] if reverse else decay  # edges[:, :, k]: the decay across block k of `span` steps
    levels, span, used = [], 1, 0
    while span < length:
        halves = value.unflatten(2, (length // (2 * span), 2, span))
        if reverse:
            halves[:, :, :, 0, 0].addcmul_(edges[:, :, 0::2], halves[:, :, :, 1, 0])
        else:
            halves[:, :, :, 1, -1].addcmul_(edges[:, :, 1::2], halves[:, :, :, 0, -1])
        levels.append((span, edges))
        span *= 2
        if span < length:
            count = length // span - reverse
            pairs = edges[:, :, 0::2][:, :, :count], edges[:, :, 1::2][:, :, :count]
            edges, used = _mul(*pairs, out=edges_out[:, :, used:used + count]), used + count
    if last_only:
        return value
    for span, edges in reversed(levels[:-1]):
        halves = value.unflatten(2, (length // (2 * span), 2, span))
        if reverse:
            halves[:, :, :-1, 1, 0].addcmul_(edges[:, :, 1::2], halves[:, :, 1:, 0, 0])
        else:
            halves[:, :, 1:, 0, -1].addcmul_(edges[:, :, 0::2][:, :, 1:], halves[:, :, :-1, 1, -1])
    return value


def _padded_length(size):
    return 1 << (size - 1).bit_length()


def _chunk(t, start, chunk_len):
    """Tokens [start, start + chunk_len) of t (g, b, l, ...) along dim 2, zero-padded to a power of two.

    Padded steps have delta = 0 (decay 1) and no input or output gradient, so they change nothing.
    """
    part = t[:, :, start:start + chunk_len]
    pad = _padded_length(part.shape[2]) - part.shape[2]
    return F.pad(part, (0, 0) * (t.dim() - 3) + (0, pad)) if pad else part


def _workspace(u, A, chunk_len, names):
    """(g, b, chunk, d, N) buffers that every chunk reuses: on CPUs a fresh multi-megabyte tensor costs
    page faults worth as much as the arithmetic done on it."""
    groups, batch, length, dim = u.shape
    shape = (groups, batch, _padded_length(min(chunk_len, length)), dim, A.shape[-1])
    return {name: u.new_empty(shape) for name in names}


def _chunk_states(u, delta, A2, B, state, work, last_only=False):
    """Decays exp(delta_t A) and states h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t of one chunk,
    both (g, b, n, d, N) views of `work`, from the state (g, b, d, N) entering it. A2 = A log2(e):
    exp2 is about three times faster than exp on CPUs, and as accurate."""
    n = u.shape[2]
    decay = _mul(delta[..., None], A2[:, None, None], out=work["decay"][:, :, :n]).exp2_()
    states = _mul((delta * u)[..., None], B[..., None, :], out=work["states"][:, :, :n])
    states[:, :, 0].addcmul_(decay[:, :, 0], state)
    return decay, _scan_(decay, states, work["edges"], last_only=last_only)


def _softplus(x):
    """F.softplus(x), also beyond its threshold 20, from exp2 and log2, which run several times faster
    on CPUs than the log1p it uses: log1p(t) = log(1 + t) t / ((1 + t) - 1) (Goldberg). Relative error
    below 2e-7 (1 + |x|): exp2's argument is rounded, which matters only where the result is tiny."""
    t = torch.exp2(x.abs().mul_(-math.log2(math.e)))  # exp(-|x|)
    w = t + 1
    log1p = torch.log2(w).mul_(t / (w - 1)).mul_(math.log(2))
    return x.clamp(min=0).add_(torch.where(w == 1, t, log1p))


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, chunk_len):
    """y_t = (C_t . h_t + D u_t) SiLU(z_t), chunk by chunk, with delta = softplus(delta + delta_bias).
    u, delta, z (g, b, l, d); A (g, d, N); B, C (g, b, l, N); D, delta_bias (g, d); z may be None (no
    gate). All float32."""
    groups, batch, length, dim = u.shape
    delta = _softplus(delta + delta_bias[:, None, None])
    A2, work = A * math.log2(math.e), _workspace(u, A, chunk_len, ("decay", "states", "edges"))
    state = u.new_zeros(groups, batch, dim, A.shape[-1])
    ys = []
    for start in range(0, length, chunk_len):
        size = min(chunk_len, length - start)
        u_c, delta_c, B_c, C_c = (_chunk(t, start, chunk_len) for t in (u, delta, B, C))
        _, states = _chunk_states(u_c, delta_c, A2, B_c, state, work)
        ys.append((C_c[..., None, :] @ states.mT)[:, :, :size, 0])  # (1, N) @ (N, d): the fast matmul form
        state = states[:, :, size - 1].clone()
    y = torch.cat(ys, dim=2).addcmul_(u, D[:, None, None])
    return y if z is None else y.mul_(F.silu(z))


def _scan_backward(u, delta, A, B, C, D, z, delta_bias, dy, chunk_len):
    """Gradients (u, delta, A, B, C, D, z, delta_bias) of sum(dy * _scan_forward(...)), one group (ARM:
    one scan direction) at a time, each written into its slice of the results: the working set is then a
    group's, a quarter of the four directions' (the backward's peak memory sits in it)."""
    grads = [None if t is None else torch.empty_like(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    for k in range(u.shape[0]):
        group = [None if t is None else t[k:k + 1] for t in (u, delta, A, B, C, D, z, delta_bias, dy)]
        _scan_backward_group(*group, chunk_len, [None if g is None else g[k:k + 1] for g in grads])
    return grads


def _scan_backward_group(u, delta, A, B, C, D, z, delta_bias, dy, chunk_len, grads):
    """`_scan_backward` of one group, written into `grads` (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias).

    Nothing of the forward is kept: a first pass finds the state entering each chunk (up-sweeps only),
    a second, from the last chunk to the first, recomputes each chunk's states and runs the adjoint
    recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} backwards through it, so the working set is
    a few (1, b, chunk, d, N) tensors whatever the length.
    """
    groups, batch, length, dim = u.shape
    raw_delta, delta = delta + delta_bias[:, None, None], _softplus(delta + delta_bias[:, None, None])
    A2, work = A * math.log2(math.e), _workspace(u, A, chunk_len, ("decay", "states", "edges", "adjoint"))
    starts = range(0, length, chunk_len)
    entering = [u.new_zeros(groups, batch, dim, A.shape[-1])]
    for start in starts[:-1]:
        u_c, delta_c, B_c = (_chunk(t, start, chunk_len) for t in (u, delta, B))
        _, states = _chunk_states(u_c, delta_c, A2, B_c, entering[-1], work, last_only=True)
        entering.append(states[:, :, -1].clone())
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    dA.zero_(), dD.zero_()
    carry = torch.zeros_like(entering[0])  # dL/dh at the end of the chunk, from the chunks after it
    for start, state in zip(reversed(starts), reversed(entering)):
        size = min(chunk_len, length - start)
        part = slice(start, start + size)
        u_c, delta_c, B_c, C_c, dy_c = (_chunk(t, start, chunk_len) for t in (u, delta, B, C, dy))
        decay, states = _chunk_states(u_c, delta_c, A2, B_c, state, work)
        if z is not None:
            z_c = _chunk(z, start, chunk_len)
            y_c = (C_c[..., None, :] @ states.mT)[..., 0, :] + u_c * D[:, None, None]
            sigmoid = torch.sigmoid(z_c)
            dz[:, :, part] = (dy_c * y_c * sigmoid * (1 + z_c * (1 - sigmoid)))[:, :, :size]
            dy_c = dy_c * z_c * sigmoid
        dD += (dy_c * u_c).sum((1, 2))
        dC[:, :, part] = (dy_c[..., None, :] @ states)[:, :, :size, 0]
        adjoint = _mul(dy_c[..., None], C_c[..., None, :], out=work["adjoint"][:, :, :decay.shape[2]])
        adjoint[:, :, size - 1] += carry
        _scan_(decay, adjoint, work["edges"], reverse=True)  # dL/dh_t
        carry = decay[:, :, 0] * adjoint[:, :, 0]
        adjoint_B = (B_c[..., None, :] @ adjoint.mT)[..., 0, :]
        du[:, :, part] = (adjoint_B * delta_c + dy_c * D[:, None, None])[:, :, :size]
        dB[:, :, part] = ((delta_c * u_c)[..., None, :] @ adjoint)[:, :, :size, 0]
        # dL/d(delta_t A) = g_t exp(delta_t A) h_{t-1}, built in place of the adjoint
        log_decay_grad = adjoint.mul_(decay)
        log_decay_grad[:, :, 1:] *= states[:, :, :-1]
        log_decay_grad[:, :, 0] *= state
        product = states  # no longer needed: its buffer takes the two weighted sums below
        dA += _mul(log_decay_grad, delta_c[..., None], out=product).sum((1, 2))
        ddelta_c = adjoint_B * u_c + _mul(log_decay_grad, A[:, None, None], out=product).sum(-1)
        ddelta[:, :, part] = ddelta_c[:, :, :size]
    ddelta *= torch.sigmoid(raw_delta)  # through the softplus
    ddelta_bias.copy_(ddelta.sum((1, 2)))


class _SelectiveScan(torch.autograd.Function):
    """y = the selective scan of the tensors `prologue(*inputs)` returns (u, delta, A, B, C, D, z, delta_bias).

    Only `inputs` are kept for backward: it reruns the prologue with autograd on (in the forward's
    autocast state), takes the scan's gradients from `_scan_backward` and backpropagates them through
    the prologue. So a mixer keeps its input instead of a dozen (g, b, l, d) intermediates.
    """

    @staticmethod
    def forward(ctx, prologue, chunk_len, *inputs):
        ctx.prologue, ctx.chunk_len = prologue, chunk_len
        ctx.device_type = inputs[0].device.type
        ctx.autocast = _autocast_state(ctx.device_type)
        ctx.save_for_backward(*inputs)
        scan_inputs = prologue(*inputs)
        with _autocast_off(ctx.device_type):
            return _scan_forward(*_as_float(scan_inputs), chunk_len)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        needs = ctx.needs_input_grad[2:]
        inputs = [t if t is None else t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad(), _autocast_restored(ctx.device_type, ctx.autocast):
            scan_inputs = ctx.prologue(*inputs)
        with _autocast_off(ctx.device_type):
            detached = [t if t is None else t.detach() for t in scan_inputs]
            scan_grads = _scan_backward(*_as_float(detached), dy.float(), ctx.chunk_len)
        pairs = [(t, g.to(t.dtype)) for t, g in zip(scan_inputs, scan_grads) if t is not None and t.requires_grad]
        wanted = [t for t, need in zip(inputs, needs) if need]
        found = iter(torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, None) + tuple(next(found) if need else None for need in needs)


class _Scan(torch.autograd.Function):
    """The scan alone with its hand-written backward, keeping its inputs: the form torch.compile traces
    (it cannot trace `_SelectiveScan`'s autograd.grad; inductor decides itself what to recompute)."""

    @staticmethod
    def forward(ctx, chunk_len, *scan_inputs):
        ctx.chunk_len = chunk_len
        ctx.save_for_backward(*scan_inputs)
        with _autocast_off(scan_inputs[0].device.type):
            return _scan_forward(*_as_float(scan_inputs), chunk_len)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        with _autocast_off(dy.device.type):
            grads = _scan_backward(*_as_float(saved), dy.float(), ctx.chunk_len)
        return (None,) + tuple(None if t is None else g.to(t.dtype) for t, g in zip(saved, grads))


def _autocast_state(device_type):
    """(enabled, dtype) of autocast on device_type, None where it has no autocast (meta)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_restored(device_type, state):
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=state[1], enabled=state[0])


def _as_float(tensors):
    return [None if t is None else t.float() for t in tensors]


def selective_scan_of(prologue, *inputs, chunk_len=SCAN_CHUNK):
    """The selective scan of prologue(*inputs) -> (u, delta, A, B, C, D, z, delta_bias) in the (g, b, l, .)
    layout of `_scan_forward` (delta before softplus, z may be None), returned as float32 (g, b, l, d).
    Training keeps only `inputs` (see `_SelectiveScan`); the prologue must be deterministic and have no
    side effects. Under torch.compile the prologue is traced and the scan is `_Scan`.
    """
    if torch.compiler.is_compiling():
        return _Scan.apply(chunk_len, *prologue(*inputs))
    return _SelectiveScan.apply(prologue, chunk_len, *inputs)


def _channels_last(u, delta, A, B, C, D, z, delta_bias):
    """selective_scan_fn's arguments in the scan's layout: (b, g*d, l) -> (g, b, l, d); D, delta_bias (g, d)."""
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    groups = B.shape[1]

    def split(t):
        return t.reshape(batch, groups, dim // groups, length).permute(1, 0, 3, 2).contiguous()

    D, delta_bias = (t.view(groups, -1) if t is not None else u.new_zeros(groups, dim // groups)
                     for t in (D, delta_bias))
    B, C = (t.permute(1, 0, 3, 2).contiguous() for t in (B, C))
    return (split(u), split(delta), A.view(groups, dim // groups, -1), B, C, D,
            split(z) if z is not None else None, delta_bias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, chunk_len=SCAN_CHUNK):
    """Mamba-1 selective scan with selective_scan_fn's interface and delta_softplus=True semantics.

    u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or (b, g, n, l), group k serving channels
    [k*d/g, (k+1)*d/g); D, delta_bias (d,). Returns y = (scan + D u) * SiLU(z) in u's dtype, computed
    in float32 chunk by chunk (a short loop over l / chunk_len chunks, never over tokens); training
    keeps only the arguments and recomputes the rest in backward.
    """
    batch, dim, length = u.shape
    y = selective_scan_of(_channels_last, u, delta, A, B, C, D, z, delta_bias, chunk_len=chunk_len)
    return y.permute(1, 0, 3, 2).reshape(batch, dim, length).to(u.dtype)
