"""advarm.ssm, advarm.scans, advarm.kernels: the torch scans against per-token recurrences, the mixers' layout/init, and backend dispatch."""
import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from advarm import kernels, scans, ssm


@pytest.fixture(autouse=True)
def fresh_backend_state(monkeypatch):
    """Each test starts from "auto" with no env override and nothing announced yet."""
    monkeypatch.delenv("SSM_BACKEND", raising=False)
    monkeypatch.setattr(kernels, "_backend_override", None)
    monkeypatch.setattr(kernels, "_announced", set())


def assert_close_rel(actual, expected, tol, what="output"):
    """Max abs error within tol * max|expected| (scale-free, for values and gradients alike)."""
    scale = expected.abs().max().item() + 1e-12
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} exceeds {tol:g} x scale {scale:.3g}"


def grads(output, inputs, seed=0):
    """Gradients of a fixed random projection of `output` w.r.t. `inputs`."""
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((output * weight.to(output.dtype)).sum(), inputs)


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------- test-only references

def ssd_recurrence(x, dt, A, B, C):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t per head (the SPEC 1.5 definition)."""
    heads_per_group = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(heads_per_group, 2), C.repeat_interleave(heads_per_group, 2)
    state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        state = torch.exp(dt[:, t] * A)[..., None, None] * state \
            + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, 1)


def selective_scan_recurrence(u, delta, A, B, C, D, z, delta_bias):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t + D u_t, gated by SiLU(z) (SPEC 1.6)."""
    delta = F.softplus(delta + delta_bias[:, None])
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per_group = u.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(per_group, 1), C.repeat_interleave(per_group, 1)  # (b, d, n, l)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def ssd_inputs(length, batch=2, nheads=4, headdim=3, ngroups=2, dstate=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, nheads, headdim, generator=g)
    dt = F.softplus(torch.randn(batch, length, nheads, generator=g) - 1)
    A = -torch.rand(nheads, generator=g) * 4 - 0.1
    B = torch.randn(batch, length, ngroups, dstate, generator=g)
    C = torch.randn(batch, length, ngroups, dstate, generator=g)
    return x, dt, A, B, C


def scan_inputs(length, batch=2, dim=6, dstate=4, ngroups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g)
    A = -torch.arange(1, dstate + 1.0).repeat(dim, 1) * torch.rand(dim, 1, generator=g)
    B = torch.randn(batch, ngroups, dstate, length, generator=g)
    C = torch.randn(batch, ngroups, dstate, length, generator=g)
    if ngroups == 1:
        B, C = B[:, 0], C[:, 0]
    D = torch.randn(dim, generator=g)
    z = torch.randn(batch, dim, length, generator=g)
    delta_bias = torch.randn(dim, generator=g) - 2
    return u, delta, A, B, C, D, z, delta_bias


# ---------------------------------------------------------------------------------- Mamba-2 SSD

@pytest.mark.parametrize("length", [1, 17, 255, 256, 257, 600])
def test_ssd_matches_recurrence_forward_and_backward(length):
    inputs = ssd_inputs(length)
    ref = leaves(*inputs, dtype=torch.float64)
    y_ref = ssd_recurrence(*ref)
    grads_ref = grads(y_ref, ref)
    for chunk_size in (256, 16):  # the official chunk, and many chunks to exercise the state passing
        ours = leaves(*inputs)
        y = scans.ssd_chunked(*ours, chunk_size=chunk_size)
        assert y.shape == y_ref.shape and y.dtype == torch.float32
        assert_close_rel(y, y_ref, 1e-5, f"chunk {chunk_size}")
        for name, g, g_ref in zip("x dt A B C".split(), grads(y, ours), grads_ref):
            assert_close_rel(g, g_ref, 1e-4, f"chunk {chunk_size} grad {name}")


def test_ssd_under_autocast_is_within_bf16_noise_with_fp32_decays():
    """bf16 operands for the matrix products (as mamba-ssm's kernels), float32 decays and states."""
    inputs = ssd_inputs(600)
    ref = leaves(*inputs, dtype=torch.float64)
    y_ref = ssd_recurrence(*ref)
    ours = leaves(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scans.ssd_chunked(*ours, chunk_size=64)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert_close_rel(y, y_ref, 1e-2)
    assert (y.double() - y_ref).abs().max() > 1e-5 * y_ref.abs().max()  # the products did run in bf16
    for name, g, g_ref in zip("x dt A B C".split(), grads(y, ours), grads(y_ref, ref)):
        assert_close_rel(g, g_ref, 3e-2, f"grad {name}")


def test_ssd_backward_keeps_no_quadratic_tensors():
    """The (chunk x chunk) scores are recomputed in backward: what autograd keeps grows linearly in l."""
    def saved_bytes(length):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            scans.ssd_chunked(*leaves(*ssd_inputs(length, nheads=8, headdim=4, dstate=4)), chunk_size=256)
        return sum(total)
    assert saved_bytes(256) < 2.2 * saved_bytes(128)  # quadratic storage would be about 4x


# ---------------------------------------------------------------------------------- Mamba-1 selective scan

@pytest.mark.parametrize("length,ngroups,chunk_len", [(1, 1, 64), (17, 1, 64), (64, 2, 64), (65, 1, 64),
                                                      (200, 2, 64), (37, 3, 8), (197, 3, 16), (50, 2, 12)])
def test_selective_scan_matches_recurrence_forward_and_backward(length, ngroups, chunk_len):
    inputs = scan_inputs(length, ngroups=ngroups)
    ours = leaves(*inputs)
    ref = leaves(*inputs, dtype=torch.float64)
    y = scans.selective_scan(*ours[:6], z=ours[6], delta_bias=ours[7], chunk_len=chunk_len)
    y_ref = selective_scan_recurrence(*ref)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert_close_rel(y, y_ref, 1e-5)
    names = "u delta A B C D z delta_bias".split()
    for name, g, g_ref in zip(names, grads(y, ours), grads(y_ref, ref)):
        assert_close_rel(g, g_ref, 1e-4, f"grad {name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_blelloch_scan_matches_the_recurrence(reverse):
    g = torch.Generator().manual_seed(0)
    for length in (1, 2, 4, 8, 16, 32):
        decay = torch.rand(2, 3, length, 5, 4, generator=g, dtype=torch.float64)
        value = torch.randn(2, 3, length, 5, 4, generator=g, dtype=torch.float64)
        expected = value.clone()
        steps = range(length - 2, -1, -1) if reverse else range(1, length)
        for t in steps:  # reverse: value_t += decay_{t+1} value_{t+1}
            expected[:, :, t] += decay[:, :, t + 1] * expected[:, :, t + 1] if reverse else \
                decay[:, :, t] * expected[:, :, t - 1]
        edges, kept = torch.empty_like(decay), decay.clone()
        out = scans._scan_(decay, value.clone(), edges, reverse=reverse)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(decay, kept)
        final = 0 if reverse else -1
        last = scans._scan_(decay, value.clone(), edges, reverse=reverse, last_only=True)[:, :, final]
        torch.testing.assert_close(last, expected[:, :, final], rtol=1e-12, atol=1e-12)


def test_softplus_matches_torch_including_its_threshold():
    x = torch.cat([-torch.logspace(-8, 30, 400), torch.zeros(1), torch.logspace(-8, 30, 400),
                   torch.linspace(-30, 30, 2001)])
    ours, expected = scans._softplus(x.clone()), F.softplus(x.double())
    assert torch.isfinite(ours).all()
    error = (ours.double() - expected).abs()
    tiny = torch.finfo(torch.float32).tiny  # below it float32 underflows, F.softplus's result too
    assert (error <= 2e-7 * (1 + x.abs()) * expected + tiny).all()  # exp2's argument rounding grows with |x|
    assert (error[x.abs() < 4] <= 1e-6 * expected[x.abs() < 4]).all()  # a few ulp where softplus is O(1)
    assert torch.equal(ours[x > 20], x[x > 20])  # F.softplus's linear branch, reproduced exactly


def test_selective_scan_long_sequence_with_large_decays_and_steps():
    """delta up to ~30 and |A| up to 16: decays underflow to 0 without overflow anywhere, over 600 tokens."""
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(600, ngroups=2, dstate=16, dim=8)
    delta = delta * 12
    A = A * 4
    ours, ref = leaves(u, delta, A, B, C, D, z, delta_bias), leaves(u, delta, A, B, C, D, z, delta_bias,
                                                                       dtype=torch.float64)
    y = scans.selective_scan(*ours[:6], z=ours[6], delta_bias=ours[7])
    y_ref = selective_scan_recurrence(*ref)
    assert torch.isfinite(y).all()
    assert_close_rel(y, y_ref, 1e-5)
    for name, g, g_ref in zip("u delta A B C D z delta_bias".split(), grads(y, ours), grads(y_ref, ref)):
        assert torch.isfinite(g).all()
        assert_close_rel(g, g_ref, 1e-4, f"grad {name}")


def test_selective_scan_without_skip_or_gate():
    u, delta, A, B, C, _, _, delta_bias = scan_inputs(40)
    ours, ref = leaves(u, delta, A, B, C), leaves(u, delta, A, B, C, dtype=torch.float64)
    y = scans.selective_scan(*ours, delta_bias=delta_bias)
    zero_skip, no_gate = torch.zeros(u.shape[1], dtype=torch.float64), torch.full(u.shape, 50.0, dtype=torch.float64)
    y_ref = selective_scan_recurrence(*ref, zero_skip, no_gate, delta_bias.double())  # SiLU(50) = 50
    assert_close_rel(y, y_ref / 50, 1e-5)
    for g, g_ref in zip(grads(y, ours), grads(y_ref / 50, ref)):
        assert_close_rel(g, g_ref, 1e-4)


def test_selective_scan_of_reruns_the_prologue_in_backward_with_the_forward_autocast_state():
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(20)
    weight = torch.randn(6, 6, requires_grad=True)
    seen = []

    def prologue(weight, u):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        mixed = (weight @ u).mT  # (b, l, d); bf16 under autocast
        layout = (lambda t: t[None].float()), (lambda t: t.transpose(-1, -2)[None])
        return (layout[0](mixed), layout[1](delta), A[None], layout[1](B), layout[1](C), D[None], layout[1](z),
                delta_bias[None])

    results = []
    for autocast in (True, False):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = scans.selective_scan_of(prologue, weight, u)[0].mT  # (1, b, l, d) -> (b, d, l)
        (weight_grad,) = grads(y, [weight])
        assert seen == [(autocast, False), (autocast, True)]  # forward without graph, backward with one
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the same through plain autograd
            mixed = prologue(weight, u)[0][0].mT
        reference = selective_scan_recurrence(mixed, delta, A, B, C, D, z, delta_bias)
        (reference_grad,) = grads(reference, [weight])
        assert seen == [(autocast, True)]
        results.append((y, weight_grad, reference, reference_grad))
    for y, weight_grad, reference, reference_grad in results:
        assert_close_rel(y, reference, 1e-6)
        assert_close_rel(weight_grad, reference_grad, 1e-5)
    assert (results[0][0] - results[1][0]).abs().max() > 1e-4  # bf16 really changed the prologue


def test_selective_scan_bf16_autocast_is_close_and_returns_input_dtype():
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(130, ngroups=2)
    low = [t.bfloat16() for t in (u, delta, B, C, z)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scans.selective_scan(low[0], low[1], A, low[2], low[3], D, z=low[4], delta_bias=delta_bias)
    assert y.dtype == torch.bfloat16
    # same bf16-rounded inputs in float64: only the final rounding to bf16 may differ
    exact = selective_scan_recurrence(low[0].double(), low[1].double(), A.double(), low[2].double(),
                                      low[3].double(), D.double(), low[4].double(), delta_bias.double())
    assert_close_rel(y, exact, 1e-2)
    ours = leaves(low[0], low[1], A, low[2], low[3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scans.selective_scan(*ours, D, z=low[4], delta_bias=delta_bias)
    exact_leaves = leaves(*(t.double() for t in (low[0], low[1], A, low[2], low[3])))
    y_exact = selective_scan_recurrence(*exact_leaves, D.double(), low[4].double(), delta_bias.double())
    for g, g_ref in zip(grads(y.float(), ours), grads(y_exact, exact_leaves)):
        assert_close_rel(g, g_ref, 3e-2)


# ---------------------------------------------------------------------------------- mixers vs references

def perturbed(module, seed=0):
    """Add noise to every parameter so D = 1, zero biases and unit norms hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def mamba2_reference(m, u):
    """SPEC 1.5 written out: split, causal conv + SiLU, per-token recurrence, gate-then-RMSNorm, out_proj."""
    z, xBC, dt = m.in_proj(u).split([m.d_inner, m.d_inner + 2 * m.d_state, m.nheads], dim=-1)
    padded = F.pad(xBC.transpose(1, 2), (m.d_conv - 1, 0))
    xBC = F.silu(F.conv1d(padded, m.conv1d.weight, m.conv1d.bias, groups=xBC.shape[-1])).transpose(1, 2)
    x, B, C = xBC.split([m.d_inner, m.d_state, m.d_state], dim=-1)
    x = x.unflatten(-1, (m.nheads, m.headdim))
    dt = F.softplus(dt + m.dt_bias)
    y = ssd_recurrence(x, dt, -torch.exp(m.A_log), B[:, :, None], C[:, :, None]) + m.D[:, None] * x
    gated = y.flatten(-2) * F.silu(z)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight
    return m.out_proj(normed)


@pytest.mark.parametrize("length", [1, 300])
def test_mamba2_module_matches_reference(length):
    m = perturbed(ssm.Mamba2(32, d_state=8, headdim=16))
    u = torch.randn(2, length, 32)
    assert_close_rel(m(u), mamba2_reference(m, u), 1e-5)


def test_mamba2_bf16_autocast_close_to_fp32():
    m = perturbed(ssm.Mamba2(64, d_state=16, headdim=16, chunk_size=32))
    u = torch.randn(2, 70, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(u)
    assert low.dtype == torch.bfloat16
    assert_close_rel(low, m(u), 5e-2)


def mamba1_direction(m, xz, suffix):
    """ARM's per-direction inner function on xz (b, l, 2d), without out_proj (SPEC 1.6 steps 1-4)."""
    conv, x_proj, dt_proj = (getattr(m, f"{name}{suffix}") for name in ("conv1d", "x_proj", "dt_proj"))
    x, z = xz.chunk(2, dim=-1)
    x = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (m.d_conv - 1, 0)), conv.weight, conv.bias, groups=m.d_inner))
    dt, B, C = x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = (dt @ dt_proj.weight.T).transpose(1, 2)
    A = -torch.exp(getattr(m, f"A{suffix}_log"))
    y = selective_scan_recurrence(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), getattr(m, f"D{suffix}"),
                                  z.transpose(1, 2), dt_proj.bias)
    return y.transpose(1, 2)


def to_columns(seq):
    """Remove the token at L//2, transpose the square grid of the rest, put the token back (SPEC 1.6)."""
    length = seq.shape[1]
    cls, side = length // 2, math.isqrt(length - 1)
    rest = torch.cat([seq[:, :cls], seq[:, cls + 1:]], 1)
    rest = rest.unflatten(1, (side, side)).transpose(1, 2).flatten(1, 2)
    return torch.cat([rest[:, :cls], seq[:, cls:cls + 1], rest[:, cls:]], 1)


def mamba1_v3_reference(m, u):
    """SPEC 1.6 v3: four explicit scans in their token orders, mapped back, averaged, out_proj."""
    xz = m.in_proj(u)
    forward = mamba1_direction(m, xz, "")
    backward = mamba1_direction(m, xz.flip(1), "_b").flip(1)
    columns = to_columns(xz)
    vertical = mamba1_direction(m, columns, "_c") + mamba1_direction(m, columns.flip(1), "_c_b").flip(1)
    return m.out_proj((forward + backward + to_columns(vertical)) / 4)


def assert_module_matches(m, u, reference, tol=1e-5):
    """Outputs and the gradients of the input and every parameter agree with reference(m, u)."""
    inputs = [u.clone().requires_grad_(), *m.parameters()]
    y = m(inputs[0])
    y_ref = reference(m, inputs[0])
    assert_close_rel(y, y_ref, tol)
    names = ["input"] + [name for name, _ in m.named_parameters()]
    for name, g, g_ref in zip(names, grads(y, inputs), grads(y_ref, inputs)):
        assert_close_rel(g, g_ref, 10 * tol, f"grad {name}")


def test_mamba1_unidirectional_matches_reference():
    m = perturbed(ssm.Mamba1(16, d_state=4, bimamba_type="None"))
    assert_module_matches(m, torch.randn(2, 70, 16), lambda m, u: m.out_proj(mamba1_direction(m, m.in_proj(u), "")))


def test_mamba1_v3_matches_four_explicit_scans():
    m = perturbed(ssm.Mamba1(16, d_state=4, bimamba_type="v3"))
    assert_module_matches(m, torch.randn(2, 26, 16), mamba1_v3_reference)  # cls at 13, 5 x 5 grid


def test_mamba1_bf16_autocast_training_is_close_to_fp32():
    """Backward (outside the autocast block) recomputes the prologue in the forward's autocast state."""
    m = perturbed(ssm.Mamba1(32, d_state=8, bimamba_type="v3"))
    u = torch.randn(2, 37, 32)
    inputs = [u.clone().requires_grad_(), *m.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(inputs[0])
    assert low.dtype == torch.bfloat16
    low_grads = grads(low.float(), inputs)
    high = m(inputs[0])
    assert_close_rel(low, high, 3e-2)
    for g, g_ref in zip(low_grads, grads(high, inputs)):
        assert g.dtype == g_ref.dtype
        assert_close_rel(g, g_ref, 5e-2)


def test_mamba1_training_keeps_only_in_proj_output_and_the_mixer_output():
    """What autograd stores for backward besides parameters: in_proj's input (the caller's tensor),
    xz for the recomputing scan, out_proj's input and small integer indices; no (k, b, l, d) tensors."""
    batch, length, dim = 2, 26, 16
    m = ssm.Mamba1(dim, d_state=4, bimamba_type="v3")
    u = torch.randn(batch, length, dim, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params | {u.untyped_storage().data_ptr()}:
            saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(u)
    floats = sum(n for n, dtype in saved.values() if dtype.is_floating_point)
    assert floats == 4 * batch * length * (2 * dim + dim)  # xz (b, l, 2d) and the averaged output (b, l, d)
    assert sum(n for n, dtype in saved.values() if not dtype.is_floating_point) <= 8 * 4 * batch * length


def test_v3_column_order_matches_spec_formula_at_224():
    order = ssm.column_order(197)
    expected = []
    for q in range(197):  # SPEC 4.5: g = 14, cls at 98
        if q == 98:
            expected.append(98)
            continue
        k = q if q < 98 else q - 1
        patch = (k % 14) * 14 + k // 14
        expected.append(patch if patch < 98 else patch + 1)
    assert order.tolist() == expected
    assert torch.equal(order[order], torch.arange(197))  # an involution


def test_v3_rejects_a_non_square_grid():
    m = ssm.Mamba1(8, bimamba_type="v3")
    with pytest.raises(ValueError, match="square grid"):
        m(torch.randn(1, 12, 8))


# ---------------------------------------------------------------------------------- layout and init

def mixer_keys(keys_table, family, variant):
    prefix = "layers.0.mixer."
    rows = [r for r in keys_table if r["family"] == family and r["model_variant"] == variant
            and r["key"].startswith(prefix)]
    assert rows, f"no {family}/{variant} rows in KEYS_full.tsv"
    return [(r["key"][len(prefix):], tuple(int(s) for s in r["shape"].split("x"))) for r in rows]


def module_keys(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def test_mamba2_state_dict_matches_official_keys(keys_table):
    assert module_keys(ssm.Mamba2(256)) == mixer_keys(keys_table, "adv", "adventurer_tiny_patch16@224")


@pytest.mark.parametrize("family,variant,bimamba_type", [("arm_ft", "arm_base_pz16@224", "v3"),
                                                          ("arm_pt", "arm_base_pz16", "None")])
def test_mamba1_state_dict_matches_official_keys(keys_table, family, variant, bimamba_type):
    m = ssm.Mamba1(768, bimamba_type=bimamba_type)
    assert module_keys(m) == mixer_keys(keys_table, family, variant)


def test_mamba2_init():
    m = ssm.Mamba2(128, A_init_range=(1, 16))
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(m.D, torch.ones(m.nheads)) and torch.equal(m.norm.weight, torch.ones(256))
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.D))
    assert m.in_proj.bias is None and m.out_proj.bias is None


def test_mamba1_init():
    m = ssm.Mamba1(64, bimamba_type="v3")
    for suffix in ssm.V3_DIRECTIONS:
        assert torch.allclose(getattr(m, f"A{suffix}_log"), torch.log(torch.arange(1, 17.0)).repeat(64, 1))
        assert torch.equal(getattr(m, f"D{suffix}"), torch.ones(64))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert m.dt_proj.weight.abs().max() <= m.dt_rank ** -0.5
    assert m.dt_proj.bias._no_reinit is True
    assert not hasattr(m.dt_proj_b.bias, "_no_reinit")  # official: the extra directions keep Linear defaults


# ---------------------------------------------------------------------------------- backend dispatch

def fake_kernels(problems=None, **entry_points):
    return kernels._Kernels(problems=problems or {}, **entry_points)


# Stand-ins with the signatures of mamba-ssm 2.3 / causal-conv1d entry points, computing with torch.
def stand_in_conv(x, weight, bias=None, activation=None):
    """causal_conv1d_fn, with the layout checks of causal-conv1d's csrc/causal_conv1d.cpp."""
    assert weight.dim() == 2 and activation == "silu"
    assert x.stride(2) == 1 or x.stride(1) == 1
    if x.stride(1) == 1 and x.stride(2) > 1:  # channel-last
        assert x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, "causal-conv1d rejects it"
    return F.silu(F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight[:, None], bias, groups=x.shape[1]))


def stand_in_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                        seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    assert dt_softplus and z is None and x.dim() == 4 and B.dim() == 4 and A.shape == D.shape
    return (scans.ssd_chunked(x, F.softplus(dt + dt_bias), A, B, C, chunk_size) + x * D[:, None]).to(x.dtype)


def stand_in_split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                               seq_idx=None, dt_limit=(0.0, math.inf), return_final_states=False,
                               activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                               outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """What mamba_split_conv1d_scan_ref computes, for the arguments Mamba2 passes; like mamba-ssm < 2.3
    it hands the channel-last slice of zxbcdt to causal-conv1d without copying it."""
    assert not norm_before_gate and rmsnorm_weight is not None and outproj_weight is not None
    nheads = D.shape[0]
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = stand_in_conv(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x, B, C = x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, -1)), C.unflatten(-1, (ngroups, -1))
    y = stand_in_chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)
    gated = (y.flatten(-2) * F.silu(z)).unflatten(-1, (ngroups, -1))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + rmsnorm_eps)
    return F.linear(normed.flatten(-2) * rmsnorm_weight, outproj_weight, outproj_bias)


def stand_in_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False):
    assert delta_softplus and B.is_contiguous() and C.is_contiguous()
    assert len({t.dtype for t in (u, delta, B, C, z)}) == 1 and A.dtype == D.dtype == torch.float32
    return scans.selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias)


def test_backend_name_from_env_and_override(monkeypatch):
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv("SSM_BACKEND", "torch")
    assert kernels.get_backend() == "torch"
    kernels.set_backend("auto")
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown SSM backend"):
        kernels.set_backend("triton")
    monkeypatch.setenv("SSM_BACKEND", "cuda")
    monkeypatch.setattr(kernels, "_backend_override", None)
    with pytest.raises(ValueError, match="unknown SSM backend 'cuda'"):
        kernels.get_backend()


def test_auto_on_cpu_tensors_uses_torch_without_importing_kernels(monkeypatch, capsys):
    def must_not_import():
        raise AssertionError("auto on CPU tensors must not import mamba_ssm")
    monkeypatch.setattr(kernels, "_kernels", must_not_import)
    m = ssm.Mamba2(32, d_state=8, headdim=16)
    m(torch.randn(1, 5, 32))
    m(torch.randn(1, 5, 32))
    out = capsys.readouterr().out
    assert out.count("Mamba2 uses the torch backend") == 1 and "cpu" in out


def test_forcing_mamba_ssm_on_cpu_tensors_raises_clear_error(monkeypatch):
    monkeypatch.setenv("SSM_BACKEND", "mamba_ssm")
    with pytest.raises(kernels.BackendUnavailableError, match="pip install causal-conv1d mamba-ssm") as info:
        ssm.Mamba1(16)(torch.randn(1, 5, 16))
    assert "on cpu" in str(info.value) and isinstance(info.value, RuntimeError)


def test_set_backend_mamba_ssm_raises_when_not_installed(monkeypatch):
    monkeypatch.setattr(kernels, "_kernels", lambda: fake_kernels(problems={"mamba_ssm": "not installed"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(kernels.BackendUnavailableError, match="not installed") as info:
        kernels.set_backend("mamba_ssm")
    assert "no CUDA" in str(info.value) and kernels.get_backend() == "auto"


def test_available_backends_reports_triton_only_install(monkeypatch):
    problems = {"mamba_ssm selective_scan_cuda (Mamba1)": "import failed (No module named 'selective_scan_cuda')"}
    monkeypatch.setattr(kernels, "_kernels", lambda: fake_kernels(problems, chunk_scan=stand_in_chunk_scan))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    status = kernels.available_backends()
    assert status["torch"] is None and status["mamba_ssm:Mamba2"] is None
    assert "selective_scan_cuda" in status["mamba_ssm:Mamba1"] and "selective_scan_cuda" in status["mamba_ssm"]


@pytest.mark.parametrize("install", ["triton_only", "full"])
def test_kernel_call_conventions_match_torch_path(monkeypatch, install):
    """Dispatch plumbing: stand-ins with the kernels' signatures must reproduce the torch output."""
    entry_points = dict(chunk_scan=stand_in_chunk_scan, selective_scan=stand_in_selective_scan)
    if install == "full":
        entry_points.update(split_conv1d_scan=stand_in_split_conv1d_scan, causal_conv1d=stand_in_conv)
    mixers = [(perturbed(ssm.Mamba2(32, d_state=8, headdim=8)), torch.randn(2, 9, 32)),
              (perturbed(ssm.Mamba1(16, bimamba_type="v3")), torch.randn(2, 17, 16))]
    expected = [m(u) for m, u in mixers]
    monkeypatch.setattr(kernels, "_kernels", lambda: fake_kernels(**entry_points))
    monkeypatch.setattr(kernels, "_unavailable_reason", lambda mixer, device_type: None)
    kernels.set_backend("mamba_ssm")
    for (m, u), y in zip(mixers, expected):
        assert_close_rel(m(u), y, 1e-6, type(m).__name__)


@pytest.mark.parametrize("embed_dim, fused", [(256, True), (64, False), (96, False)])
def test_small_and_odd_widths_run_on_kernels_that_check_strides(monkeypatch, embed_dim, fused):
    """Adventurer's Mamba2 at embed_dim 64 or 96 has an in_proj width (386, 515) that is no multiple of 8:
    the fused path would hand causal-conv1d a view it rejects, so those widths take the unfused kernels
    with the conv input copied; 256 (Adventurer-Tiny, width 1160) keeps the fused path."""
    calls = []

    def counted(name, fn):
        return lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs)
    entry_points = dict(chunk_scan=stand_in_chunk_scan, causal_conv1d=counted("conv", stand_in_conv),
                        split_conv1d_scan=counted("fused", stand_in_split_conv1d_scan))
    m = perturbed(ssm.Mamba2(embed_dim))
    u = torch.randn(2, 9, embed_dim)
    expected = m(u)
    monkeypatch.setattr(kernels, "_kernels", lambda: fake_kernels(**entry_points))
    monkeypatch.setattr(kernels, "_unavailable_reason", lambda mixer, device_type: None)
    kernels.set_backend("mamba_ssm")
    assert_close_rel(m(u), expected, 1e-5)
    assert calls == (["fused"] if fused else ["conv"])


def write_package(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_probe_asks_for_the_compiled_extensions_themselves(tmp_path, monkeypatch):
    """Wrappers that import without their CUDA extension (mamba-ssm after 2.3.2.post1 imports
    selective_scan_fn without selective_scan_cuda) must not count as kernels."""
    write_package(tmp_path, {
        "mamba_ssm/__init__.py": "import selective_scan_cuda\n",
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(): pass\n"
                                                 "def mamba_split_conv1d_scan_combined(): pass\n"
                                                 "causal_conv1d_fwd_function = None\n",
        "mamba_ssm/ops/selective_scan_interface.py": "try:\n    import selective_scan_cuda\n"
                                                      "except ImportError:\n    selective_scan_cuda = None\n"
                                                      "def selective_scan_fn(): pass\n",
        "causal_conv1d/__init__.py": "def causal_conv1d_fn(): pass\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))

    def probe():
        for name in [n for n in sys.modules if n.split(".")[0] in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda")]:
            monkeypatch.delitem(sys.modules, name)
        importlib.invalidate_caches()
        return kernels._probe()
    found = probe()
    assert found.chunk_scan is not None and found.selective_scan is None and found.causal_conv1d is None
    assert "selective_scan_cuda is not installed" in found.problems["mamba_ssm selective_scan_cuda (Mamba1)"]
    assert "MAMBA_KEEP_CUDA_BUILD=TRUE" in found.problems["mamba_ssm selective_scan_cuda (Mamba1)"]
    assert "causal_conv1d_cuda is not installed" in found.problems["causal_conv1d"]
    write_package(tmp_path, {"selective_scan_cuda.py": "", "causal_conv1d_cuda.py": ""})
    found = probe()
    assert found.selective_scan is not None and found.causal_conv1d is not None and not found.problems
    write_package(tmp_path, {"selective_scan_cuda.py": "raise ImportError('undefined symbol: _ZN3c10')\n"})
    assert "does not load (ImportError: undefined symbol" in probe().problems["mamba_ssm selective_scan_cuda (Mamba1)"]


def test_import_bypassing_a_broken_package_init(tmp_path, monkeypatch):
    package = tmp_path / "pkg_with_cuda_init"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("import missing_cuda_extension\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "kernel.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("pkg_with_cuda_init", "pkg_with_cuda_init.ops", "pkg_with_cuda_init.ops.kernel"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert kernels.import_bypassing_init("pkg_with_cuda_init", "ops.kernel").VALUE == 42
    finally:
        for name in ("pkg_with_cuda_init", "pkg_with_cuda_init.ops", "pkg_with_cuda_init.ops.kernel"):
            sys.modules.pop(name, None)


def test_mixers_run_shape_only_on_the_meta_device():
    """timm's config tests build and run models on meta; autocast is unavailable there."""
    with torch.device("meta"):
        assert ssm.Mamba2(64)(torch.randn(2, 10, 64)).shape == (2, 10, 64)
        assert ssm.Mamba1(64, bimamba_type="v3")(torch.randn(2, 17, 64)).shape == (2, 17, 64)
