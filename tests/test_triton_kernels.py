"""Triton kernels against the float64 reference (dcedit_kernels.reference, torch.autograd on it).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it
before anything imports triton).  Shapes are small and odd (the interpreter emulates every
program in Python) but span several 16-wide tiles, so tiles straddle groups and are ragged.
Half-precision inputs are compared with the reference fed the same rounded values in float64,
so the tolerance is that of the output's dtype.
"""

import os
from contextlib import ExitStack
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from dcedit_kernels import reference  # noqa: E402
from dcedit_kernels import triton_kernels as tk  # noqa: E402
from helpers import TOL, randn, ragged_offsets, random_counts, rel_err  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="triton needs a CUDA device or TRITON_INTERPRET=1")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FUSIONS = ["none", "add", "max", "sss", "ssm"]
# Group layouts every op must survive: T = 0, all empty, empty first and last, one group.
LAYOUTS = {
    "no_tokens": [0, 0, 0],
    "one_empty_group": [0],
    "empty_first_last": [0, 9, 17, 0],
    "empty_middle": [6, 0, 0, 11],
    "single_group": [13],
}


def f64(*tensors):
    """float64 copies (of the already rounded values) for the reference."""
    return [t.detach().double() for t in tensors]


def close(out, ref, dtype=None):
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]:.3g} for {dtype}"


def offsets_for(counts):
    return ragged_offsets(counts, DEVICE)


def random_layout(gen, G=5, max_count=11):
    counts = random_counts(G, gen, max_count=max_count)
    counts[0] = 0  # an empty first group in every random layout; the last is empty at random
    return counts


def out_dtype(dtype):
    """The ops' accumulation/output dtype for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- segment_matmul


def segment_matmul_ref(x, w, counts, transpose_w, gain, bias, scale, shift, relu, residual):
    pieces, start = [], 0
    for g, c in enumerate(counts):
        rows = x[start:start + c] * (gain[start:start + c] if gain is not None else 1)
        y = rows @ (w[g].T if transpose_w else w[g])
        if bias is not None:
            y = y + bias[g]
        if scale is not None:
            y = y * scale[g]
        if shift is not None:
            y = y + shift[g]
        if relu:
            y = y.clamp(min=0)
        if residual is not None:
            y = y + residual[start:start + c]
        pieces.append(y)
        start += c
    return torch.cat(pieces, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_w", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_segment_matmul(gen, dtype, transpose_w, fused):
    counts = random_layout(gen)
    T, G, k, n = sum(counts), len(counts), 13, 29
    x = randn((T, k), gen, dtype, DEVICE)
    w = randn((G, n, k) if transpose_w else (G, k, n), gen, dtype, DEVICE)
    extra = dict(gain=None, bias=None, scale=None, shift=None, relu=False, residual=None)
    if fused:
        extra = dict(gain=randn((T, k), gen, dtype, DEVICE), bias=randn((G, n), gen, dtype, DEVICE),
                     scale=randn((G, n), gen, dtype, DEVICE), shift=randn((G, n), gen, dtype, DEVICE),
                     relu=True, residual=randn((T, n), gen, dtype, DEVICE))
    y = tk.segment_matmul(x, w, offsets_for(counts), transpose_w=transpose_w, **extra)
    ref_extra = {key: (val.double() if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
    ref = segment_matmul_ref(x.double(), w.double(), counts, transpose_w, **ref_extra)
    assert y.dtype == out_dtype(dtype)
    close(y, ref)


def test_segment_matmul_strided_inputs(gen):
    counts = [0, 7, 0, 22]
    T, G, k, n = sum(counts), len(counts), 17, 19
    x = randn((k, T), gen, torch.float32, DEVICE).T  # column-major view
    w = randn((G, k, n), gen, torch.float32, DEVICE).transpose(1, 2)  # (G, n, k) view, not copied
    y = tk.segment_matmul(x, w, offsets_for(counts))
    close(y, segment_matmul_ref(x.double(), w.double(), counts, True, None, None, None, None, False, None))


# ---------------------------------------------------------------------------- grouped_lowrank


def lowrank_inputs(gen, counts, dtype, optional=True, d=13, r=7):
    T, G = sum(counts), len(counts)
    h = randn((T, d), gen, dtype, DEVICE)
    u = randn((G, d, r), gen, dtype, DEVICE)
    v = randn((G, r, d), gen, dtype, DEVICE)
    bias = randn((G, d), gen, dtype, DEVICE)
    scale = randn((G, d), gen, dtype, DEVICE) if optional else None
    shift = randn((G, d), gen, dtype, DEVICE) if optional else None
    gain = randn((T, d), gen, dtype, DEVICE) if optional else None
    return h, u, v, bias, scale, shift, gain


def lowrank_reference_grads(grad_out, offsets, inputs):
    """Autograd through the float64 reference: grads for each non-None input."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    h, u, v, bias, scale, shift, gain = leaves
    out = reference.grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.double(), allow_unused=True)
    grads = iter(torch.zeros_like(t) if g is None else g for g, t in zip(grads, present))  # T = 0
    return [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optional", [False, True])
def test_grouped_lowrank_forward(gen, dtype, optional):
    counts = random_layout(gen)
    offsets = offsets_for(counts)
    inputs = lowrank_inputs(gen, counts, dtype, optional)
    out = tk.grouped_lowrank(inputs[0], offsets, *inputs[1:])
    ref = reference.grouped_lowrank(f64(inputs[0])[0], offsets,
                                    *[t.double() if t is not None else None for t in inputs[1:]])
    assert out.dtype == out_dtype(dtype)
    close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optional", [False, True])
def test_grouped_lowrank_backward(gen, dtype, optional):
    counts = random_layout(gen)
    offsets = offsets_for(counts)
    inputs = lowrank_inputs(gen, counts, dtype, optional)
    grad_out = randn((sum(counts), inputs[0].shape[1]), gen, dtype, DEVICE)
    grads = tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:])
    refs = lowrank_reference_grads(grad_out, offsets, inputs)
    names = ("h", "u", "v", "bias", "scale", "shift", "gain")
    for name, t, g, ref in zip(names, inputs, grads, refs):
        if t is None:
            assert g is None, name
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        close(g, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_lowrank_clamp_gradient_at_zero(gen, dtype):
    """MEND's initialisation: u = 0, bias = 0, shift = 0, so every pre-activation is exactly 0 and
    the clamp must pass the gradient (torch's clamp gradient at the bound is 1)."""
    counts = [0, 6, 0, 11]
    offsets = offsets_for(counts)
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, dtype)
    u, bias, shift = torch.zeros_like(u), torch.zeros_like(bias), torch.zeros_like(shift)
    inputs = (h, u, v, bias, scale, shift, gain)
    out = tk.grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
    close(out, h.double())  # clamp(0) adds nothing
    grad_out = randn(h.shape, gen, dtype, DEVICE)
    grads = tk.grouped_lowrank_backward(grad_out, h, offsets, u, v, bias, scale, shift, gain)
    refs = lowrank_reference_grads(grad_out, offsets, inputs)
    for g, ref in zip(grads, refs):
        close(g, ref)
    # Explicitly: dshift_g is the group's sum of grad_out (all of it passes at pre = 0) and du is
    # nonzero, which is what lets MEND's u leave zero.
    gid = reference.group_ids(offsets, h.shape[0])
    d_shift = torch.zeros(len(counts), h.shape[1], dtype=torch.float64).index_add_(0, gid, grad_out.double())
    close(grads[5], d_shift)
    assert grads[1][1].abs().sum() > 0


# ------------------------------------------------------------------------------ grouped_outer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_grouped_outer(gen, dtype, fusion):
    counts = random_layout(gen, G=4)
    offsets = offsets_for(counts)
    T, o, i = sum(counts), 29, 13
    eta, mu = randn((T, o), gen, dtype, DEVICE), randn((T, i), gen, dtype, DEVICE)
    alpha = float(torch.rand((), generator=gen)) * 2 - 0.5
    out = tk.grouped_outer(eta, mu, offsets, fusion, alpha)
    ref = reference.grouped_outer(*f64(eta, mu), offsets, fusion, alpha)
    assert out.dtype == out_dtype(dtype)
    close(out, ref)


def test_grouped_outer_strided_inputs(gen):
    counts = [5, 0, 12]
    eta = randn((29, sum(counts)), gen, torch.float64, DEVICE).T
    mu = randn((sum(counts), 26), gen, torch.float64, DEVICE)[:, ::2]
    for fusion in FUSIONS:
        close(tk.grouped_outer(eta, mu, offsets_for(counts), fusion, 1.0),
              reference.grouped_outer(eta, mu, offsets_for(counts), fusion, 1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grouped_outer_ties(gen, dtype):
    """Group 2 = group 0 negated (exact ties in |S|): max keeps group 0's sign; sss/ssm take P on
    P = −N; group 1 (a copy of group 0) ties too and must not win."""
    c = 7
    eta0, mu0 = randn((c, 13), gen, dtype, DEVICE), randn((c, 17), gen, dtype, DEVICE)
    eta = torch.cat([eta0, eta0, -eta0, randn((3, 13), gen, dtype, DEVICE)])
    mu = torch.cat([mu0, mu0, mu0, randn((3, 17), gen, dtype, DEVICE)])
    offsets = offsets_for([0, c, c, c, 0])  # empty first and last groups too
    s0 = eta0.double().T @ mu0.double()
    out_max = tk.grouped_outer(eta[:3 * c], mu[:3 * c], offsets, "max", 1.0)
    close(out_max, s0)
    assert torch.equal(torch.sign(out_max), torch.sign(s0).to(out_max.dtype))
    for fusion in ("max", "sss", "ssm"):
        close(tk.grouped_outer(eta[:3 * c], mu[:3 * c], offsets, fusion, 0.5),
              reference.grouped_outer(*f64(eta[:3 * c], mu[:3 * c]), offsets, fusion, 0.5))
    # With only the two opposite groups, P == −N everywhere: sss must return P = |S_0|.
    pair = offsets_for([c, c])
    both_eta, both_mu = torch.cat([eta0, -eta0]), torch.cat([mu0, mu0])
    close(tk.grouped_outer(both_eta, both_mu, pair, "sss", 1.0), s0.abs())
    close(tk.grouped_outer(both_eta, both_mu, pair, "ssm", 1.0), s0.abs() / 2)


# --------------------------------------------------------------------------- segmented_fisher


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_fisher(gen, dtype):
    counts = random_layout(gen, G=6, max_count=7)
    offsets = offsets_for(counts)
    T, o, i = sum(counts), 13, 31
    eta, mu = randn((T, o), gen, dtype, DEVICE), randn((T, i), gen, dtype, DEVICE)
    out = tk.segmented_fisher(eta, mu, offsets)
    assert out.dtype == out_dtype(dtype)
    close(out, reference.segmented_fisher(*f64(eta, mu), offsets))


# ----------------------------------------------------------------------- lowrank_delta_linear


def delta_inputs(gen, counts, dtype, N=23, o=29, i=13, alpha_shape="per_group", bias=True, rows=None):
    G, T = len(counts), sum(counts)
    x = randn((N, i), gen, dtype, DEVICE)
    weight = randn((o, i), gen, dtype, DEVICE)
    b = randn((o,), gen, dtype, DEVICE) if bias else None
    if rows is None:
        rows = torch.randint(-1, G, (N,), generator=gen)  # unsorted, with unedited rows
    row_group = rows.to(DEVICE)
    mu_t, eta_t = randn((T, i), gen, dtype, DEVICE), randn((T, o), gen, dtype, DEVICE)
    alpha = randn((G,) if alpha_shape == "per_group" else (1,), gen, dtype, DEVICE)
    return x, weight, b, row_group, mu_t, eta_t, alpha


def delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad):
    """(y, dx, dmu_t, deta_t, dalpha) by autograd through the float64 reference."""
    xr, mr, er, ar = [t.detach().double().requires_grad_() for t in (x, mu_t, eta_t, alpha)]
    y = reference.lowrank_delta_linear(xr, weight.double(), b.double() if b is not None else None,
                                       row_group, mr, er, offsets, ar)
    grads = torch.autograd.grad(y, (xr, mr, er, ar), grad.double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (xr, mr, er, ar))]
    return (y.detach(), *grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha_shape", ["per_group", "shared"])
@pytest.mark.parametrize("row_dtype", [torch.int64, torch.int32])
def test_lowrank_delta_linear(gen, dtype, alpha_shape, row_dtype):
    counts = random_layout(gen, G=4)
    offsets = offsets_for(counts)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, alpha_shape=alpha_shape)
    row_group = row_group.to(row_dtype)
    grad = randn((x.shape[0], weight.shape[0]), gen, dtype, DEVICE)
    y = tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    assert y.dtype == dtype  # x's dtype: a drop-in for the layer
    close(y, y_ref)
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    for t, g, ref in zip((x, mu_t, eta_t, alpha), grads, grad_refs):
        assert g.dtype == t.dtype and g.shape == t.shape
        close(g, ref)


def test_lowrank_delta_linear_unedited_rows_and_no_bias(gen):
    """All rows −1: the plain layer, and no gradient reaches the factors."""
    counts = [4, 0, 9]
    offsets = offsets_for(counts)
    rows = torch.full((17,), -1, dtype=torch.int64)
    x, weight, _, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float64, N=17, rows=rows,
                                                              bias=False)
    y = tk.lowrank_delta_linear(x, weight, None, row_group, mu_t, eta_t, offsets, alpha)
    close(y, x @ weight.T)
    grad = randn(y.shape, gen, torch.float64, DEVICE)
    dx, dmu, deta, dalpha = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t,
                                                             offsets, alpha)
    close(dx, grad @ weight)
    assert not dmu.any() and not deta.any() and not dalpha.any()


# --------------------------------------------------------------------- layouts: empty and T = 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_layouts(gen, layout, dtype):
    """Every launcher on T = 0, all-empty, empty first/last/middle and single-group layouts."""
    counts = LAYOUTS[layout]
    offsets = offsets_for(counts)
    T = sum(counts)

    inputs = lowrank_inputs(gen, counts, dtype)
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]),
          reference.grouped_lowrank(f64(inputs[0])[0], offsets, *f64(*inputs[1:])), dtype)
    grad_out = randn(inputs[0].shape, gen, dtype, DEVICE)
    grads = tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:])
    for g, ref in zip(grads, lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref, dtype)

    eta, mu = randn((T, 19), gen, dtype, DEVICE), randn((T, 11), gen, dtype, DEVICE)
    for fusion in FUSIONS:
        out = tk.grouped_outer(eta, mu, offsets, fusion, 0.75)
        ref = reference.grouped_outer(*f64(eta, mu), offsets, fusion, 0.75)
        if T == 0:
            assert not out.any() and out.shape == ref.shape
        else:
            close(out, ref)
    fisher = tk.segmented_fisher(eta, mu, offsets)
    if T == 0:
        assert not fisher.any() and fisher.shape == (19, 11)
    else:
        close(fisher, reference.segmented_fisher(*f64(eta, mu), offsets))

    for N in (0, 21):
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, N=N)
        grad = randn((N, weight.shape[0]), gen, dtype, DEVICE)
        y = tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
        grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
        refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
        for out, ref in zip((y, *grads), refs):
            assert out.shape == ref.shape
            if ref.numel() and ref.abs().max() > 0:
                close(out, ref, dtype)
            else:
                assert not out.any()


# ---------------------------------------------------------------------------- bad input, syncs


def test_bad_inputs_raise_value_error_naming_the_argument(gen):
    offsets = offsets_for([3, 4])
    eta, mu = randn((7, 5), gen, torch.float32, DEVICE), randn((7, 6), gen, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="fusion"):
        tk.grouped_outer(eta, mu, offsets, "mean", 1.0)
    with pytest.raises(ValueError, match="eta and mu"):
        tk.grouped_outer(eta, mu[:6], offsets_for([3, 3]), "add", 1.0)
    with pytest.raises(ValueError, match="offsets"):
        tk.segmented_fisher(eta, mu, offsets.float())
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, [3, 4], torch.float32)
    with pytest.raises(ValueError, match="v must"):
        tk.grouped_lowrank(h, offsets, u, v[:, :, :-1], bias)
    with pytest.raises(ValueError, match="gain"):
        tk.grouped_lowrank(h, offsets, u, v, bias, gain=gain[:-1])
    with pytest.raises(ValueError, match="w must"):
        tk.segment_matmul(h, v[:1], offsets)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, [3, 4], torch.float32)
    with pytest.raises(ValueError, match="row_group"):
        tk.lowrank_delta_linear(x, weight, b, row_group.float(), mu_t, eta_t, offsets, alpha)
    with pytest.raises(ValueError, match="alpha"):
        tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha.repeat(2))
    with pytest.raises(ValueError, match="grad"):
        tk.lowrank_delta_linear_backward(x, x, weight, row_group, mu_t, eta_t, offsets, alpha)


def test_launchers_do_not_read_tensors_on_the_host(gen):
    """No .item()/.tolist()/.cpu()/bool()/int() on a tensor inside any launcher: on CUDA each
    would stall the stream.  (Under the interpreter this guards the launchers' Python code.)"""
    counts = [0, 5, 0, 9, 3]
    offsets = offsets_for(counts)
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, torch.float32)
    eta, mu = randn((17, 7), gen, torch.float32, DEVICE), randn((17, 9), gen, torch.float32, DEVICE)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float32)
    grad_h, grad_y = torch.ones_like(h), torch.ones(x.shape[0], weight.shape[0], device=DEVICE)

    def host_read(*args, **kwargs):
        raise AssertionError("a launcher read a tensor on the host")

    with ExitStack() as stack:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, host_read))
        for fusion in FUSIONS:
            tk.grouped_outer(eta, mu, offsets, fusion, 0.5)
        tk.segmented_fisher(eta, mu, offsets)
        tk.grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
        tk.grouped_lowrank_backward(grad_h, h, offsets, u, v, bias, scale, shift, gain)
        tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
        tk.lowrank_delta_linear_backward(grad_y, x, weight, row_group, mu_t, eta_t, offsets, alpha)
