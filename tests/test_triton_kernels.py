"""Triton kernels against the float64 reference (dcedit_kernels.reference, torch.autograd on it).

Every test takes the `device` fixture: "cpu" runs the kernels on CPU tensors under
TRITON_INTERPRET=1 (tests/conftest.py sets it before anything imports triton), "cuda" compiles
them for the GPU (DCEDIT_TEST_CUDA=1 with a CUDA device; the interpreter is then off, so "cpu"
skips).  CPU shapes are small and odd (the interpreter emulates every program in Python) but
span several 16-wide tiles, so groups take several tiles and end in ragged ones.  Half-precision inputs are
compared with the reference fed the same rounded values in float64, so the tolerance is that of
the output's dtype.  On CUDA the 16-bit inputs take the tensor-core dot (`launch.native_dot`),
and further tests run benchmark-sized shapes and every launch config candidate.
"""

import collections
import importlib
import inspect
import os
import sys
import warnings
from contextlib import ExitStack
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from dcedit_kernels import reference  # noqa: E402
from dcedit_kernels import triton_kernels as tk  # noqa: E402
from dcedit_kernels.triton_kernels import launch  # noqa: E402
from dcedit_kernels.triton_kernels.segment_matmul import _split_bf16x3  # noqa: E402
from helpers import (TOL, draw_clear_of_cuts, nan_outer_case, randn, ragged_offsets,  # noqa: E402
                     random_counts, rel_err)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = not INTERPRET and os.environ.get("DCEDIT_TEST_CUDA", "0") == "1" and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs DCEDIT_TEST_CUDA=1 and a CUDA device")


@pytest.fixture(params=[
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=cuda_only),
])
def device(request):
    """Overrides conftest's: "cpu" here means the interpreter, which is off in a CUDA run."""
    return request.param


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


def offsets_for(counts, device):
    return ragged_offsets(counts, device)


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
def test_segment_matmul(gen, dtype, transpose_w, fused, device):
    counts = random_layout(gen)
    T, G, k, n = sum(counts), len(counts), 13, 29
    x = randn((T, k), gen, dtype, device)
    w = randn((G, n, k) if transpose_w else (G, k, n), gen, dtype, device)
    extra = dict(gain=None, bias=None, scale=None, shift=None, relu=False, residual=None)
    if fused:
        extra = dict(gain=randn((T, k), gen, dtype, device), bias=randn((G, n), gen, dtype, device),
                     scale=randn((G, n), gen, dtype, device), shift=randn((G, n), gen, dtype, device),
                     relu=True, residual=randn((T, n), gen, dtype, device))
    y = tk.segment_matmul(x, w, offsets_for(counts, device), transpose_w=transpose_w, **extra)
    ref_extra = {key: (val.double() if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
    ref = segment_matmul_ref(x.double(), w.double(), counts, transpose_w, **ref_extra)
    assert y.dtype == out_dtype(dtype)
    close(y, ref)


@pytest.mark.parametrize("transpose_w", [True, False])
def test_segment_matmul_select(gen, transpose_w, device):
    """select=: group g multiplies by W ⊙ (bit g % 32 of word g // 32), from one W shared by the
    groups (a stride-0 expand); 35 groups take two words, and random words set bit 31 too."""
    counts = random_counts(35, gen, max_count=4)
    G, T, k, n = len(counts), sum(counts), 13, 19
    x = randn((T, k), gen, torch.float64, device)
    shape = (n, k) if transpose_w else (k, n)
    w = randn(shape, gen, torch.float64, device)
    words = torch.randint(-2**31, 2**31, (2, *shape), generator=gen, dtype=torch.int64).to(torch.int32).to(device)
    y = tk.segment_matmul(x, w.expand(G, *shape), offsets_for(counts, device), transpose_w=transpose_w, select=words)
    masked = torch.stack([w * ((words[g // 32] >> (g % 32)) & 1) for g in range(G)])
    close(y, segment_matmul_ref(x, masked, counts, transpose_w, None, None, None, None, False, None))


@pytest.mark.parametrize("counts", [[17] * 8, [0, 33, 16, 1, 0, 47], [40], [16, 0, 16]])
def test_segment_matmul_tile_schedule(gen, counts, device):
    """Each program owns rows of one group (cdiv(n_g, BLOCK_M) tiles per group, BLOCK_M = 16
    under the interpreter).  Eight groups of 17 rows need 16 tiles, exactly the grid's bound
    cdiv(T, 16) + G − 1: one program fewer would leave the last tile unwritten."""
    T, G, k, n = sum(counts), len(counts), 9, 21
    x = randn((T, k), gen, torch.float64, device)
    w = randn((G, n, k), gen, torch.float64, device)
    bias = randn((G, n), gen, torch.float64, device)
    y = tk.segment_matmul(x, w, offsets_for(counts, device), bias=bias)
    close(y, segment_matmul_ref(x, w, counts, True, None, bias, None, None, False, None))


def test_segment_matmul_strided_inputs(gen, device):
    counts = [0, 7, 0, 22]
    T, G, k, n = sum(counts), len(counts), 17, 19
    x = randn((k, T), gen, torch.float32, device).T  # column-major view
    w = randn((G, k, n), gen, torch.float32, device).transpose(1, 2)  # (G, n, k) view, not copied
    y = tk.segment_matmul(x, w, offsets_for(counts, device))
    close(y, segment_matmul_ref(x.double(), w.double(), counts, True, None, None, None, None, False, None))


# ---------------------------------------------------------------------------- grouped_lowrank


def lowrank_inputs(gen, counts, dtype, device, optional=True, d=13, r=7):
    T, G = sum(counts), len(counts)
    h = randn((T, d), gen, dtype, device)
    u = randn((G, d, r), gen, dtype, device)
    v = randn((G, r, d), gen, dtype, device)
    bias = randn((G, d), gen, dtype, device)
    scale = randn((G, d), gen, dtype, device) if optional else None
    shift = randn((G, d), gen, dtype, device) if optional else None
    gain = randn((T, d), gen, dtype, device) if optional else None
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
def test_grouped_lowrank_forward(gen, dtype, optional, device):
    counts = random_layout(gen)
    offsets = offsets_for(counts, device)
    inputs = lowrank_inputs(gen, counts, dtype, device, optional)
    out = tk.grouped_lowrank(inputs[0], offsets, *inputs[1:])
    ref = reference.grouped_lowrank(f64(inputs[0])[0], offsets,
                                    *[t.double() if t is not None else None for t in inputs[1:]])
    assert out.dtype == out_dtype(dtype)
    close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optional", [False, True])
def test_grouped_lowrank_backward(gen, dtype, optional, device):
    counts = random_layout(gen)
    offsets = offsets_for(counts, device)
    inputs = lowrank_inputs(gen, counts, dtype, device, optional)
    grad_out = randn((sum(counts), inputs[0].shape[1]), gen, dtype, device)
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
def test_grouped_lowrank_clamp_gradient_at_zero(gen, dtype, device):
    """MEND's initialisation: u = 0, bias = 0, shift = 0, so every pre-activation is exactly 0 and
    the clamp must pass the gradient (1 at the bound, as the reference's clamp gives it on every
    torch; torch 2.15's own clamp gives 0 there)."""
    counts = [0, 6, 0, 11]
    offsets = offsets_for(counts, device)
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, dtype, device)
    u, bias, shift = torch.zeros_like(u), torch.zeros_like(bias), torch.zeros_like(shift)
    inputs = (h, u, v, bias, scale, shift, gain)
    out = tk.grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
    close(out, h.double())  # clamp(0) adds nothing
    grad_out = randn(h.shape, gen, dtype, device)
    grads = tk.grouped_lowrank_backward(grad_out, h, offsets, u, v, bias, scale, shift, gain)
    refs = lowrank_reference_grads(grad_out, offsets, inputs)
    for g, ref in zip(grads, refs):
        close(g, ref)
    # Explicitly: dshift_g is the group's sum of grad_out (all of it passes at pre = 0) and du is
    # nonzero, which is what lets MEND's u leave zero.
    gid = reference.group_ids(offsets, h.shape[0])
    d_shift = torch.zeros(len(counts), h.shape[1], dtype=torch.float64, device=device)
    d_shift.index_add_(0, gid, grad_out.double())
    close(grads[5], d_shift)
    assert grads[1][1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grouped_lowrank_signed_zeros_at_initialisation(gen, dtype, device):
    """u = 0, bias = 0 and a negative scale make every pre-activation exactly -0, which the clamp
    keeps (torch's clamp and the reference give -0): an h entry of -0 stays -0 in the output.
    Random inputs never give an exact zero, and `close` compares values, so without this test a
    fused clamp that turns -0 into +0 (`acc <= 0`) passed every Triton test."""
    counts = [0, 5, 1, 0, 19, 3]
    offsets = offsets_for(counts, device)
    h, u, v, bias, scale, _, _ = lowrank_inputs(gen, counts, dtype, device)
    u, bias = torch.zeros_like(u), torch.zeros_like(bias)
    scale = -(scale.abs() + 0.5)
    h[:, ::2] = -0.0
    out = tk.grouped_lowrank(h, offsets, u, v, bias, scale, None, None)
    ref = reference.grouped_lowrank(*f64(h), offsets, *f64(u, v, bias, scale), None, None)
    assert torch.equal(out.double(), ref) and torch.equal(out, h.to(out.dtype))
    assert bool(torch.signbit(ref[:, ::2]).all())
    assert torch.equal(torch.signbit(out), torch.signbit(ref))


def test_grouped_lowrank_backward_long_group_sums_in_fp32(gen, device):
    """bf16 inputs, one group of 700 tokens with every pre-activation positive (u small, bias,
    scale and shift positive) and a positive grad_out: dbias, dscale and dshift each add 700
    same-sign terms per feature.  They must accumulate in fp32 and round once to bf16; summed in
    bf16 the running sum stalls once its ulp outgrows a term (a few hundred terms, ~half the
    sum lost), and the random-layout tests' groups of at most 11 tokens left bf16 sums within
    tolerance.  Only a CUDA run can fail it: torch's CPU index_add_ on bf16 sums near-exactly
    (700 values of rand: 340 against 339.74), where CUDA's adds with bf16 atomics, so the mutant
    that sums d_scale in the parameter dtype passed it under the interpreter."""
    counts = [0, 700, 5]
    offsets = offsets_for(counts, device)
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, torch.bfloat16, device)
    u = (u.float() * 0.01).to(torch.bfloat16)
    bias, scale, shift = bias.abs() + 1, scale.abs() + 0.5, shift.abs()
    inputs = (h, u, v, bias, scale, shift, gain)
    grad_out = randn(h.shape, gen, torch.bfloat16, device).abs()
    grads = tk.grouped_lowrank_backward(grad_out, h, offsets, *inputs[1:])
    refs = lowrank_reference_grads(grad_out, offsets, inputs)
    for name, g, ref in zip(("h", "u", "v", "bias", "scale", "shift", "gain"), grads, refs):
        assert g.dtype == torch.bfloat16, name
        close(g, ref)


def test_grouped_lowrank_backward_nonfinite_gradient_off_the_clamp(gen, device):
    """An inf and a NaN in grad_out where the clamp cut pre off (pre < 0): torch's clamp backward
    selects, so they give 0 there and every other gradient stays finite (dh keeps them, through
    the residual).  dout ⊙ [pre >= 0] turned them into NaN in du, dv, dbias, dscale, dshift, dgain
    and dh of the group's tokens."""
    counts = [0, 6, 0, 11]
    offsets = offsets_for(counts, device)
    inputs = list(lowrank_inputs(gen, counts, torch.float32, device))
    inputs[5] = inputs[5].clone()
    inputs[5][:, 2] = -1e4  # shift: feature 2's pre-activation is negative for every token
    grad_out = randn(inputs[0].shape, gen, torch.float32, device)
    grad_out[1, 2], grad_out[9, 2] = float("inf"), float("nan")
    grads = tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:])
    refs = lowrank_reference_grads(grad_out, offsets, inputs)
    for name, g, ref in zip(("h", "u", "v", "bias", "scale", "shift", "gain"), grads, refs):
        if name != "h":
            assert ref.isfinite().all(), name
        same_nonfinite(g, ref)


# ------------------------------------------------------------------------------ grouped_outer


def outer_case(gen, dtype, device, fusion, signs):
    """(offsets, eta, mu, alpha): 4 random groups (one empty), o 29, i 13, alpha in [-0.5, 1.5),
    drawn again while a selection of `fusion` lies within rounding of its cut (`signs`: the
    backward's S_g signs too; helpers.outer_selections_clear says why)."""
    def draw():
        counts = random_layout(gen, G=4)
        T, o, i = sum(counts), 29, 13
        eta, mu = randn((T, o), gen, dtype, device), randn((T, i), gen, dtype, device)
        # An alpha within ~3e-6 of 0 makes the fp16 backward's outputs fp16 subnormals, whose
        # relative error passes fp16's tolerance (seed 4015834 drew -4.8e-7: 0.018 >= 3e-3).
        alpha = 0.0
        while abs(alpha) < 1e-3:
            alpha = float(torch.rand((), generator=gen)) * 2 - 0.5
        return eta, mu, offsets_for(counts, device), alpha

    eta, mu, offsets, alpha = draw_clear_of_cuts(draw, fusion, signs)
    return offsets, eta, mu, alpha


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_grouped_outer(gen, dtype, fusion, device):
    offsets, eta, mu, alpha = outer_case(gen, dtype, device, fusion, signs=False)
    out = tk.grouped_outer(eta, mu, offsets, fusion, alpha)
    ref = reference.grouped_outer(*f64(eta, mu), offsets, fusion, alpha)
    assert out.dtype == out_dtype(dtype)
    close(out, ref)


def test_grouped_outer_strided_inputs(gen, device):
    counts = [5, 0, 12]
    eta = randn((29, sum(counts)), gen, torch.float64, device).T
    mu = randn((sum(counts), 26), gen, torch.float64, device)[:, ::2]
    for fusion in FUSIONS:
        close(tk.grouped_outer(eta, mu, offsets_for(counts, device), fusion, 1.0),
              reference.grouped_outer(eta, mu, offsets_for(counts, device), fusion, 1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grouped_outer_ties(gen, dtype, device):
    """Group 2 = group 0 negated (exact ties in |S|): max keeps group 0's sign; sss/ssm take P on
    P = −N; group 1 (a copy of group 0) ties too and must not win."""
    c = 7
    eta0, mu0 = randn((c, 13), gen, dtype, device), randn((c, 17), gen, dtype, device)
    eta = torch.cat([eta0, eta0, -eta0, randn((3, 13), gen, dtype, device)])
    mu = torch.cat([mu0, mu0, mu0, randn((3, 17), gen, dtype, device)])
    offsets = offsets_for([0, c, c, c, 0], device)  # empty first and last groups too
    s0 = eta0.double().T @ mu0.double()
    out_max = tk.grouped_outer(eta[:3 * c], mu[:3 * c], offsets, "max", 1.0)
    close(out_max, s0)
    assert torch.equal(torch.sign(out_max), torch.sign(s0).to(out_max.dtype))
    for fusion in ("max", "sss", "ssm"):
        close(tk.grouped_outer(eta[:3 * c], mu[:3 * c], offsets, fusion, 0.5),
              reference.grouped_outer(*f64(eta[:3 * c], mu[:3 * c]), offsets, fusion, 0.5))
    # With only the two opposite groups, P == −N everywhere: sss must return P = |S_0|.
    pair = offsets_for([c, c], device)
    both_eta, both_mu = torch.cat([eta0, -eta0]), torch.cat([mu0, mu0])
    close(tk.grouped_outer(both_eta, both_mu, pair, "sss", 1.0), s0.abs())
    close(tk.grouped_outer(both_eta, both_mu, pair, "ssm", 1.0), s0.abs() / 2)


@pytest.mark.parametrize("version,hip,interpret,ptx", [
    ("3.4.0", None, "0", True), ("3.5.1", None, "0", True),  # CUDA before 3.6: div_rn is div.rn.ftz.f32
    ("3.6.0", None, "0", False), ("3.9.0", None, "0", False),  # div_rn is div.rn.f32 itself
    ("3.5.1", None, "1", False),  # the interpreter runs no PTX
    ("3.4.0", "6.4.43482", "0", False), ("3.5.1", "6.4.43482", "0", False),  # ROCm: no PTX at all
])
def test_grouped_outer_writes_the_ptx_division_only_for_cuda_before_triton_3_6(version, hip, interpret, ptx,
                                                                              monkeypatch):
    """grouped_outer.py's `_PTX_DIV`, read once at import: the ssm/Fisher fp32 division is PTX
    `div.rn.f32` only where triton compiles for an NVIDIA GPU and its div_rn flushes subnormals.
    A ROCm torch's triton compiles the kernel for AMD GPUs: the PTX there aborted the compile
    (triton 3.5.1, gfx942: LLVM's "couldn't allocate output register for constraint 'f'").  The
    module's source is run again under each setting, as a module of its own."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    spec = importlib.util.spec_from_file_location("dcedit_kernels.triton_kernels._grouped_outer_probe",
                                                  Path(tk.__file__).with_name("grouped_outer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._PTX_DIV.value is ptx


def outer_backward_ref(grad, eta, mu, offsets, fusion, alpha):
    """The reference backward on float64 copies of the same (rounded) values."""
    return reference.grouped_outer_backward(*f64(grad, eta, mu), offsets, fusion, alpha)


def outer_grad(gen, G, o, i, fusion, dtype, device):
    return randn((G, o, i) if fusion == "none" else (o, i), gen, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_grouped_outer_backward(gen, dtype, fusion, device):
    offsets, eta, mu, alpha = outer_case(gen, dtype, device, fusion, signs=True)
    grad = outer_grad(gen, offsets.numel() - 1, eta.shape[1], mu.shape[1], fusion, out_dtype(dtype), device)
    d_eta, d_mu = tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha)
    assert d_eta.dtype == eta.dtype and d_mu.dtype == mu.dtype
    for out, ref in zip((d_eta, d_mu), outer_backward_ref(grad, eta, mu, offsets, fusion, alpha)):
        close(out, ref)


@pytest.mark.parametrize("fusion", ["max", "sss", "ssm"])
def test_grouped_outer_backward_past_32_groups(gen, fusion, device):
    """37 groups need two selection words (bit g % 32 of word g // 32).  Groups 31 and 32, on
    either side of the words' boundary, always hold tokens: a bit of group 32 that spills into
    word 0's bit 31 (or a winner of word 0 into word 1's bit 0) moves gradient between them, and
    with one of them empty at random (seed 1: both) that went unseen.  Inputs with a selection
    within fp32 rounding of its cut are drawn again (`draw_clear_of_cuts`): of 100,000 draws, torch's
    fp32 sums flipped one max winner (|S| 2.21193823 vs 2.21193806) and two S_g signs (-6.6e-9 and
    -2.3e-8), about 5e-5 failures a run of the three tests, and the kernel failed on each of those
    seeds (DCEDIT_TEST_SEED=1028466, 1015518, 1074270)."""
    def draw():
        counts = random_counts(37, gen, max_count=3)
        counts[31], counts[32] = 2, 3
        T = sum(counts)
        return randn((T, 17), gen, torch.float32, device), randn((T, 10), gen, torch.float32, device), \
            offsets_for(counts, device)

    eta, mu, offsets = draw_clear_of_cuts(draw, fusion)
    go = _module("grouped_outer")
    sel = go.launch_grouped_outer(eta, mu, offsets, go.FUSION_MODES[fusion], select=True)
    assert sel.shape == (2, 17, 10) and sel.dtype == torch.int32
    grad = randn((17, 10), gen, torch.float32, device)
    for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 1.3),
                        outer_backward_ref(grad, eta, mu, offsets, fusion, 1.3)):
        close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grouped_outer_backward_ties(gen, dtype, device):
    """Exact ties in |S|: group 1 copies group 0 and group 2 negates it.  max gives the gradient
    to group 0 alone (the first of the tied groups); sss/ssm select by sign as the reference."""
    c = 6
    eta0, mu0 = randn((c, 11), gen, dtype, device), randn((c, 9), gen, dtype, device)
    eta, mu = torch.cat([eta0, eta0, -eta0]), torch.cat([mu0, mu0, mu0])
    offsets = offsets_for([0, c, c, c, 0], device)
    grad = randn((11, 9), gen, dtype, device)
    for fusion in ("max", "sss", "ssm"):
        d_eta, d_mu = tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5)
        for out, ref in zip((d_eta, d_mu), outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
            close(out, ref)
        if fusion == "max":
            assert not d_eta[c:].any() and not d_mu[c:].any()  # only the first of the tied groups
    # With only the two opposite groups, P == −N everywhere: the forward takes P, and the backward
    # must select P's side (the three groups above never make P == −N).
    pair = offsets_for([c, c], device)
    both_eta, both_mu = torch.cat([eta0, -eta0]), torch.cat([mu0, mu0])
    for fusion in ("sss", "ssm"):
        for out, ref in zip(tk.grouped_outer_backward(grad, both_eta, both_mu, pair, fusion, 0.5),
                            outer_backward_ref(grad, both_eta, both_mu, pair, fusion, 0.5)):
            close(out, ref)


@pytest.mark.parametrize("fusion", ["sss", "ssm"])
def test_grouped_outer_backward_exact_zero_shift_gets_no_gradient(gen, fusion, device):
    """A feature that a group never sees (a zero column of its μ, as after a ReLU) makes that
    column of S_g exactly 0: it reaches neither P nor N, so the selection words must leave its
    bit clear on both sides (S_g > 0 where P wins, S_g < 0 where N wins) and that column of the
    group's d_mu is exactly 0, as in the reference.  Gaussian inputs never give an exact 0."""
    counts = [0, 7, 5, 9, 0]
    offsets = offsets_for(counts, device)
    T = sum(counts)
    eta, mu = randn((T, 13), gen, torch.float32, device), randn((T, 17), gen, torch.float32, device)
    mu[7:12, ::3] = 0.0  # group 2 (rows 7..11): S_2[:, ::3] == 0 exactly
    grad = randn((13, 17), gen, torch.float32, device)
    d_eta, d_mu = tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.7)
    ref = outer_backward_ref(grad, eta, mu, offsets, fusion, 0.7)
    assert not ref[1][7:12, ::3].any()
    assert not d_mu[7:12, ::3].any(), "an exactly-zero S_g entry got gradient"
    for out, r in zip((d_eta, d_mu), ref):
        close(out, r)


@pytest.mark.parametrize("fusion", ["max", "sss", "ssm"])
def test_grouped_outer_nan_shift(gen, fusion, device):
    """NaN in S_g propagates and max takes the first NaN group, as the reference (torch's argmax
    and clamp).  Before, max kept a finite entry (`NaN > x` is false) and sss summed with
    tl.maximum, which drops NaN by default (propagate_nan=NONE)."""
    eta, mu, offsets, nan_mask = nan_outer_case(gen, device=device)
    out = tk.grouped_outer(eta, mu, offsets, fusion, 0.5)
    assert torch.equal(out.isnan(), nan_mask)
    torch.testing.assert_close(out.double(), reference.grouped_outer(*f64(eta, mu), offsets, fusion, 0.5),
                               rtol=1e-5, atol=1e-5, equal_nan=True)
    grad = randn(tuple(nan_mask.shape), gen, torch.float32, device)
    for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5),
                        outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_grouped_lowrank_nan_in_the_hidden_layer_propagates(gen, device):
    """A NaN pre-activation stays NaN through the clamp, as the reference's clamp(min=0)
    (tl.maximum gave 0: it drops NaN by default)."""
    counts = [3, 4]
    h, u, v, bias, *_ = lowrank_inputs(gen, counts, torch.float32, device, optional=False)
    bias[1, 2] = float("nan")  # group 1's hidden unit 2
    out = tk.grouped_lowrank(h, offsets_for(counts, device), u, v, bias, None, None, None)
    assert out[3:, 2].isnan().all() and not out[:3].isnan().any()


# --------------------------------------------------------------------------- segmented_fisher


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_fisher(gen, dtype, device):
    counts = random_layout(gen, G=6, max_count=7)
    offsets = offsets_for(counts, device)
    T, o, i = sum(counts), 13, 31
    eta, mu = randn((T, o), gen, dtype, device), randn((T, i), gen, dtype, device)
    out = tk.segmented_fisher(eta, mu, offsets)
    assert out.dtype == out_dtype(dtype)
    close(out, reference.segmented_fisher(*f64(eta, mu), offsets))


# ----------------------------------------------------------------------- lowrank_delta_linear


def delta_inputs(gen, counts, dtype, device, N=23, o=29, i=13, alpha_shape="per_group", bias=True, rows=None):
    G, T = len(counts), sum(counts)
    x = randn((N, i), gen, dtype, device)
    weight = randn((o, i), gen, dtype, device)
    b = randn((o,), gen, dtype, device) if bias else None
    if rows is None:
        rows = torch.randint(-1, G, (N,), generator=gen)  # unsorted, with unedited rows
    row_group = rows.to(device)
    mu_t, eta_t = randn((T, i), gen, dtype, device), randn((T, o), gen, dtype, device)
    alpha = randn((G,) if alpha_shape == "per_group" else (1,), gen, dtype, device)
    return x, weight, b, row_group, mu_t, eta_t, alpha


def delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad):
    """(y, dx, dmu_t, deta_t, dalpha) by autograd through the float64 reference."""
    xr, mr, er, ar = [t.detach().double().requires_grad_() for t in (x, mu_t, eta_t, alpha)]
    y = reference.lowrank_delta_linear(xr, weight.double(), b.double() if b is not None else None,
                                       row_group, mr, er, offsets, ar)
    grads = torch.autograd.grad(y, (xr, mr, er, ar), grad.double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (xr, mr, er, ar))]
    return (y.detach(), *grads)


def close_dalpha(dalpha, ref, deta_ref, eta_t, offsets, alpha):
    """dalpha against the conditioning of its sum, not against |dalpha|.

    dalpha_g sums eta_t ⊙ deta_t / alpha_g over the o × |seg_g| entries of its group, which
    cancel, so its rounding error scales with Σ|terms| (a shared alpha sums every group: 4.9e-5
    relative error in fp32 at seed 1157190009, |dalpha| 0.17, which `close` rejected).
    """
    tol = TOL[dalpha.dtype]
    dalpha, ref = dalpha.double().cpu(), ref.double().cpu()
    assert dalpha.shape == ref.shape and torch.isfinite(dalpha).all()
    G = offsets.shape[0] - 1
    groups = reference.group_ids(offsets.cpu(), eta_t.shape[0])
    a = alpha.detach().double().cpu().reshape(-1).expand(G)[groups].abs().clamp_min(1e-30)
    terms = (eta_t.double().cpu() * deta_ref.double().cpu()).abs().sum(1) / a
    scale = torch.zeros(G, dtype=torch.float64).index_add_(0, groups, terms)
    scale = scale.sum() if alpha.numel() == 1 else scale
    bound = tol * scale.reshape(ref.shape) + 1e-30
    assert ((dalpha - ref).abs() <= bound).all(), f"dalpha {dalpha} vs {ref}, bound {bound}"


def dalpha_conditioning(grad, x, row_group, mu_t, eta_t, offsets):
    """Per group, Σ_{n∈g, s∈g} (|x_n| · |μ_s|)(|grad_n| · |η_s|) in float64: what the rounding error
    of dalpha_g = Σ (x_n · μ_s)(grad_n · η_s) scales with, whatever alpha (`close_dalpha` reads it
    through deta_t / alpha_g, which a non-finite alpha_g leaves undefined)."""
    grad, x, mu_t, eta_t = (t.detach().double().cpu().abs() for t in (grad, x, mu_t, eta_t))
    bounds = offsets.cpu().tolist()
    rows = row_group.cpu()
    return torch.tensor([float(((x[rows == g] @ mu_t[s:e].T) * (grad[rows == g] @ eta_t[s:e].T)).sum())
                         for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))], dtype=torch.float64)


def close_delta_grads(grads, refs, eta_t, offsets, alpha, close_fn=None):
    """(dx, dmu_t, deta_t) by `close_fn` (default `close`), dalpha by `close_dalpha`."""
    for g, ref in zip(grads[:3], refs[:3]):
        (close_fn or close)(g, ref)
    close_dalpha(grads[3], refs[3], refs[2], eta_t, offsets, alpha)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha_shape", ["per_group", "shared"])
@pytest.mark.parametrize("row_dtype", [torch.int64, torch.int32])
def test_lowrank_delta_linear(gen, dtype, alpha_shape, row_dtype, device):
    counts = random_layout(gen, G=4)
    offsets = offsets_for(counts, device)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, device, alpha_shape=alpha_shape)
    row_group = row_group.to(row_dtype)
    grad = randn((x.shape[0], weight.shape[0]), gen, dtype, device)
    y = tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    assert y.dtype == dtype  # x's dtype: a drop-in for the layer
    close(y, y_ref)
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    for t, g in zip((x, mu_t, eta_t, alpha), grads):
        assert g.dtype == t.dtype and g.shape == t.shape
    close_delta_grads(grads, grad_refs, eta_t, offsets, alpha)


def test_lowrank_delta_linear_unedited_rows_and_no_bias(gen, device):
    """All rows −1: the plain layer, and no gradient reaches the factors."""
    counts = [4, 0, 9]
    offsets = offsets_for(counts, device)
    rows = torch.full((17,), -1, dtype=torch.int64)
    x, weight, _, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float64, device, N=17,
                                                              rows=rows, bias=False)
    y = tk.lowrank_delta_linear(x, weight, None, row_group, mu_t, eta_t, offsets, alpha)
    close(y, x @ weight.T)
    grad = randn(y.shape, gen, torch.float64, device)
    dx, dmu, deta, dalpha = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t,
                                                             offsets, alpha)
    close(dx, grad @ weight)
    assert not dmu.any() and not deta.any() and not dalpha.any()


def test_lowrank_delta_linear_in_row_chunks(gen, device, monkeypatch):
    """A scores buffer smaller than the rows: grouped_bilinear runs in chunks of rows (gathered
    through the row permutation forward and dx, sliced directly for deta and dmu) and gives the
    same result as one chunk."""
    counts = [5, 0, 131, 2, 62]
    offsets = offsets_for(counts, device)
    args = delta_inputs(gen, counts, torch.float64, device, N=300)
    grad = randn((300, 29), gen, torch.float64, device)
    y_ref, *grad_refs = delta_reference(*args[:6], offsets, args[6], grad)
    # Chunks of 128 rows: 300 rows x 200 kv rows (forward, dx), 200 x 300 (deta, dmu).
    module = _module("grouped_bilinear")
    monkeypatch.setattr(module, "SCRATCH_ENTRIES", 128 * 200)
    launches = []

    class Counted:  # counts the scores launches, one per chunk
        def __getitem__(self, grid, kernel=module._group_scores_kernel):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, "_group_scores_kernel", Counted())
    close(tk.lowrank_delta_linear(*args[:6], offsets, args[6]), y_ref)
    assert len(launches) == 3
    x, weight, _, row_group, mu_t, eta_t, alpha = args
    close_delta_grads(tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha),
                      grad_refs, eta_t, offsets, alpha)
    assert len(launches) == 3 + 3 + 2 + 2  # forward; dx, deta, dmu


# ------------------------------------------------------- non-finite values stay in their group

# Groups of 3, 0, 5 and 4 rows: under the interpreter (16-row tiles) all rows would fit one tile,
# which is how the kernels used to run them (one tile looping over its groups, masking rows) and
# where a non-finite value leaked into the other groups' rows.
NONFINITE_COUNTS = [3, 0, 5, 4]


def same_nonfinite(out, ref):
    """Equal within fp32's tolerance, with NaN and ±inf at the same places."""
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("transpose_w", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_segment_matmul_nonfinite_weight_stays_in_its_group(gen, transpose_w, fused, device):
    """An inf and a NaN in group 2's weight reach group 2's rows only, as in the reference.  The
    rows of the other groups, loaded as 0 while group 2's tile is multiplied, used to pick up
    0·inf = NaN from the shared accumulator."""
    counts = NONFINITE_COUNTS
    T, G, k, n = sum(counts), len(counts), 13, 11
    x = randn((T, k), gen, torch.float32, device)
    w = randn((G, n, k), gen, torch.float32, device)
    w[2, 0, 1], w[2, 3, 4] = float("inf"), float("nan")
    w = w if transpose_w else w.transpose(1, 2).contiguous()
    extra = dict(gain=None, bias=None, scale=None, shift=None, relu=False, residual=None)
    if fused:
        extra = dict(gain=randn((T, k), gen, torch.float32, device), bias=randn((G, n), gen, torch.float32, device),
                     scale=None, shift=None, relu=False, residual=randn((T, n), gen, torch.float32, device))
    y = tk.segment_matmul(x, w, offsets_for(counts, device), transpose_w=transpose_w, **extra)
    ref_extra = {key: (val.double() if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
    ref = segment_matmul_ref(x.double(), w.double(), counts, transpose_w, **ref_extra)
    same_nonfinite(y, ref)
    assert not ref[:3].isnan().any() and ref[3:8, 3].isnan().all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_grouped_outer_backward_nonfinite_gradient(gen, fusion, device):
    """An inf and a NaN in the incoming gradient give the reference's d_eta, d_mu: entries off
    a group's selection give it 0, and with "none" group 2's gradient reaches group 2's tokens
    only (the other groups' rows, loaded as 0 in a shared row tile, used to pick up 0·inf)."""
    counts = NONFINITE_COUNTS
    eta, mu = randn((sum(counts), 7), gen, torch.float32, device), randn((sum(counts), 6), gen, torch.float32, device)
    offsets = offsets_for(counts, device)
    grad = outer_grad(gen, len(counts), 7, 6, fusion, torch.float32, device)
    target = grad[2] if fusion == "none" else grad
    target[1, 2], target[4, 0] = float("inf"), float("nan")
    for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5),
                        outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
        same_nonfinite(out, ref)
        if fusion == "none":
            assert ref[:3].isfinite().all() and ref[8:].isfinite().all()


def test_lowrank_delta_linear_nonfinite_factor_stays_in_its_group(gen, device):
    """An inf in one of group 2's η rows: the rows of group 2 are non-finite where the
    reference's are, every other row is finite and equal to it, forward and backward."""
    counts = NONFINITE_COUNTS
    offsets = offsets_for(counts, device)
    rows = torch.tensor([0, 2, 3, 2, -1, 0, 3, 2, 3, 0, 2])
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float32, device, N=11, rows=rows)
    eta_t[4, 5] = float("inf")  # a group-2 token
    grad = randn((11, weight.shape[0]), gen, torch.float32, device)
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    y = tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
    same_nonfinite(y, y_ref)
    assert y_ref[rows == 2].isfinite().logical_not().any() and y_ref[rows != 2].isfinite().all()
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    for g, ref in zip(grads[:3], grad_refs[:3]):
        same_nonfinite(g, ref)


@pytest.mark.parametrize("poisoned", ["eta_t", "alpha"])
def test_lowrank_delta_linear_backward_group_without_rows_gets_zero(gen, poisoned, device):
    """A group that no row of x uses has zero gradients (the reference skips it), also when its
    η rows or its alpha are not finite: deta_t was formed as 0 · alpha_g and dalpha_g as
    Σ eta_t ⊙ 0, NaN there (an optimizer step then made alpha_g NaN for every later batch)."""
    counts = NONFINITE_COUNTS
    offsets = offsets_for(counts, device)
    rows = torch.tensor([0, 3, -1, 0, 3, 3, -1])  # group 2 (tokens 3:8) has no row
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float32, device, N=7, rows=rows)
    if poisoned == "eta_t":
        eta_t[4, 5] = float("inf")  # a group-2 token
    else:
        alpha[2] = float("nan")
    grad = randn((7, weight.shape[0]), gen, torch.float32, device)
    _, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    for g, ref in zip(grads, grad_refs):
        assert ref.isfinite().all()
        same_nonfinite(g, ref)
    assert (grads[2][3:8] == 0).all() and grads[3][2] == 0


# Non-finite inputs on purpose: the Triton interpreter's NumPy arithmetic warns of the NaNs it makes.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("poisoned", ["alpha", "x", "mu_t"])
def test_lowrank_delta_linear_nonfinite_alpha_or_input_as_the_reference(gen, dtype, poisoned, device):
    """An infinite (or NaN) alpha_g, or an inf in x or mu_t: forward and backward give the
    reference's values, ±inf and NaN at the same places.  The forward against
    `reference.lowrank_delta_linear`, the backward against `reference.lowrank_delta_linear_backward`,
    which the op's CPU registration runs (autograd through the reference forward is another
    association, alpha·grad before the sum over η, NaN where the op is ±inf).  An infinite alpha_g
    multiplied the scores C = alpha_g Q·K before their sum over V, as inf·c_j summed over j of both
    signs: NaN where the reference, alpha_g · Σ_j c_j V_j, gives ±inf (all 160 NaN of group 0 and 2's
    rows, fp32, in the forward)."""
    counts = NONFINITE_COUNTS
    offsets = offsets_for(counts, device)
    rows = torch.tensor([0, 2, 3, 2, -1, 0, 3, 1, 3, 0, 2])  # row 7: group 1, which has no tokens
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, device, N=11, rows=rows)
    if poisoned == "alpha":  # group 1's inf meets no token: its row sees the unedited layer
        alpha[0], alpha[1], alpha[2], alpha[3] = -float("inf"), float("inf"), float("inf"), float("nan")
    elif poisoned == "x":
        x[1, 3] = x[4, 0] = float("inf")  # a row of group 2 (NaN: ±inf scores summed over η), an unedited one
    else:
        mu_t[4, 5] = -float("inf")  # a group-2 token
    grad = randn((11, weight.shape[0]), gen, dtype, device)
    d = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
         for t in (grad, x, weight, b, row_group, mu_t, eta_t, offsets, alpha)]
    y_ref = reference.lowrank_delta_linear(*d[1:])
    y = tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
    assert y_ref.isinf().any()
    same_nonfinite(y, y_ref)
    refs = reference.lowrank_delta_linear_backward(*d[:3], *d[4:])
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    for g, ref in zip(grads[:3], refs[:3]):
        same_nonfinite(g, ref)
    # dalpha_g of a group with an infinite score c: Σ_{n,s} (grad_n · η_s) c_{n,s} here summed
    # over n first (η · deta), in the reference over s first: ±inf in one order is NaN in the
    # other when terms of both signs are infinite.  Non-finite at the same groups (with a poisoned
    # alpha, equal there too); the finite ones within their sums' conditioning, as `close_dalpha`
    # judges them in the finite tests (an elementwise 1e-5 failed fp32 at seed 686552471: 3.5e-5
    # relative, |dalpha_0| 0.52, alpha_0 = -inf; that helper's bound reads alpha, here non-finite).
    assert torch.equal(grads[3].isfinite().cpu(), refs[3].isfinite().cpu())
    ok = refs[3].isfinite().cpu()
    if poisoned == "alpha":
        same_nonfinite(grads[3][~ok], refs[3][~ok])
    scale = dalpha_conditioning(*d[:2], d[4], d[5], d[6], offsets)
    assert ((grads[3].double().cpu() - refs[3].cpu()).abs()[ok] <= TOL[dtype] * scale[ok] + 1e-30).all()


# Non-finite inputs on purpose: the Triton interpreter's NumPy arithmetic warns of the NaNs it makes.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["split operand", "bf16 operand", "bf16 first operand"])
def test_bf16x3_keeps_inf(gen, device, monkeypatch, where):
    """An infinite entry on either side of a bf16x3 dot gives the reference's ±inf, not NaN.
    Split operand: its remainder x − hi was inf − inf = NaN.  The bf16 operand: its entries met
    the mid and lo pieces, often exactly 0 (x ⊙ gain of bf16 inputs fits two bf16 pieces), and
    0·inf = NaN.  "bf16 first operand" is the mirror branch (bf16 μ against the fp32 gradient in
    grouped_outer's backward)."""
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "1")
    counts = NONFINITE_COUNTS
    offsets = offsets_for(counts, device)
    T, G, k, n = sum(counts), len(counts), 13, 11
    bf = torch.bfloat16
    if where == "bf16 first operand":
        eta, mu = randn((T, 7), gen, bf, device), randn((T, 6), gen, bf, device)
        mu[4, 2] = float("inf")  # a group-2 token
        # A gradient exact in bf16 (× 0.5 stays exact): the split's mid and lo pieces are 0.
        grad = randn((7, 6), gen, bf, device).float()
        out = tk.grouped_outer_backward(grad, eta, mu, offsets, "sss", 0.5)[0]
        ref = outer_backward_ref(grad, eta, mu, offsets, "sss", 0.5)[0]
        assert ref[4].isinf().any()
    else:
        x, w = randn((T, k), gen, bf, device), randn((G, n, k), gen, bf, device)
        gain = randn((T, k), gen, bf, device)
        if where == "split operand":
            gain[4, 2] = float("inf")  # group 2: (x ⊙ gain) reaches `mma` as an fp32 tile
        else:
            w[2, 3, 5] = float("inf")
        out = tk.segment_matmul(x, w, offsets, gain=gain, precision_from=(bf,))
        ref = segment_matmul_ref(x.double(), w.double(), counts, True, gain.double(), None, None, None, False, None)
        assert ref.isinf().any()
    tol = TOL[out.dtype] if out.dtype == bf else 1e-5  # grouped_outer's d_mu is μ's dtype
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol, equal_nan=True)


@triton.jit
def _split_kernel(x_ptr, hi_ptr, mid_ptr, lo_ptr, n, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """`_split_bf16x3` of n fp32 values, the three pieces stored apart."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    hi, mid, lo = _split_bf16x3(tl.load(x_ptr + offs, mask=ok), SPLIT)
    tl.store(hi_ptr + offs, hi, mask=ok)
    tl.store(mid_ptr + offs, mid, mask=ok)
    tl.store(lo_ptr + offs, lo, mask=ok)


# Non-finite inputs on purpose: the Triton interpreter's NumPy arithmetic warns of the NaNs it makes.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("split", [1, 2, 3])
def test_bf16x3_split(gen, device, split):
    """`_split_bf16x3` on fp32 values over fp32's normal range, bf16's largest finite value and
    values above it, ±inf and ±0.  All three pieces (SPLIT 3): hi + mid + lo is x exactly and a
    finite x never gives hi = inf.  Fewer pieces keep x to 2^-7 (hi) and 2^-15 (hi + mid), which
    holds for hi rounded to nearest (a GPU) and truncated: the interpreter truncates every
    fp32 → bf16 conversion (triton 3.9 `cast_impl`), so on the CPU this checks the split's
    algebra, and compile_check checks that SPLIT 3's hi truncates in the PTX."""
    n = 3001
    # Normal remainders only (|x| ≥ 2^-100): the interpreter converts fp32 subnormals to bf16
    # wrongly (triton 3.9; 4.7e-38's remainder came back 23% off).
    exponent = torch.randint(-100, 127, (n,), generator=gen).double()
    x = (torch.rand(n, generator=gen, dtype=torch.float64) + 1.0) * torch.exp2(exponent)
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x).float()
    bf16_max = torch.finfo(torch.bfloat16).max
    x[:8] = torch.tensor([bf16_max, -bf16_max, 3.3999e38, -3.4028e38, float("inf"), float("-inf"), 0.0, -0.0])
    x = x.to(device)
    hi, mid, lo = (torch.empty(n, dtype=torch.bfloat16, device=device) for _ in range(3))
    _split_kernel[(triton.cdiv(n, 1024),)](x, hi, mid, lo, n, SPLIT=split, BLOCK=1024)
    x, hi, mid, lo = (t.cpu().double() for t in (x, hi, mid, lo))
    finite = x.isfinite()
    assert torch.equal(hi[~finite], x[~finite]) and not (mid[~finite].any() or lo[~finite].any())
    if split == 3:
        assert hi[finite].isfinite().all()
        assert torch.equal((hi + mid + lo)[finite], x[finite])
    else:
        kept = hi if split == 1 else hi + mid
        ok = finite & hi.isfinite()  # round to nearest: above bf16's largest value hi may be inf
        assert ((kept - x).abs()[ok] <= x.abs()[ok] * 2.0 ** (-7 if split == 1 else -15)).all()


# --------------------------------------------------------------------- layouts: empty and T = 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_layouts(gen, layout, dtype, device):
    """Every launcher on T = 0, all-empty, empty first/last/middle and single-group layouts."""
    counts = LAYOUTS[layout]
    offsets = offsets_for(counts, device)
    T = sum(counts)

    inputs = lowrank_inputs(gen, counts, dtype, device)
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]),
          reference.grouped_lowrank(f64(inputs[0])[0], offsets, *f64(*inputs[1:])), dtype)
    grad_out = randn(inputs[0].shape, gen, dtype, device)
    grads = tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:])
    for g, ref in zip(grads, lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref, dtype)

    eta, mu = randn((T, 19), gen, dtype, device), randn((T, 11), gen, dtype, device)
    for fusion in FUSIONS:
        out = tk.grouped_outer(eta, mu, offsets, fusion, 0.75)
        ref = reference.grouped_outer(*f64(eta, mu), offsets, fusion, 0.75)
        if T == 0:
            assert not out.any() and out.shape == ref.shape
        else:
            close(out, ref)
        grad = outer_grad(gen, len(counts), 19, 11, fusion, dtype, device)
        for g, g_ref, t in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.75),
                               outer_backward_ref(grad, eta, mu, offsets, fusion, 0.75), (eta, mu)):
            assert g.shape == t.shape
            if T:
                close(g, g_ref)
    fisher = tk.segmented_fisher(eta, mu, offsets)
    if T == 0:
        assert not fisher.any() and fisher.shape == (19, 11)
    else:
        close(fisher, reference.segmented_fisher(*f64(eta, mu), offsets))

    for N in (0, 21):
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, device, N=N)
        grad = randn((N, weight.shape[0]), gen, dtype, device)
        y = tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
        grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
        refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
        for out, ref in zip((y, *grads[:3]), refs):
            assert out.shape == ref.shape
            if ref.numel() and ref.abs().max() > 0:
                close(out, ref, dtype)
            else:
                assert not out.any()
        close_dalpha(grads[3], refs[4], refs[3], eta_t, offsets, alpha)


@pytest.mark.parametrize("dims", [(1, 1), (1, 17), (17, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_unit_sizes(gen, dims, dtype, device):
    """Every launcher with dimensions of 1 (o, i, d, r and N) and one-token groups, forward and
    backward, against the float64 reference: one-wide tiles in every direction."""
    o, i = dims
    counts = [1, 0, 1, 2]
    offsets = offsets_for(counts, device)
    T, G = sum(counts), len(counts)

    inputs = lowrank_inputs(gen, counts, dtype, device, d=o, r=i)
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]),
          reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:])))
    grad_out = randn(inputs[0].shape, gen, dtype, device)
    for g, ref in zip(tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:]),
                      lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref)

    eta, mu = randn((T, o), gen, dtype, device), randn((T, i), gen, dtype, device)
    for fusion in FUSIONS:
        close(tk.grouped_outer(eta, mu, offsets, fusion, 0.5),
              reference.grouped_outer(*f64(eta, mu), offsets, fusion, 0.5))
        grad = outer_grad(gen, G, o, i, fusion, out_dtype(dtype), device)
        for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5),
                            outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
            close(out, ref)
    close(tk.segmented_fisher(eta, mu, offsets), reference.segmented_fisher(*f64(eta, mu), offsets))

    for N in (1, 5):
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, device, N=N, o=o, i=i,
                                                                   rows=torch.tensor([0, 3, 2, 3, 0][:N]))
        grad = randn((N, o), gen, dtype, device)
        y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
        close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
        grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
        close_delta_grads(grads, grad_refs, eta_t, offsets, alpha)


@pytest.mark.parametrize("present", [("scale",), ("shift",), ("gain",), ("scale", "shift"), ("scale", "gain"),
                                     ("shift", "gain")])
def test_grouped_lowrank_each_subset_of_the_optional_arguments(gen, present, device):
    """scale, shift and gain given in part (the other tests give all three or none): forward and
    backward, a gradient exactly for each tensor given."""
    counts = random_layout(gen)
    offsets = offsets_for(counts, device)
    h, u, v, bias, *extras = lowrank_inputs(gen, counts, torch.float64, device)
    opt = [t if name in present else None for name, t in zip(("scale", "shift", "gain"), extras)]
    inputs = (h, u, v, bias, *opt)
    close(tk.grouped_lowrank(h, offsets, u, v, bias, *opt), reference.grouped_lowrank(h, offsets, u, v, bias, *opt))
    grad_out = randn(h.shape, gen, torch.float64, device)
    grads = tk.grouped_lowrank_backward(grad_out, h, offsets, u, v, bias, *opt)
    for t, g, ref in zip(inputs, grads, lowrank_reference_grads(grad_out, offsets, inputs)):
        assert (g is None) == (t is None)
        if t is not None:
            close(g, ref)


@pytest.mark.parametrize("wide", ["u", "bias", "scale", "shift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_lowrank_one_float64_argument_computes_in_float64(gen, wide, dtype, device):
    """SPEC: float64 inputs are computed in float64 throughout.  With only u, bias, scale or
    shift in float64 (h, v and gain not), the first GEMM z = (gain ⊙ h) v_gᵀ stayed in fp32:
    an fp64 output with ~1e-7 relative error (the C++ kernel and the reference compute z in fp64)."""
    counts = random_layout(gen)
    offsets = offsets_for(counts, device)
    inputs = dict(zip(("h", "u", "v", "bias", "scale", "shift", "gain"),
                      lowrank_inputs(gen, counts, dtype, device, d=33, r=17)))
    inputs[wide] = inputs[wide].double()
    args = list(inputs.values())
    out = tk.grouped_lowrank(args[0], offsets, *args[1:])
    ref = reference.grouped_lowrank(args[0].double(), offsets, *[t.double() for t in args[1:]])
    assert out.dtype == torch.float64
    close(out, ref)


def test_int64_offsets(gen, device):
    """int64 offsets (the other tests build int32 ones) through every launcher, forward and
    backward."""
    counts = [0, 9, 0, 17, 1]
    offsets = offsets_for(counts, device).long()
    T, G = sum(counts), len(counts)
    inputs = lowrank_inputs(gen, counts, torch.float64, device)
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]), reference.grouped_lowrank(inputs[0], offsets,
                                                                                          *inputs[1:]))
    grad_out = randn(inputs[0].shape, gen, torch.float64, device)
    for g, ref in zip(tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:]),
                      lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref)
    eta, mu = randn((T, 19), gen, torch.float64, device), randn((T, 11), gen, torch.float64, device)
    for fusion in FUSIONS:
        close(tk.grouped_outer(eta, mu, offsets, fusion, 0.5), reference.grouped_outer(eta, mu, offsets, fusion, 0.5))
        grad = outer_grad(gen, G, 19, 11, fusion, torch.float64, device)
        for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5),
                            outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
            close(out, ref)
    close(tk.segmented_fisher(eta, mu, offsets), reference.segmented_fisher(eta, mu, offsets))
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float64, device)
    grad = randn((x.shape[0], weight.shape[0]), gen, torch.float64, device)
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
    close_delta_grads(tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha),
                      grad_refs, eta_t, offsets, alpha)


@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("fusion", ["none", "add"])
def test_grouped_outer_token_index_past_int32(gen, offsets_dtype, fusion, device):
    """A group whose rows end at 2^31 - 1 (the largest int32 offset) or past 2^31: the token chunk's
    row index is int64 before the add.  Before, t0 + an int32 arange wrapped past 2^31 - 1 and the
    wrapped (negative) rows passed the `< end` mask: 31 tokens counted for 19.  Rows are stride-0
    views (nothing allocated); the launcher takes offsets as given, so one group covers the last
    19 rows without a loop over the others."""
    o, i = 3, 2
    ends = [2**31 - 1] + ([2**32 + 5] if offsets_dtype == torch.int64 else [])
    for T in ends:
        eta = randn((1, o), gen, torch.float64, device).expand(T, o)
        mu = randn((1, i), gen, torch.float64, device).expand(T, i)
        offsets = torch.tensor([T - 19, T], dtype=offsets_dtype, device=device)
        out = tk.grouped_outer(eta, mu, offsets, fusion, 1.0)
        ref = 19 * eta[0][:, None] * mu[0][None, :]
        close(out.reshape(o, i), ref)


def _views_past_int32(device, dtype, *views):
    """Views (values, shape, strides, storage offset) written into one buffer that spans past 2^31
    entries.  On the CPU torch.empty commits no memory, so only the pages the views address are
    touched; a GPU allocates the whole buffer.  Skips where the allocation is refused."""
    span = max(off + sum((n - 1) * st for n, st in zip(shape, strides)) + 1 for _, shape, strides, off in views)
    try:
        buf = torch.empty(span, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve {span} entries of {dtype}: {exc}")
    out = []
    for values, shape, strides, off in views:
        view = buf.as_strided(shape, strides, off)
        view.copy_(values)
        out.append(view)
    return out


@pytest.mark.parametrize("fusion", FUSIONS)
def test_grouped_outer_feature_stride_past_int32(gen, fusion, device):
    """Column-major eta and mu (stride(1) = S, as an (o, T) gradient's .t() is) whose feature
    offsets pass 2^31 - 1: S = 2^30 + 1 puts feature 2 at 2^31 + 2, as o 28672 × T 75k tokens
    would.  The kernels multiplied the feature index by that stride in int32 (grouped_outer's η
    and μ tiles, also the backward's selection pass; segment_matmul's x in the backward GEMMs):
    the offset wrapped to 8 GiB before the tensor, a segfault under the interpreter (an illegal
    address on a GPU).  fp16 values, so the buffer spans 4 GiB."""
    S, o, i = 2**30 + 1, 3, 3
    counts = [3, 0, 4]
    T, G = sum(counts), len(counts)
    offsets = offsets_for(counts, device)
    eta_v, mu_v = randn((T, o), gen, torch.float16, device), randn((T, i), gen, torch.float16, device)
    eta, mu = _views_past_int32(device, torch.float16, (eta_v, (T, o), (1, S), 0), (mu_v, (T, i), (1, S), T))
    close(tk.grouped_outer(eta, mu, offsets, fusion, 0.5),
          reference.grouped_outer(*f64(eta_v, mu_v), offsets, fusion, 0.5))
    grad = outer_grad(gen, G, o, i, fusion, torch.float32, device)
    for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5),
                        outer_backward_ref(grad, eta_v, mu_v, offsets, fusion, 0.5)):
        close(out, ref)


def test_segment_matmul_select_word_past_int32(gen, device):
    """grouped_outer's max/sss/ssm backward reads group g's selection bit from word g // 32 at
    (g // 32) · o·i: in int32 that passes 2^31 - 1 from word 10 on at o·i = 28672 · 8192 (321+
    groups).  Here 65 groups and a word stride of 2^30 + 1, so group 64 reads word 2 at
    2^31 + 2: the int32 offset wrapped (segfault under the interpreter).  int32 words, so the
    buffer spans 8 GiB (untouched on the CPU)."""
    SW, G, T, N, K = 2**30 + 1, 65, 4, 3, 2
    words = torch.randint(-2**31, 2**31 - 1, (3, N, K), generator=gen, dtype=torch.int32).to(device)
    (select,) = _views_past_int32(device, torch.int32, (words, (3, N, K), (SW, K, 1), 0))
    w1 = randn((N, K), gen, torch.float32, device)
    x = randn((T, K), gen, torch.float32, device)
    offsets = torch.tensor([0] * G + [T], device=device)  # every token in group 64
    y = tk.segment_matmul(x, w1.expand(G, N, K), offsets, select=select)
    kept = ((words[2] >> (64 % 32)) & 1).bool()
    close(y, x.double() @ torch.where(kept, w1, 0.0).double().t())


def test_grouped_outer_none_launches_groups_within_grid_limit(gen, device):
    """"none" gives each group a program along the grid's third axis, which CUDA caps at 65535: more
    groups failed to launch ("invalid argument") on a GPU (the interpreter has no such limit).  The
    launcher now runs groups in chunks of GRID_YZ_MAX, lowered to 2 here so that five groups take
    three launches: the forward and grouped_lowrank's backward (du, dv: "none" stacks)."""
    go = importlib.import_module("dcedit_kernels.triton_kernels.grouped_outer")
    counts = [4, 0, 6, 1, 5]
    offsets = offsets_for(counts, device)
    eta, mu = randn((sum(counts), 5), gen, torch.float32, device), randn((sum(counts), 7), gen, torch.float32, device)
    inputs = lowrank_inputs(gen, counts, torch.float32, device)
    grad_out = randn(inputs[0].shape, gen, torch.float32, device)
    with mock.patch.object(go, "GRID_YZ_MAX", 2):
        out = tk.grouped_outer(eta, mu, offsets, "none", 0.5)
        grads = tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:])
    close(out, reference.grouped_outer(*f64(eta, mu), offsets, "none", 0.5))
    for g, ref in zip(grads, lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref)


def test_grouped_bilinear_scores_launches_within_grid_limit(device, monkeypatch):
    """The scores launch of grouped_bilinear gives each BLOCK_T segment-local columns a program along
    the grid's second axis, which CUDA caps at 65535, and sizes that axis by W (the K/V rows, a bound
    on any group's length): past 65535 · 16 rows at BLOCK_T 16 (fp64 on a GPU, every dtype under the
    interpreter) it asked for 65537 programs, which fails to launch on a GPU and not here.  The
    kernels are stubbed: what is checked is each launch's grid and first column, J0."""
    gb = _module("grouped_bilinear")
    W = 65535 * 16 + 17
    launches = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, tuple(grid), args, kwargs))

    monkeypatch.setattr(gb, "_group_scores_kernel", Stub("scores"))
    monkeypatch.setattr(gb, "_grouped_bilinear_kernel", Stub("apply"))
    k, v = torch.zeros((W, 1), dtype=torch.float64, device=device), torch.zeros((W, 2), dtype=torch.float64, device=device)
    q, out = torch.zeros((3, 1), dtype=torch.float64, device=device), torch.zeros((3, 2), dtype=torch.float64, device=device)
    kv_offsets = torch.tensor([0, W], device=device)
    q_group = torch.zeros(3, dtype=torch.int64, device=device)
    gb.grouped_bilinear_(out, q, None, q_group, k, v, None, kv_offsets, torch.ones(1, dtype=torch.float64, device=device))
    scores = [(grid, args, kwargs) for name, grid, args, kwargs in launches if name == "scores"]
    block_t = scores[0][2]["BLOCK_T"]
    assert block_t == 16 or device == "cuda"
    assert all(len(grid) == 2 and grid[1] <= 65535 for grid, _, _ in scores), [grid for grid, _, _ in scores]
    # The launches cover the columns once, in order: J0 (the argument after DK, W, G) steps by their width.
    firsts, widths = [args[11] for _, args, _ in scores], [grid[1] * block_t for grid, _, _ in scores]
    assert firsts == [sum(widths[:n]) for n in range(len(scores))] and sum(widths) >= W > sum(widths) - block_t


def test_grouped_bilinear_scores_in_column_launches(gen, device, monkeypatch):
    """The scores of grouped_bilinear in launches of one column tile each (the grid limit lowered to 1
    program along the second axis): lowrank_delta_linear's forward and backward (K/V rows: the
    editor's tokens, then the layer's rows) as the float64 reference."""
    monkeypatch.setattr(_module("grouped_bilinear"), "GRID_YZ_MAX", 1)
    counts = [5, 0, 40, 19]
    offsets = offsets_for(counts, device)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float32, device, N=50)
    grad = randn((50, 29), gen, torch.float32, device)
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
    close_delta_grads(tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha),
                      grad_refs, eta_t, offsets, alpha)


@cuda_only
def test_grouped_outer_none_past_grid_limit(gen):
    """65537 groups of one token each under "none": two launches at CUDA's real grid limit (the
    CPU test above lowers it), each group's S_g the outer product of its token's rows."""
    G, o, i = 65537, 16, 17
    eta, mu = randn((G, o), gen, torch.float32, "cuda"), randn((G, i), gen, torch.float32, "cuda")
    offsets = torch.arange(G + 1, dtype=torch.int32, device="cuda")
    out = tk.grouped_outer(eta, mu, offsets, "none", 1.0)
    close(out, eta.double()[:, :, None] * mu.double()[:, None, :])


@pytest.mark.parametrize("launcher", ["grouped_outer", "grouped_outer_backward", "segmented_fisher", "grouped_lowrank",
                                      "grouped_lowrank_backward", "lowrank_delta_linear",
                                      "lowrank_delta_linear_backward"])
def test_strided_offsets_row_group_and_alpha(gen, launcher, device):
    """offsets, row_group and alpha given as non-contiguous views (stride 2), as any (G+1,) tensor
    may be: every launcher gives what the reference gives for the contiguous copies.  Each view
    sits on a buffer that holds every value twice, so reading it as if contiguous stays in bounds
    (offsets 0, 0, 9, 9, 26, 27 are then read as 0, 0, 0, 0, 9, 9: wrong groups, not a wild access)."""
    counts = [0, 9, 0, 17, 1]
    offsets = offsets_for(counts, device)
    strided = lambda t: t.repeat_interleave(2)[::2]  # noqa: E731
    s_offsets = strided(offsets)
    assert torch.equal(s_offsets, offsets) and not s_offsets.is_contiguous()
    T, G = sum(counts), len(counts)
    eta, mu = randn((T, 19), gen, torch.float64, device), randn((T, 11), gen, torch.float64, device)
    inputs = lowrank_inputs(gen, counts, torch.float64, device)
    if launcher == "grouped_outer":
        for fusion in FUSIONS:
            close(tk.grouped_outer(eta, mu, s_offsets, fusion, 0.5),
                  reference.grouped_outer(eta, mu, offsets, fusion, 0.5))
    elif launcher == "grouped_outer_backward":
        for fusion in ("none", "max", "sss", "ssm"):  # "add" needs no offsets
            grad = outer_grad(gen, G, 19, 11, fusion, torch.float64, device)
            for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, s_offsets, fusion, 0.5),
                                outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
                close(out, ref)
    elif launcher == "segmented_fisher":
        close(tk.segmented_fisher(eta, mu, s_offsets), reference.segmented_fisher(eta, mu, offsets))
    elif launcher == "grouped_lowrank":
        close(tk.grouped_lowrank(inputs[0], s_offsets, *inputs[1:]),
              reference.grouped_lowrank(inputs[0], offsets, *inputs[1:]))
    elif launcher == "grouped_lowrank_backward":
        grad_out = randn(inputs[0].shape, gen, torch.float64, device)
        for g, ref in zip(tk.grouped_lowrank_backward(grad_out, inputs[0], s_offsets, *inputs[1:]),
                          lowrank_reference_grads(grad_out, offsets, inputs)):
            close(g, ref)
    else:
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float64, device)
        grad = randn((x.shape[0], weight.shape[0]), gen, torch.float64, device)
        y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
        args = (x, weight, b, strided(row_group), mu_t, eta_t, s_offsets, strided(alpha))
        if launcher == "lowrank_delta_linear":
            close(tk.lowrank_delta_linear(*args), y_ref)
        else:
            close_delta_grads(tk.lowrank_delta_linear_backward(grad, *args[:2], *args[3:]), grad_refs, eta_t, offsets,
                              alpha)


# ------------------------------------- the CUDA registrations, through the dispatcher on CPU


def _triton_registrations():
    """op -> what ops._dispatch registers for CUDA tensors: the Triton launcher behind the op's
    checks (`checked`), as `register` builds it."""
    from dcedit_kernels.ops._dispatch import checked, triton_launcher

    gl, go, sf, dl = (importlib.import_module(f"dcedit_kernels.ops.{name}") for name in
                      ("grouped_lowrank", "grouped_outer", "segmented_fisher", "lowrank_delta_linear"))
    return {
        "grouped_lowrank": checked(gl._fwd, gl.check_grouped_lowrank),
        "_grouped_lowrank_backward": checked(gl._triton_backward, gl.check_grouped_lowrank_backward),
        "grouped_outer": checked(triton_launcher("grouped_outer"), go.check_grouped_outer),
        "_grouped_outer_backward": checked(triton_launcher("grouped_outer_backward"), go.check_grouped_outer_backward),
        "segmented_fisher": checked(triton_launcher("segmented_fisher"), sf.check_segmented_fisher),
        "lowrank_delta_linear": checked(triton_launcher("lowrank_delta_linear"),
                                        lambda *a, **kw: dl.check_lowrank_delta_linear(*a, **kw, raw=True)),
        "_lowrank_delta_linear_backward": checked(triton_launcher("lowrank_delta_linear_backward"),
                                                  dl.check_lowrank_delta_linear_backward),
    }


@pytest.fixture
def triton_serves_cpu():
    """For the test's duration, CPU tensors reach the functions that serve CUDA tensors (Triton
    under the interpreter), so that opcheck, gradcheck and the raw ops' checks run the Triton path
    through the dispatcher without a GPU (tests/test_ops.py runs them on the CUDA registrations
    when there is one).  Yields a Counter of the calls each registration served; the previous CPU
    kernels (C++ or reference) serve again after it."""
    if not INTERPRET:
        pytest.skip("runs the Triton registrations on CPU tensors, which needs TRITON_INTERPRET=1")
    # Three of the ops have CPU kernels registered from Python, which Library.impl refuses to
    # override unless told to (allow_override: False by default in torch 2.11, True in 2.13).
    if "allow_override" not in inspect.signature(torch.library.Library.impl).parameters:
        pytest.skip("this torch's Library.impl cannot override a CPU kernel registered from Python")
    served = collections.Counter()

    def counted(name, fn):
        def run(*args, **kwargs):
            served[name] += 1
            return fn(*args, **kwargs)
        return run

    # Library._destroy drops its ops from torch's set of Python-registered kernels, the package's
    # own among them: the set is put back as it was.
    registered = set(getattr(torch.library, "_impls", ()))
    lib = torch.library.Library("dcedit", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            for name, fn in _triton_registrations().items():
                lib.impl(name, counted(name, fn), "CPU", allow_override=True)
        yield served
    finally:
        lib._destroy()
        if hasattr(torch.library, "_impls"):
            torch.library._impls.clear()
            torch.library._impls.update(registered)
    for name in _triton_registrations():  # this file's registrations are gone
        cpu = [line for line in torch._C._dispatch_dump(f"dcedit::{name}").splitlines() if line.startswith("CPU")]
        assert len(cpu) == 1 and os.path.basename(__file__) not in cpu[0], cpu


def _grad_leaves(*tensors):
    return tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


# op -> the registrations it runs, forward and backward
TRITON_SERVED = {
    "grouped_lowrank": {"grouped_lowrank", "_grouped_lowrank_backward"},
    "grouped_outer": {"grouped_outer", "_grouped_outer_backward"},
    "segmented_fisher": {"segmented_fisher"},
    "lowrank_delta_linear": {"lowrank_delta_linear", "_lowrank_delta_linear_backward"},
}


@pytest.mark.parametrize("op", list(TRITON_SERVED))
@pytest.mark.parametrize("layout", ["ragged", "no_tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_through_the_triton_registrations(gen, dtype, layout, op, triton_serves_cpu):
    """torch.library.opcheck (schema, fake kernels, autograd registration, AOT dispatch, which runs
    the backward ops too) on every op that Triton serves, on ragged groups (empty first and
    middle, a one-token group, more than one 16-row tile) and on T = 0."""
    from torch.library import opcheck

    counts = [0, 9, 0, 17, 1] if layout == "ragged" else LAYOUTS["no_tokens"]
    offsets = offsets_for(counts, "cpu")
    T, dcedit = sum(counts), torch.ops.dcedit
    if op == "grouped_lowrank":
        h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, dtype, "cpu", d=13, r=7)
        opcheck(dcedit.grouped_lowrank.default, _grad_leaves(h, offsets, u, v, bias, scale, shift, gain))
        opcheck(dcedit.grouped_lowrank.default, _grad_leaves(h.detach(), offsets, u.detach(), v.detach(),
                                                             bias.detach()))
    elif op in ("grouped_outer", "segmented_fisher"):
        eta, mu = randn((T, 19), gen, dtype), randn((T, 11), gen, dtype)
        if op == "segmented_fisher":
            opcheck(dcedit.segmented_fisher.default, (eta, mu, offsets))
        for fusion in FUSIONS if op == "grouped_outer" else ():
            opcheck(dcedit.grouped_outer.default, (*_grad_leaves(eta.clone(), mu.clone()), offsets, fusion, 0.75))
    else:
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dtype, "cpu")
        opcheck(dcedit.lowrank_delta_linear.default,
                _grad_leaves(x, weight, b, row_group, mu_t, eta_t, offsets, alpha))
    assert set(triton_serves_cpu) == TRITON_SERVED[op], triton_serves_cpu  # Triton ran, forward and backward


@pytest.mark.parametrize("op", ["grouped_lowrank", "grouped_outer", "lowrank_delta_linear"])
def test_gradcheck_through_the_triton_registrations(gen, op, triton_serves_cpu):
    """float64 gradcheck of the public ops with Triton forward and backward kernels (fast mode:
    the interpreter runs each launch in Python), ragged groups with empty ones."""
    from dcedit_kernels import ops

    counts = [0, 3, 0, 2, 1]
    offsets = offsets_for(counts, "cpu")
    T, G = sum(counts), len(counts)
    f64_leaf = lambda *shape: randn(shape, gen, torch.float64).requires_grad_()  # noqa: E731
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    if op == "grouped_outer":
        # No max/sss/ssm choice within gradcheck's eps of its kink, where a finite difference
        # straddles it (1 of 100,000 draws failed so: seed 9050362, max; test_ops' gradchecks too).
        eta, mu, _ = draw_clear_of_cuts(lambda: (f64_leaf(T, 4), f64_leaf(T, 3), offsets), ("max", "sss"), step=1e-6)
        for fusion in FUSIONS:
            assert check(lambda e, m: ops.grouped_outer(e, m, offsets, fusion, 0.5), (eta, mu)), fusion
    elif op == "grouped_lowrank":
        d, r = 5, 2
        lowrank = (f64_leaf(T, d), f64_leaf(G, d, r), f64_leaf(G, r, d), f64_leaf(G, d), f64_leaf(G, d),
                   f64_leaf(G, d), f64_leaf(T, d))
        assert check(lambda h, u, v, b, s, c, g: ops.grouped_lowrank(h, offsets, u, v, b, s, c, g), lowrank)
        assert check(lambda h, u, v, b: ops.grouped_lowrank(h, offsets, u, v, b), lowrank[:4])
    else:
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float64, "cpu", N=7, o=3, i=4)
        leaves = _grad_leaves(x, weight, b, mu_t, eta_t, alpha)
        assert check(lambda x, w, b, m, e, a: ops.lowrank_delta_linear(x, w, b, row_group, m, e, offsets, a), leaves)
    assert set(triton_serves_cpu) == TRITON_SERVED[op], triton_serves_cpu


def test_raw_ops_through_the_triton_registrations_check_their_inputs(gen, triton_serves_cpu):
    """torch.ops.dcedit.* served by Triton: bad input is a ValueError naming the argument (the
    launchers do not read offsets or group ids on the host; the registration's checks do)."""
    dcedit = torch.ops.dcedit
    f = lambda *shape: randn(shape, gen, torch.float32)  # noqa: E731
    decreasing, good = torch.tensor([0, 3, 2, 5]), torch.tensor([0, 2, 5])
    low = (f(3, 4, 2), f(3, 2, 4), f(3, 4))
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, [3, 0, 4], torch.float32, "cpu")
    offsets = offsets_for([3, 0, 4], "cpu")
    cases = [
        (dcedit.grouped_outer, (f(5, 3), f(5, 4), decreasing, "sss", 1.0), "offsets"),
        (dcedit._grouped_outer_backward, (f(4, 3), f(5, 3), f(5, 4), good, "sss", 1.0), "grad"),
        (dcedit.segmented_fisher, (f(5, 3), f(5, 4), torch.tensor([0, 4])), "edit_offsets"),
        (dcedit.grouped_lowrank, (f(5, 4), decreasing, *low), "offsets"),
        (dcedit._grouped_lowrank_backward, (f(4, 4), f(5, 4), decreasing, *low, None, None, None), "offsets"),
        (dcedit.lowrank_delta_linear, (x, weight, b, torch.full_like(row_group, 3), mu_t, eta_t, offsets, alpha),
         "row_group"),
        (dcedit.lowrank_delta_linear, (x, weight, b, row_group, mu_t, eta_t, offsets, alpha[:1]), "alpha"),
        (dcedit._lowrank_delta_linear_backward, (x, x, weight, row_group, mu_t, eta_t, offsets, alpha), "grad"),
    ]
    for op, args, name in cases:
        with pytest.raises(ValueError, match=name):
            op(*args)
    assert set(triton_serves_cpu) == set(_triton_registrations())  # each reached its Triton registration


# ---------------------------------------------------------------------------- bad input, syncs


def test_bad_inputs_raise_value_error_naming_the_argument(gen, device):
    offsets = offsets_for([3, 4], device)
    eta, mu = randn((7, 5), gen, torch.float32, device), randn((7, 6), gen, torch.float32, device)
    with pytest.raises(ValueError, match="fusion"):
        tk.grouped_outer(eta, mu, offsets, "mean", 1.0)
    with pytest.raises(ValueError, match="eta and mu"):
        tk.grouped_outer(eta, mu[:6], offsets_for([3, 3], device), "add", 1.0)
    with pytest.raises(ValueError, match="offsets"):
        tk.segmented_fisher(eta, mu, offsets.float())
    with pytest.raises(ValueError, match="grad"):
        tk.grouped_outer_backward(eta, eta, mu, offsets, "sss", 1.0)
    # The backward's launcher checks what its forward checks: before, "add" and "none" returned a
    # d_eta of mu's row count (uninitialised rows) and took a 2-D or non-tensor offsets.
    grad = randn((5, 6), gen, torch.float32, device)
    for fusion in ("add", "max"):
        with pytest.raises(ValueError, match="eta and mu"):
            tk.grouped_outer_backward(grad, eta, torch.cat([mu, mu[:1]]), offsets, fusion, 1.0)
        with pytest.raises(ValueError, match="offsets"):
            tk.grouped_outer_backward(grad, eta, mu, offsets[None], fusion, 1.0)
        with pytest.raises(ValueError, match="offsets"):
            tk.grouped_outer_backward(grad, eta, mu, [0, 3, 7], fusion, 1.0)
    with pytest.raises(ValueError, match="select"):
        tk.segment_matmul(mu, torch.ones((5, 6), device=device).expand(2, 5, 6), offsets,
                          select=torch.zeros((1, 6, 5), dtype=torch.int32, device=device))
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, [3, 4], torch.float32, device)
    with pytest.raises(ValueError, match="v must"):
        tk.grouped_lowrank(h, offsets, u, v[:, :, :-1], bias)
    with pytest.raises(ValueError, match="gain"):
        tk.grouped_lowrank(h, offsets, u, v, bias, gain=gain[:-1])
    with pytest.raises(ValueError, match="w must"):
        tk.segment_matmul(h, v[:1], offsets)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, [3, 4], torch.float32, device)
    with pytest.raises(ValueError, match="row_group"):
        tk.lowrank_delta_linear(x, weight, b, row_group.float(), mu_t, eta_t, offsets, alpha)
    with pytest.raises(ValueError, match="alpha"):
        tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha.repeat(2))
    with pytest.raises(ValueError, match="grad"):
        tk.lowrank_delta_linear_backward(x, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    with pytest.raises(ValueError, match="grad"):
        tk.lowrank_delta_linear_backward(None, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    # grad_out on another device than h; alpha neither a number nor a one-entry tensor.
    with pytest.raises(ValueError, match="grad_out"):
        tk.grouped_lowrank_backward(h.to("meta"), h, offsets, u, v, bias)
    for bad in (None, "1.0", torch.ones(2, device=device)):
        with pytest.raises(ValueError, match="alpha"):
            tk.grouped_outer(eta, mu, offsets, "add", bad)
        with pytest.raises(ValueError, match="alpha"):
            tk.grouped_outer_backward(grad, eta, mu, offsets, "max", bad)


def test_launchers_do_not_read_tensors_on_the_host(gen, device):
    """No .item()/.tolist()/.cpu()/bool()/int() on a tensor inside any launcher: on CUDA each
    would stall the stream.  (Under the interpreter this guards the launchers' Python code.)"""
    counts = [0, 5, 0, 9, 3]
    offsets = offsets_for(counts, device)
    h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, torch.float32, device)
    eta, mu = randn((17, 7), gen, torch.float32, device), randn((17, 9), gen, torch.float32, device)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float32, device)
    grad_h, grad_y = torch.ones_like(h), torch.ones(x.shape[0], weight.shape[0], device=device)

    def host_read(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            # triton 3.0-3.2's interpreter copies each tensor argument to the host itself
            # (`arg.cpu()` in _init_args_hst): the emulation's copy, not the launcher's.
            if sys._getframe(1).f_globals.get("__name__") == "triton.runtime.interpreter":
                return original(self, *args, **kwargs)
            raise AssertionError("a launcher read a tensor on the host")

        return read

    with ExitStack() as stack:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, host_read(name)))
        for fusion in FUSIONS:
            tk.grouped_outer(eta, mu, offsets, fusion, 0.5)
            tk.grouped_outer_backward(torch.ones((len(counts), 7, 9) if fusion == "none" else (7, 9), device=device),
                                      eta, mu, offsets, fusion, 0.5)
        tk.segmented_fisher(eta, mu, offsets)
        tk.grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
        tk.grouped_lowrank_backward(grad_h, h, offsets, u, v, bias, scale, shift, gain)
        tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha)
        tk.lowrank_delta_linear_backward(grad_y, x, weight, row_group, mu_t, eta_t, offsets, alpha)


# ------------------------------------------------------------------- dot form and launch configs


def _module(name):
    return importlib.import_module(f"dcedit_kernels.triton_kernels.{name}")


def test_native_dot_choice(monkeypatch, float32_precision):
    """Tensor cores for 16-bit operands (the interpreter takes the same branches); the env
    override; bad values."""
    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    monkeypatch.delenv(launch.NATIVE_DOT_ENV, raising=False)
    assert not launch.native_dot(f32, f32) and not launch.native_dot(f64, bf16)
    for dt in (f16, bf16):
        assert launch.native_dot(dt, dt) and launch.native_dot(f32, dt)
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "1")
    assert launch.native_dot(f16, f16) and launch.native_dot(f32, bf16)
    assert not launch.native_dot(f32) and not launch.native_dot(f64, f16)
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "0")
    assert not launch.native_dot(bf16, bf16)
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "yes")
    with pytest.raises(ValueError, match=launch.NATIVE_DOT_ENV):
        launch.native_dot(bf16)
    assert launch.dot_split(f32, f32) == 1 and launch.dot_split(f32, bf16) == launch.fp32_split() == 3
    for setting, native in (("highest", False), ("high", True), ("medium", True)):  # torch's precision
        float32_precision(setting)
        assert launch.native_dot(f32, f32) is native and not launch.native_dot(f64, f32), setting
    assert launch.dot_path(False, True, bf16, bf16) == "half"
    assert launch.dot_path(False, True, f16, bf16) == "tf32x3"
    assert launch.dot_path(False, True, f32, bf16) == "bf16x3"
    assert launch.dot_path(False, True, bf16, f32) == "bf16x3"
    assert launch.dot_path(False, True, f32, f16) == "tf32x3"
    assert launch.dot_path(False, True, f32, f32) == "tf32x3"
    assert launch.dot_path(False, False, bf16, bf16) == "ieee"
    assert launch.dot_path(True, False, f64, f64) == "fp64"


def test_backends_lists_triton_with_a_cuda_device_or_the_interpreter(monkeypatch):
    """backends(): with triton installed, the triton backend is live on a CUDA device or under
    TRITON_INTERPRET=1 (which runs the kernels on CPU tensors), and not without either."""
    import dcedit_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dcedit_kernels.backends()["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dcedit_kernels.backends()["triton"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dcedit_kernels.backends()["triton"]


@pytest.mark.parametrize("error", [AttributeError("module 'torch._C' has no attribute '_cuda_getCurrentRawStream'"),
                                   RuntimeError("triton was built for another torch")])
def test_backends_says_triton_is_not_live_where_it_does_not_import(monkeypatch, error):
    """A triton that is installed but fails its import with another error than ImportError (one
    built for another torch or Python; ops._dispatch falls back to the references on any error):
    backends() raised that error, found by a clean-room check of the README's backend table.  It
    now says triton is not live, and says so too once the deferred import of the Triton kernels
    has failed, where op_backends says "reference" (it kept saying triton was live)."""
    import builtins

    import dcedit_kernels
    from dcedit_kernels.ops import _dispatch

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dcedit_kernels.backends()["triton"]
    with monkeypatch.context() as m:
        m.setattr(builtins, "__import__", broken)
        live = dcedit_kernels.backends()
    assert not live["triton"] and live["reference"], live

    def failed_import():
        raise error

    monkeypatch.setattr(_dispatch, "_import_triton_kernels", failed_import)
    _dispatch._triton_module.cache_clear()
    try:
        assert dcedit_kernels.backends()["triton"]  # no import tried yet: nothing known to have failed
        with pytest.warns(RuntimeWarning, match="reference kernels serve CUDA"):
            assert _dispatch._triton_module() is None  # a CUDA call's deferred import, which failed
        assert dcedit_kernels.op_backends()["grouped_outer"]["CUDA"] == "reference"
        assert not dcedit_kernels.backends()["triton"]
    finally:
        _dispatch._triton_module.cache_clear()


def test_forced_tiles_checks_its_arguments():
    with pytest.raises(ValueError, match="kernel"):
        with launch.forced_tiles("matmul", BLOCK_M=16):
            pass
    with pytest.raises(ValueError, match="config"):
        with launch.forced_tiles("segment_matmul", BLOCK_M=16, BLOCK_N=16):
            pass
    cfg = launch.CANDIDATES["segment_matmul"]["half"][0]
    with launch.forced_tiles("segment_matmul", **cfg):
        assert launch.segment_matmul_tiles(5, 1, 7, 9, "ieee") == cfg
    assert launch.segment_matmul_tiles(5, 1, 7, 9, "ieee") != cfg


def test_tile_heuristic_fits_every_shape():
    """Every block is a power of two >= 16 (tl.dot's minimum) whatever the shape."""
    for T, G, N, K in ((1, 1, 1, 1), (4096, 8, 1920, 8000), (3000, 125, 6400, 1600), (37, 5, 29, 13)):
        for path in ("half", "bf16x3", "tf32x3", "ieee", "fp64"):
            for tiles in (launch.segment_matmul_tiles(T, G, N, K, path), launch.grouped_outer_tiles(T, G, N, K, path),
                          launch.grouped_outer_tiles(T, G, N, K, path, select=True),
                          launch.grouped_bilinear_tiles(T, G, N, K, path),
                          launch.group_scores_tiles(T, G, N, K, path)):
                blocks = [v for k, v in tiles.items() if k.startswith("BLOCK")]
                assert all(b >= 16 and b & (b - 1) == 0 for b in blocks), tiles
                if INTERPRET:  # exactly one config under the interpreter
                    assert set(blocks) == {16}, tiles


def test_forced_tiles_refuses_an_extra_key_and_nested_blocks_restore():
    """forced_tiles takes exactly its kernel's keys (an extra one is a ValueError as a missing one
    is), and a nested block gives the outer block's config back when it ends."""
    cfg = launch.CANDIDATES["segment_matmul"]["half"][0]
    with pytest.raises(ValueError, match="must give exactly"):
        with launch.forced_tiles("segment_matmul", **cfg, BLOCK_T=16):
            pass
    inner = launch.CANDIDATES["segment_matmul"]["half"][1]
    with launch.forced_tiles("segment_matmul", **cfg):
        with launch.forced_tiles("segment_matmul", **inner):
            assert launch.segment_matmul_tiles(5, 1, 7, 9, "ieee") == inner
        assert launch.segment_matmul_tiles(5, 1, 7, 9, "ieee") == cfg
    assert launch.segment_matmul_tiles(5, 1, 7, 9, "ieee") != cfg


# The benchmark shapes of tune.py's cases (T, G and the two dimensions each tile function takes).
_BENCH_TILES = {
    ("segment_matmul", "half"): lambda path: launch.segment_matmul_tiles(4096, 8, 1920, 8000, path),
    ("segment_matmul", "bf16x3"): lambda path: launch.segment_matmul_tiles(4096, 8, 8000, 1920, path),
    ("grouped_outer", "half"): lambda path: launch.grouped_outer_tiles(4096, 8, 6400, 1600, path),
    ("grouped_outer", "tf32x3"): lambda path: launch.grouped_outer_tiles(4096, 8, 8000, 1920, path),
    ("grouped_outer_select", "half"): lambda path: launch.grouped_outer_tiles(4096, 8, 6400, 1600, path, select=True),
    ("group_scores", "half"): lambda path: launch.group_scores_tiles(2048, 8, 8 * 512, 1600, path),
    ("grouped_bilinear", "bf16x3"): lambda path: launch.grouped_bilinear_tiles(2048, 8, 8 * 512, 6400, path),
}


def test_the_first_candidate_is_the_heuristics_choice_at_the_benchmark_shapes(monkeypatch):
    """launch.CANDIDATES lists the heuristic's choice at the benchmark shapes first: the GPU heuristic
    (the interpreter's fixed config off) gives exactly that config for every kernel and path (tune.py
    marks whatever the heuristic chose for each of its cases: `chosen_tiles`)."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert set(_BENCH_TILES) == {(k, p) for k, paths in launch.CANDIDATES.items() for p in paths}
    for (kernel, path), tiles in _BENCH_TILES.items():
        assert tiles(path) == launch.CANDIDATES[kernel][path][0], (kernel, path)


def test_chosen_tiles_records_each_kernels_first_config_the_heuristic_gave(monkeypatch):
    """tune.py marks the config the heuristic chose for a case (`launch.chosen_tiles`), not candidate 0:
    at segmented_fisher's case (125 edits of ~24 tokens) the short groups take BLOCK_T 32, candidate 1,
    and the sweep called candidate 0 "(heuristic)" there.  Forced configs are recorded as chosen;
    nested blocks each record; nothing is recorded outside a block."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with launch.chosen_tiles() as outer:
        fisher = launch.grouped_outer_tiles(3000, 125, 6400, 1600, "half")
        launch.grouped_outer_tiles(4096, 8, 6400, 1600, "half")  # a later launch of the kernel: not its first
        with launch.chosen_tiles() as inner:
            forced = launch.CANDIDATES["segment_matmul"]["half"][2]
            with launch.forced_tiles("segment_matmul", **forced):
                launch.segment_matmul_tiles(4096, 8, 1920, 8000, "half")
        launch.grouped_outer_tiles(4096, 8, 6400, 1600, "half", select=True)
    assert fisher["BLOCK_T"] == 32 and fisher == launch.CANDIDATES["grouped_outer"]["half"][1]
    assert outer == {"grouped_outer": fisher, "segment_matmul": forced,
                     "grouped_outer_select": launch.CANDIDATES["grouped_outer_select"]["half"][0]}
    assert inner == {"segment_matmul": forced}
    assert launch._CHOSEN == []


def test_gpu_tiles_of_fp64_are_16_everywhere(monkeypatch):
    """On a GPU fp64 takes 16 in every block (`_fixed`: the broadcast product in `mma` holds
    BLOCK³ values), whatever the shape; fp32 there gets the heuristic's larger tiles."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    for tiles in (launch.segment_matmul_tiles(4096, 8, 1920, 8000, "fp64"),
                  launch.grouped_outer_tiles(4096, 8, 6400, 1600, "fp64"),
                  launch.grouped_outer_tiles(4096, 8, 6400, 1600, "fp64", select=True),
                  launch.group_scores_tiles(2048, 8, 4096, 1600, "fp64"),
                  launch.grouped_bilinear_tiles(2048, 8, 4096, 6400, "fp64")):
        assert {v for k, v in tiles.items() if k.startswith("BLOCK")} == {16}, tiles
    assert launch.segment_matmul_tiles(4096, 8, 1920, 8000, "ieee")["BLOCK_N"] > 16


def test_gpu_tiles_cover_each_dimension_with_the_smallest_power_of_two(monkeypatch):
    """The GPU heuristic's blocks are the smallest power of two >= the dimension, clamped to
    [16, the path's cap] (`_pow2_at_least`): a dimension of exactly 32 or 64 gets 32 or 64, not
    twice that.  grouped_bilinear's first launch (group_scores) is a GEMM whose N is a group's
    length (W/G) and whose K is the key width DK."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    for n, lo, hi, want in ((1, 16, 128, 16), (16, 16, 128, 16), (17, 16, 128, 32), (32, 16, 128, 32),
                            (64, 16, 128, 64), (65, 16, 128, 128), (1000, 16, 64, 64)):
        assert launch._pow2_at_least(n, lo, hi) == want, (n, lo, hi)
    tiles = launch.segment_matmul_tiles(1000, 4, 64, 32, "half")
    assert (tiles["BLOCK_N"], tiles["BLOCK_K"]) == (64, 32), tiles
    tiles = launch.group_scores_tiles(2048, 8, 8 * 32, 1600, "half")
    assert (tiles["BLOCK_T"], tiles["BLOCK_K"]) == (32, 64), tiles


def test_gpu_tiles_switch_at_128_row_and_64_token_groups(monkeypatch):
    """`_rows_block`: 128-row tiles from 128-row groups on (T >= 128·G), else 64; grouped_outer's
    token chunk is 64 unless the groups are shorter than 64 tokens (T < 64·G: then 32)."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert launch.segment_matmul_tiles(128 * 8, 8, 1920, 8000, "half")["BLOCK_M"] == 128
    assert launch.segment_matmul_tiles(128 * 8 - 1, 8, 1920, 8000, "half")["BLOCK_M"] == 64
    assert launch.grouped_outer_tiles(64 * 8, 8, 6400, 1600, "half")["BLOCK_T"] == 64
    assert launch.grouped_outer_tiles(64 * 8 - 1, 8, 6400, 1600, "half")["BLOCK_T"] == 32


# Whole GPU configs of the heuristic (blocks, warps and stages) away from the benchmark shapes,
# where the tests above pin a block or two: (tile function, its arguments, the config's values in
# the order of launch._TILE_KEYS) and why that config.
_GPU_CONFIGS = {
    # 64-row tiles (groups under 128 rows) take 4 warps: 202 registers at 64×128×64, no spill, and
    # launch.CANDIDATES' second "half" config, which tune.py times against the 128-row one.
    "half, 64-row tiles": ("segment_matmul_tiles", (128 * 8 - 1, 8, 1920, 8000, "half"), (64, 128, 64, 4, 3)),
    # IEEE fp32 runs on the FMA units and its tile only has to fit: 64×64×32 with 4 warps (216
    # registers with the full epilogue) whatever the group length, not the 128 rows of long groups.
    "ieee, long groups": ("segment_matmul_tiles", (4096, 8, 8000, 1920, "ieee"), (64, 64, 32, 4, 2)),
    # grouped_outer of an fp32 and a bf16 operand (bf16x3) keeps 32-token chunks at long groups,
    # as tf32x3 does: fp32 tiles take twice the bytes.
    "grouped_outer bf16x3, long groups": ("grouped_outer_tiles", (4096, 8, 8000, 1920, "bf16x3"),
                                          (128, 128, 32, 8, 3)),
    # grouped_bilinear's second launch is a GEMM over V's DV columns (BLOCK_N) whose inner dimension
    # is a group's length, W/G (BLOCK_T); at the benchmark shape both round to the same blocks.
    "grouped_bilinear, 32-row segments": ("grouped_bilinear_tiles", (2048, 8, 8 * 32, 1600, "bf16x3"),
                                          (128, 64, 32, 8, 3)),
}


@pytest.mark.parametrize("case", list(_GPU_CONFIGS))
def test_gpu_tile_configs_away_from_the_benchmark_shapes(monkeypatch, case):
    """The GPU heuristic's full config in the cases `_GPU_CONFIGS` lists: a warp count, a stage
    count or a block of a path that no benchmark shape reaches could drift (a config that spills
    or wastes a tile) while every test above still passed."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    name, args, want = _GPU_CONFIGS[case]
    tiles = getattr(launch, name)(*args)
    assert tuple(tiles.values()) == want, tiles


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_native_branch(gen, device, dt, monkeypatch):
    """The tensor-core branches of `mma` for 16-bit inputs: "half" (16-bit tl.dot), "bf16x3"
    (fp32 tiles against bf16 ones, split in three) and "tf32x3" (other fp32 tiles), on every
    launcher.  Under the interpreter the 16-bit dots take exact fp32 products (`_dot16`)."""
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "1")
    taken = []

    def spy(name, real):
        def dot_path(*args):
            taken.append((name, real(*args)))
            return taken[-1][1]
        return dot_path

    for name in ("segment_matmul", "grouped_outer", "grouped_bilinear"):
        monkeypatch.setattr(_module(name), "dot_path", spy(name, _module(name).dot_path))
    counts = [0, 9, 17, 3, 0]
    offsets = offsets_for(counts, device)
    T, G = sum(counts), len(counts)

    x, w = randn((T, 21), gen, dt, device), randn((G, 18, 21), gen, dt, device)
    gain, bias = randn((T, 21), gen, dt, device), randn((G, 18), gen, dt, device)
    close(tk.segment_matmul(x, w, offsets, gain=gain, bias=bias, relu=True),
          segment_matmul_ref(x.double(), w.double(), counts, True, gain.double(), bias.double(), None, None, True,
                             None))

    inputs = lowrank_inputs(gen, counts, dt, device, d=21, r=18)
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]),
          reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:])))
    grad_out = randn(inputs[0].shape, gen, dt, device)
    for g, ref in zip(tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:]),
                      lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref)

    eta, mu = randn((T, 29), gen, dt, device), randn((T, 13), gen, dt, device)
    for fusion in ("none", "sss"):
        close(tk.grouped_outer(eta, mu, offsets, fusion, 0.5),
              reference.grouped_outer(*f64(eta, mu), offsets, fusion, 0.5))
    close(tk.segmented_fisher(eta, mu, offsets), reference.segmented_fisher(*f64(eta, mu), offsets))

    args = delta_inputs(gen, counts, dt, device, N=19, o=29, i=13)
    grad = randn((19, 29), gen, dt, device)
    x, weight, b, row_group, mu_t, eta_t, alpha = args
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    close_delta_grads(grads, grad_refs, eta_t, offsets, alpha)
    mixed = "bf16x3" if dt == torch.bfloat16 else "tf32x3"
    for name in ("segment_matmul", "grouped_outer", "grouped_bilinear"):
        assert {path for kernel, path in taken if kernel == name} <= {"half", "bf16x3", "tf32x3"}, taken
    assert ("segment_matmul", mixed) in taken and ("grouped_bilinear", mixed) in taken, taken
    assert ("segment_matmul", "half") in taken and ("grouped_outer", "half") in taken, taken
    assert ("grouped_bilinear", "half") in taken, taken


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_lowrank_delta_linear_fp32_factors_of_a_16bit_layer_take_tensor_cores(gen, device, dt, monkeypatch,
                                                                              float32_precision):
    """lowrank_delta_linear as training runs it: a 16-bit layer (x, weight) with the editor's fp32
    factors (grouped_lowrank returns fp32 mu_t, eta_t).  The scores C are fp32 and so is V in the
    forward (eta_t) and in dx (mu_t): those dots took the IEEE fp32 dot on the FMA units (an
    fp32-only op's form under torch's default "highest") though the op's inputs are 16-bit.  Every
    launch now takes tensor cores at ~fp32 accuracy (bf16x3 or tf32x3, as grouped_lowrank's fp32
    intermediates do), and the results stay within tolerance of float64."""
    monkeypatch.delenv(launch.NATIVE_DOT_ENV, raising=False)
    float32_precision("highest")
    taken = []
    module = _module("grouped_bilinear")
    real = module.dot_path
    monkeypatch.setattr(module, "dot_path", lambda *args: taken.append(real(*args)) or taken[-1])
    counts = [0, 9, 17, 3, 0]
    offsets = offsets_for(counts, device)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dt, device, N=19, o=29, i=13)
    mu_t, eta_t, alpha = mu_t.float(), eta_t.float(), alpha.float()
    grad = randn((19, 29), gen, dt, device)
    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
    close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
    close_delta_grads(grads, grad_refs, eta_t, offsets, alpha)
    assert len(taken) == 8 and "ieee" not in taken, taken  # 2 launches each: forward, dx, deta, dmu


def test_fp32_factors_of_a_16bit_grouped_lowrank_keep_three_tf32_passes(gen, device, monkeypatch,
                                                                        float32_precision):
    """grouped_lowrank as an fp32 editor runs on a 16-bit model: bf16 h, fp32 u, v, bias, scale,
    shift and gain.  Its fp32 x fp32 GEMMs (z u_g^T, (gain h) v_g^T, and the backward's) take
    tensor cores because h is 16-bit (`precision_from`), and so must keep tf32x3's three passes
    (SPLIT 3, ~fp32), not the one TF32 pass of an fp32-only op (2^-11 per product, ~100x fp32's
    1e-5 tolerance on a GPU).  The interpreter computes TF32 in fp32, so the values cannot show
    it: each launch's NATIVE and SPLIT are checked (segment_matmul's, and grouped_outer's for du
    and dv, fp32 da z and dz x), and the values too."""
    monkeypatch.delenv(launch.NATIVE_DOT_ENV, raising=False)
    monkeypatch.delenv(launch.FP32_SPLIT_ENV, raising=False)
    float32_precision("highest")
    taken = []

    class Spy:  # records each launch's dot constexprs
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                taken.append((self.name, kwargs["NATIVE"], kwargs["SPLIT"]))
                return self.kernel[grid](*args, **kwargs)
            return run

    for name in ("segment_matmul", "grouped_outer"):
        module = _module(name)
        monkeypatch.setattr(module, f"_{name}_kernel", Spy(name, getattr(module, f"_{name}_kernel")))
    counts = [0, 9, 17, 3, 0]
    offsets = offsets_for(counts, device)
    inputs = list(lowrank_inputs(gen, counts, torch.float32, device, d=21, r=18))
    inputs[0] = inputs[0].to(torch.bfloat16)  # h, the model's hidden states
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]),
          reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:])))
    grad_out = randn(inputs[0].shape, gen, torch.bfloat16, device)
    for g, ref in zip(tk.grouped_lowrank_backward(grad_out, inputs[0], offsets, *inputs[1:]),
                      lowrank_reference_grads(grad_out, offsets, inputs)):
        close(g, ref)
    # Forward: 2 segment_matmul launches; backward: 4 (z, a, dz, dx) and 2 grouped_outer (du, dv).
    assert collections.Counter(taken) == {("segment_matmul", True, 3): 6, ("grouped_outer", True, 3): 2}, taken


def test_bf16x3_keeps_fp32_accuracy(gen, device, monkeypatch):
    """grouped_bilinear's fp32 scores meet bf16 V through the three-way bf16 split: the fp32
    result is within fp32's tolerance of float64 (one bf16 rounding of the scores would put
    ~2^-9 relative error on every product: 1.7e-3 in float64 on such inputs, 170× the
    tolerance)."""
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "1")
    bf16 = torch.bfloat16
    counts = [0, 23, 5, 40]
    offsets = offsets_for(counts, device)
    nq, dk, dv = 37, 45, 33
    q, k, v = randn((nq, dk), gen, bf16, device), randn((68, dk), gen, bf16, device), randn((68, dv), gen, bf16, device)
    q_group = torch.sort(torch.randint(0, 4, (nq,), generator=gen)).values.to(device)
    alpha = randn((4,), gen, torch.float32, device)
    out = _module("grouped_bilinear").grouped_bilinear_(torch.zeros((nq, dv), device=device), q, None, q_group, k, v,
                                                        None, offsets, alpha)
    b = offsets.tolist()
    want = torch.stack([alpha[g].double() * (q[p].double() @ k[b[g]:b[g + 1]].double().T) @ v[b[g]:b[g + 1]].double()
                        for p, g in enumerate(q_group.tolist())])
    close(out, want)


def test_bf16x3_is_exact_on_one_hot_bf16_operands(gen, device, monkeypatch):
    """Both bf16x3 branches keep all 24 bits of the fp32 side: with one-hot bf16 q and v rows
    (exact in bf16) every output entry is one fp32 entry of k times alpha_g (a power of two), so
    the fp32 output equals it exactly.  q · k takes the bf16 × fp32 branch (k split), C · v the
    fp32 × bf16 one (C split).  Without either branch's lo dot the result is off by up to 2^-16
    relative, which the tolerance tests (1e-5 on a norm) let through."""
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "1")
    counts = [0, 5, 3, 0, 6]
    offsets = offsets_for(counts, device)
    W, G, nq, dk = sum(counts), len(counts), 23, 9
    columns = torch.randint(0, dk, (nq,), generator=gen)
    q = torch.nn.functional.one_hot(columns, dk).to(torch.bfloat16).to(device)
    q_group = torch.sort(torch.randint(0, G, (nq,), generator=gen)).values
    k = randn((W, dk), gen, torch.float32, device)
    v = torch.eye(W + 3, dtype=torch.bfloat16, device=device)[:W]
    alpha = torch.tensor([4.0, -0.5, 2.0, 1.0, -1.0], device=device)
    out = _module("grouped_bilinear").grouped_bilinear_(torch.zeros((nq, W + 3), device=device), q, None,
                                                        q_group.to(device), k, v, None, offsets, alpha)
    want = torch.zeros((nq, W + 3), dtype=torch.float64)
    b = offsets.tolist()
    for p, (g, j) in enumerate(zip(q_group.tolist(), columns.tolist())):
        want[p, b[g]:b[g + 1]] = alpha[g].item() * k[b[g]:b[g + 1], j].double().cpu()
    assert torch.equal(out.double().cpu(), want)


def test_fp32_split_trades_accuracy(gen, device, monkeypatch):
    """DCEDIT_TRITON_FP32_SPLIT: grouped_lowrank's fp32 z against bf16 u in 3 pieces (~fp32),
    2 (≤ ~2^-16 per product here: the tolerance of fp32 outputs, 1e-5, is about its edge) or 1
    (z rounded to bf16).  Each setting is a constexpr of its own (a new compile, no stale kernel)."""
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "1")
    counts = [0, 23, 5, 40]
    offsets = offsets_for(counts, device)
    inputs = lowrank_inputs(gen, counts, torch.bfloat16, device, d=45, r=33)
    ref = reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:]))
    err = {}
    for pieces in (3, 2, 1):
        monkeypatch.setenv(launch.FP32_SPLIT_ENV, str(pieces))
        assert launch.fp32_split() == pieces
        err[pieces] = rel_err(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]), ref)
    assert err[3] < 1e-6 and err[3] < err[2] < 5e-5 and 1e-4 < err[1] < 3e-2, err
    monkeypatch.setenv(launch.FP32_SPLIT_ENV, "4")
    with pytest.raises(ValueError, match=launch.FP32_SPLIT_ENV):
        tk.grouped_lowrank(inputs[0], offsets, *inputs[1:])


def test_tune_precision_tables_run(gen, device, monkeypatch):
    """tune.py's precision tables (run on a GPU by benchmarks/run_gpu.sh) at a tiny shape, its
    timer replaced: one line per setting, and the settings the caller had are restored."""
    tune = _module("tune")
    monkeypatch.setattr(tune, "_median_ms", lambda fn, reps: (fn(), 2.0)[1])
    monkeypatch.setenv(launch.FP32_SPLIT_ENV, "2")
    lines = tune.split_choices(gen, 1, T=40, G=3, d=24, r=16, device=device)
    assert len(lines) == 4 and "dense" in lines[0] and "100% of dense" in lines[3], lines
    assert launch.fp32_split() == 2
    precision = torch.get_float32_matmul_precision()
    lines = tune.fp32_choices(gen, 1, T=40, G=3, d=24, r=16, device=device)
    assert len(lines) == 4 and "(high), reference" in lines[3], lines
    assert torch.get_float32_matmul_precision() == precision


def test_tune_fp32_table_runs_and_restores_torchs_newer_tf32_switch(gen, device, monkeypatch, tf32_switch):
    """tune.fp32_choices saved the caller's setting with torch.get_float32_matmul_precision(), which
    raises RuntimeError ("mix of the legacy and new APIs") once TF32 was allowed through
    `torch.backends.cuda.matmul.fp32_precision`: the GPU tuning table failed for such a caller.  It
    sets and restores that switch now, and its "high" rows run with TF32 allowed."""
    tune = _module("tune")
    seen = []
    monkeypatch.setattr(tune, "_median_ms", lambda fn, reps: (fn(), seen.append(launch.fp32_tensor_cores()), 2.0)[2])
    tf32_switch("tf32")
    lines = tune.fp32_choices(gen, 1, T=40, G=3, d=24, r=16, device=device)
    assert len(lines) == 4 and "(high), reference" in lines[3], lines
    assert seen == [False, False, True, True]
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_tune_precision_tables_report_the_share_of_dense_and_restore_an_unset_split(gen, device, monkeypatch):
    """split_choices' last column is the dense matmul's time over grouped_lowrank's (issue 5's "60%
    of dense" reads off it): a dense run of 1 ms against 2 ms reads 50%.  An unset
    DCEDIT_TRITON_FP32_SPLIT is unset again afterwards (the settings the caller had)."""
    tune = _module("tune")
    times = iter([1.0, 2.0, 4.0, 1.0])
    monkeypatch.setattr(tune, "_median_ms", lambda fn, reps: (fn(), next(times))[1])
    monkeypatch.delenv(launch.FP32_SPLIT_ENV, raising=False)
    lines = tune.split_choices(gen, 1, T=40, G=3, d=24, r=16, device=device)
    assert [line.rsplit(", ", 1)[1] for line in lines[1:]] == ["50% of dense", "25% of dense", "100% of dense"], lines
    assert launch.FP32_SPLIT_ENV not in os.environ


@pytest.mark.parametrize("shape", ["candidate_0", "candidate_1", "no_candidate"])
def test_tune_sweep_names_the_fastest_candidate(shape, gen, monkeypatch, capsys):
    """tune.py's config sweep (`main --sweep`, run on a GPU by benchmarks/run_gpu.sh) runs a case
    under each of its kernel's launch.CANDIDATES in turn (pinned by forced_tiles) and its "best"
    line names the fastest against the heuristic's time: the measured reason to change launch.py.
    The heuristic's config is the one the case's unforced call chose (`launch.chosen_tiles`):
    candidate 0 at the benchmark shape, candidate 1 at segmented_fisher's short edits (labelled
    candidate 0's before), or none of them (a small shape: timed as one more).  Here one case on
    random scripted times, the GPU checks faked, twice: with the heuristic's config slowest
    ("heuristic <its time>") and fastest ("the heuristic's")."""
    tune = _module("tune")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "scripted")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    kernel, path = "grouped_outer", "half"
    T, G = {"candidate_0": (4096, 8), "candidate_1": (3000, 125), "no_candidate": (40, 2)}[shape]
    O, I = (6400, 1600) if shape != "no_candidate" else (20, 24)
    heuristic = launch.grouped_outer_tiles(T, G, O, I, path)
    configs = list(launch.CANDIDATES[kernel][path])
    if shape == "no_candidate":
        assert heuristic not in configs
        configs.insert(0, heuristic)
    mine = configs.index(heuristic)
    assert mine == {"candidate_0": 0, "candidate_1": 1, "no_candidate": 0}[shape]
    seen = []
    case = (kernel, path, "scripted case", 1e9, lambda: seen.append(launch.grouped_outer_tiles(T, G, O, I, path)))
    monkeypatch.setattr(tune, "_cases", lambda gen: [case])
    times = (1 + torch.rand(len(configs), generator=gen)).tolist()
    # seen[0]: the unforced call that finds the heuristic's config; then one per candidate timed
    monkeypatch.setattr(tune, "_median_ms", lambda fn, reps: (fn(), times[len(seen) - 2])[1])
    for slowest in (True, False):
        times[mine] = max(times) + 0.5 if slowest else min(times) - 0.5
        seen.clear()
        assert tune.main(["--sweep"]) == 0
        assert seen == [heuristic] + configs
        out = capsys.readouterr().out.splitlines()
        marked = [line for line in out if "(heuristic)" in line]
        name = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in heuristic.items())
        assert len(marked) == 1 and f"[{name}] (heuristic)" in marked[0], out
        best = min(range(len(configs)), key=times.__getitem__)
        name = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in configs[best].items())
        versus = "the heuristic's" if best == mine else f"heuristic {times[mine]:.3f} ms"
        assert out[-1] == f"best {kernel}/{path} for scripted case: [{name}] {times[best]:.3f} ms ({versus})", out[-1]


def test_tune_benchmark_offsets_hold_an_empty_group(gen):
    """tune.py's ragged offsets (`_ragged`, as the benchmarks build them): G groups over T tokens,
    non-decreasing from 0 to T, one of them empty."""
    tune = _module("tune")
    for T, G in ((4096, 8), (50, 3), (7, 5)):
        offsets = tune._ragged(T, G, gen, device="cpu")
        counts = offsets.diff()
        assert offsets.dtype == torch.int32 and offsets.shape == (G + 1,)
        assert int(offsets[0]) == 0 and int(offsets[-1]) == T and bool((counts >= 0).all())
        assert bool((counts == 0).any()), offsets


@pytest.fixture
def float32_precision():
    """Sets torch's float32 matmul precision inside a test and restores it after: the newer switches
    too (torch 2.9 on), which set_float32_matmul_precision(previous) alone does not give back: their
    "none" (follow `torch.backends.fp32_precision`) came back "ieee", and for the rest of the process
    the global switch no longer reached matmuls (test_fp32_ops_follow_torchs_global_tf32_switch
    failed after test_native_dot_choice)."""
    matmuls = [m for m in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
               if hasattr(m, "fp32_precision")]
    previous, switches = torch.get_float32_matmul_precision(), [m.fp32_precision for m in matmuls]
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)
    for matmul, switch in zip(matmuls, switches):
        matmul.fp32_precision = switch


def test_fp32_ops_follow_torch_matmul_precision(gen, device, float32_precision, monkeypatch):
    """fp32 inputs under torch's "high" precision: every launcher takes the native branch with one
    TF32 pass (SPLIT 1), to TF32's accuracy (2^-11 per product; the interpreter computes it in
    fp32); under "highest" the IEEE dot.  grouped_outer with "add": sss/max select per entry, and
    TF32's error near a cut (P ≈ −N) would flip a whole entry now and then."""
    taken = []
    real_split = launch.dot_split
    for name in ("segment_matmul", "grouped_outer", "grouped_bilinear"):
        module = _module(name)
        monkeypatch.setattr(module, "dot_split", lambda *d, _n=name: taken.append(_n) or real_split(*d))
    counts = [0, 9, 17, 3, 0]
    offsets = offsets_for(counts, device)
    T = sum(counts)
    inputs = lowrank_inputs(gen, counts, torch.float32, device, d=21, r=18)
    eta, mu = randn((T, 29), gen, torch.float32, device), randn((T, 13), gen, torch.float32, device)
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, torch.float32, device)
    refs = (reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:])),
            reference.grouped_outer(*f64(eta, mu), offsets, "add", 1.0),
            delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha,
                            torch.ones(x.shape[0], weight.shape[0], device=device))[0])
    for setting, tol in (("highest", TOL[torch.float32]), ("high", 2e-3)):
        float32_precision(setting)
        assert launch.native_dot(torch.float32) is (setting == "high")
        outs = (tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]), tk.grouped_outer(eta, mu, offsets, "add", 1.0),
                tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha))
        for out, ref in zip(outs, refs):
            assert rel_err(out, ref) < tol, setting
    assert {"segment_matmul", "grouped_outer", "grouped_bilinear"} <= set(taken)


@pytest.fixture
def tf32_switch():
    """Sets torch's newer TF32 switch, `torch.backends.cuda.matmul.fp32_precision` (torch 2.9 on),
    inside a test and restores it after."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has no backends.cuda.matmul.fp32_precision")
    previous = matmul.fp32_precision
    yield lambda value: setattr(matmul, "fp32_precision", value)
    matmul.fp32_precision = previous


def test_fp32_ops_follow_torchs_newer_tf32_switch(gen, device, tf32_switch):
    """TF32 allowed the way torch's notes now recommend, `torch.backends.cuda.matmul.fp32_precision
    = "tf32"`: every fp32 op raised RuntimeError ("... mix of the legacy and new APIs to set the
    matmul precision"), which `torch.get_float32_matmul_precision()` raises from then on (torch 2.11
    and 2.13).  Now the launchers read the newer switch: "tf32" takes the TF32 branch, "ieee" the
    IEEE dot, as the old API's "high" and "highest" do."""
    counts = [0, 9, 17, 3, 0]
    offsets = offsets_for(counts, device)
    inputs = lowrank_inputs(gen, counts, torch.float32, device, d=21, r=18)
    ref = reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:]))
    for setting, tol in (("tf32", 2e-3), ("ieee", TOL[torch.float32])):
        tf32_switch(setting)
        assert launch.native_dot(torch.float32) is (setting == "tf32")
        assert rel_err(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]), ref) < tol, setting


def test_fp32_ops_follow_torchs_global_tf32_switch():
    """`torch.backends.fp32_precision = "tf32"` allows TF32 wherever a backend's own switch is "none",
    torch's default (fp32_tensor_cores' docstring: the matmul switch inherits the global one): fp32
    dots take the TF32 branch then, and the IEEE dot again once it is back.  The matmul switch is
    left at its default here, as the tests before this one must leave it."""
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("torch before 2.9 has no torch.backends.fp32_precision")
    previous = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        assert launch.fp32_tensor_cores() and launch.native_dot(torch.float32)
    finally:
        torch.backends.fp32_precision = previous
    assert not launch.native_dot(torch.float32)


def test_ieee_branch_with_bf16(gen, device, monkeypatch):
    """DCEDIT_TRITON_NATIVE_DOT=0: bf16 inputs through the exact fp32 dot."""
    monkeypatch.setenv(launch.NATIVE_DOT_ENV, "0")
    dt = torch.bfloat16
    counts = [0, 40, 3, 77, 0]
    offsets = offsets_for(counts, device)
    inputs = lowrank_inputs(gen, counts, dt, device, d=70, r=33)
    close(tk.grouped_lowrank(inputs[0], offsets, *inputs[1:]),
          reference.grouped_lowrank(inputs[0].double(), offsets, *f64(*inputs[1:])))
    eta, mu = randn((120, 50), gen, dt, device), randn((120, 45), gen, dt, device)
    close(tk.grouped_outer(eta, mu, offsets, "sss", 1.0), reference.grouped_outer(*f64(eta, mu), offsets, "sss", 1.0))
    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dt, device, N=90, o=70, i=50)
    y_ref = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, torch.ones(90, 70, device=device))[0]
    close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)


@cuda_only
@pytest.mark.parametrize("kernel", list(launch.CANDIDATES))
def test_every_config_candidate(gen, kernel):
    """Each candidate tune.py may pick, forced, on ragged groups (empty ones too) and odd sizes that
    leave partial tiles in every dimension, through the path it is meant for."""
    device, dt = "cuda", torch.bfloat16
    counts = [0, 150, 7, 0, 301, 1, 0]
    offsets = offsets_for(counts, device)
    T, G = sum(counts), len(counts)
    for path, configs in launch.CANDIDATES[kernel].items():
        for cfg in configs:
            with launch.forced_tiles(kernel, **cfg):
                if kernel == "segment_matmul" and path == "half":
                    x, w = randn((T, 333), gen, dt, device), randn((G, 200, 333), gen, dt, device)
                    close(tk.segment_matmul(x, w, offsets),
                          segment_matmul_ref(x.double(), w.double(), counts, True, None, None, None, None, False, None))
                elif kernel == "segment_matmul":  # bf16x3: fp32 rows against bf16 weights, epilogue
                    x, w = randn((T, 99), gen, torch.float32, device), randn((G, 333, 99), gen, dt, device)
                    bias, res = randn((G, 333), gen, dt, device), randn((T, 333), gen, dt, device)
                    close(tk.segment_matmul(x, w, offsets, bias=bias, scale=bias, relu=True, residual=res),
                          segment_matmul_ref(x.double(), w.double(), counts, True, None, bias.double(), bias.double(),
                                             None, True, res.double()))
                elif kernel == "grouped_outer":
                    src = torch.float32 if path == "tf32x3" else dt
                    eta, mu = randn((T, 333), gen, src, device), randn((T, 201), gen, src, device)
                    for fusion in FUSIONS:
                        close(launch_outer(eta, mu, offsets, fusion, dt),
                              reference.grouped_outer(*f64(eta, mu), offsets, fusion, 1.0))
                elif kernel == "grouped_outer_select":  # through the whole backward
                    eta, mu = randn((T, 333), gen, dt, device), randn((T, 201), gen, dt, device)
                    grad = randn((333, 201), gen, torch.float32, device)
                    for fusion in ("max", "sss", "ssm"):
                        for out, ref in zip(tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5),
                                            outer_backward_ref(grad, eta, mu, offsets, fusion, 0.5)):
                            close(out, ref)
                else:
                    x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dt, device, N=300, o=333,
                                                                               i=201)
                    grad = randn((300, 333), gen, dt, device)
                    y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
                    close(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
                    grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
                    close_delta_grads(grads, grad_refs, eta_t, offsets, alpha)


def launch_outer(eta, mu, offsets, fusion, src_dtype):
    """grouped_outer with `precision_from` (fp32 operands of a 16-bit op take tf32x3, or bf16x3
    against a bf16 one)."""
    go = _module("grouped_outer")
    return go.launch_grouped_outer(eta, mu, offsets, go.FUSION_MODES[fusion], 1.0, precision_from=(src_dtype,))


# ------------------------------------------------------------------ benchmark-sized, CUDA only

LARGE_TOL = 1e-4  # fp32 outputs of bf16 inputs: exact products, fp32 sums over up to 8000 terms


def close_large(out, ref):
    """The output dtype's tolerance for 16-bit outputs, LARGE_TOL for fp32 ones."""
    if out.dtype in (torch.float16, torch.bfloat16):
        return close(out, ref)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < LARGE_TOL, f"relative error {err:.3g} >= {LARGE_TOL:.3g}"


def close_selected(out, ref, stack, fusion):
    """grouped_outer's `out` against float64's `ref` (`stack`: float64's S_g) with close_large,
    for every fusion; returns how many entries lie at a selection's cut.

    max and sss/ssm select per entry, and where the deciding value (|S_g| against the runner-up,
    P + N) is within fp32 rounding of its cut, the kernel's fp32 sums may take the other side than
    float64: the entry's sign flips, an error of ~2|S| that is right to rounding.  At the benchmark
    shape (10M entries) about one entry a draw does, and one such entry alone puts the relative
    error at 3-4e-4, past LARGE_TOL (torch's fp32 matmul standing in for the kernel's fp32 sums of
    the same bf16 products: the first of two draws had one in max and one in sss).  The magnitudes
    |max_g S_g| and max(P, −N) are continuous at the cuts, so they are compared everywhere, and
    the signed values where the deciding value is farther than `slack` from the cut: 1e-5 of the
    largest |S_g| (as check_large_outer_backward), ~60 times the fp32 sums' typical rounding
    (u·√n·|S|, u = 2^-24, n ≈ 512 tokens a group) at the benchmark shape.
    """
    if fusion in ("none", "add"):
        close_large(out, ref)
        return 0
    close_large(out.abs(), ref.abs())
    slack = 1e-5 * stack.abs().amax()
    if fusion == "max":
        top2 = stack.abs().topk(2, dim=0).values  # G >= 2: one group's max selects nothing
        clear = (top2[0] - top2[1]) > slack
    else:
        clear = (stack.clamp(min=0).sum(0) + stack.clamp(max=0).sum(0)).abs() > slack
    close_large(out[clear], ref[clear])
    return int((~clear).sum())


def test_close_selected_takes_either_side_of_a_cut(gen, device):
    """An entry planted on the cut: S_0 = 1 and S_1 = −(1 + 2^-30), which fp32 sums make −1 (a tie,
    so the kernel takes +1) and float64 keeps (−1.000000001 wins).  close_large on the whole output
    rejected that right answer (relative error ~5e-2 here); close_selected takes either side there
    and still rejects a sign flip away from the cut."""
    bf = torch.bfloat16
    n, o, i = 4, 16, 16
    eta, mu = randn((2 * n, o), gen, bf, device), randn((2 * n, i), gen, bf, device)
    eta[:, 0], mu[:, 0] = 0, 0
    eta[0, 0], mu[0, 0] = 1, 1
    eta[n, 0], mu[n, 0] = -1, 1
    eta[n + 1, 0], mu[n + 1, 0] = -1, 2.0 ** -30  # exact in bf16; below fp32's resolution at 1
    offsets = offsets_for([n, n], device)
    stack = reference.grouped_outer(*f64(eta, mu), offsets, "none", 1.0)
    for fusion in ("max", "sss", "ssm"):
        out = tk.grouped_outer(eta, mu, offsets, fusion, 1.0)
        ref = reference.grouped_outer(*f64(eta, mu), offsets, fusion, 1.0)
        assert close_selected(out, ref, stack, fusion) >= 1, fusion
        # The entry farthest from its cut (|P + N|, or |S_g|'s lead over the runner-up).
        if fusion == "max":
            margin = stack.abs().topk(2, dim=0).values.diff(dim=0).abs()[0]
        else:
            margin = stack.sum(0).abs()
        far = margin.argmax()
        wrong = out.clone()
        wrong.view(-1)[far] *= -1
        with pytest.raises(AssertionError):
            close_selected(wrong, ref, stack, fusion)


def _bench_offsets(T, G, gen):
    cuts = torch.sort(torch.randint(0, T + 1, (G - 1,), generator=gen)).values
    cuts[0] = cuts[1]  # one empty group, as the benchmarks have
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).tolist()


@cuda_only
@pytest.mark.parametrize("op", ["segment_matmul", "grouped_lowrank", "grouped_outer", "segmented_fisher",
                                "lowrank_delta_linear"])
def test_large_shapes_bf16(gen, op):
    """The benchmark shapes (GPT-2 XL's MLP: i 1600, o 6400; MEND's d 8000) in bf16 against the
    float64 reference on the same rounded values."""
    device, dt = "cuda", torch.bfloat16
    if op in ("segment_matmul", "grouped_lowrank"):
        T, G, d, r = 4096, 8, 8000, 1920
        bounds = _bench_offsets(T, G, gen)
        counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        offsets = offsets_for(counts, device)
        if op == "segment_matmul":
            x, gain = randn((T, d), gen, dt, device), randn((T, d), gen, dt, device)
            w = randn((G, r, d), gen, dt, device)
            close_large(tk.segment_matmul(x, w, offsets, gain=gain),
                        segment_matmul_ref(x.double(), w.double(), counts, True, gain.double(), None, None, None,
                                           False, None))
            return
        h, u, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, dt, device, d=d, r=r)
        u, v = (u.float() * 0.01).to(dt), (v.float() * 0.01).to(dt)
        inputs = (h, u, v, bias, scale, shift, gain)
        close_large(tk.grouped_lowrank(h, offsets, *inputs[1:]), reference.grouped_lowrank(h.double(), offsets,
                                                                                            *f64(*inputs[1:])))
        grad_out = randn(h.shape, gen, dt, device)
        for g, ref in zip(tk.grouped_lowrank_backward(grad_out, h, offsets, *inputs[1:]),
                          lowrank_reference_grads(grad_out, offsets, inputs)):
            close_large(g, ref)
    elif op == "grouped_outer":
        T, G, o, i = 4096, 8, 6400, 1600
        offsets = torch.tensor(_bench_offsets(T, G, gen), dtype=torch.int32, device=device)
        eta, mu = randn((T, o), gen, dt, device), randn((T, i), gen, dt, device)
        stack = reference.grouped_outer(*f64(eta, mu), offsets, "none", 1.0)
        for fusion in FUSIONS:
            at_cut = close_selected(tk.grouped_outer(eta, mu, offsets, fusion, 1.0),
                                    reference.grouped_outer(*f64(eta, mu), offsets, fusion, 1.0), stack, fusion)
            # Rare: 1,112 (max) and 227 (sss) of the 10M entries in the CPU stand-in's draw.
            assert at_cut <= stack[0].numel() // 1000, (fusion, at_cut)
        del stack
        check_large_outer_backward(gen, eta, mu, offsets)
    elif op == "segmented_fisher":
        counts = torch.randint(12, 37, (125,), generator=gen).tolist()
        offsets = offsets_for(counts, device)
        eta, mu = randn((sum(counts), 6400), gen, dt, device), randn((sum(counts), 1600), gen, dt, device)
        close_large(tk.segmented_fisher(eta, mu, offsets), reference.segmented_fisher(*f64(eta, mu), offsets))
    else:
        N, G, per, o, i = 2048, 8, 512, 6400, 1600
        counts = [per] * G
        offsets = offsets_for(counts, device)
        x, weight, b, row_group, mu_t, eta_t, alpha = delta_inputs(gen, counts, dt, device, N=N, o=o, i=i)
        alpha = (alpha.float() * 0.05).to(dt)  # the shift term about as large as the dense part
        grad = randn((N, o), gen, dt, device)
        y_ref, *grad_refs = delta_reference(x, weight, b, row_group, mu_t, eta_t, offsets, alpha, grad)
        close_large(tk.lowrank_delta_linear(x, weight, b, row_group, mu_t, eta_t, offsets, alpha), y_ref)
        grads = tk.lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha)
        close_delta_grads(grads, grad_refs, eta_t, offsets, alpha, close_large)


def check_weight_sized_outer(gen, device, o, i, T, G):
    """grouped_outer "none" and "add" (forward and backward) in bf16 against torch's fp32 matmuls
    of the same values (exact products, fp32 sums as the kernel's), compared on the device."""
    def err(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    dt = torch.bfloat16
    bounds = _bench_offsets(T, G, gen)
    offsets = torch.tensor(bounds, dtype=torch.int32, device=device)
    eta, mu = randn((T, o), gen, dt, device), randn((T, i), gen, dt, device)
    out = tk.grouped_outer(eta, mu, offsets, "none", 1.0)
    assert out.shape == (G, o, i)
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert err(out[g], eta[a:b].float().T @ mu[a:b].float()) < LARGE_TOL, g
    del out
    assert err(tk.grouped_outer(eta, mu, offsets, "add", 1.0), eta.float().T @ mu.float()) < LARGE_TOL
    grad = randn((o, i), gen, torch.float32, device)
    d_eta, d_mu = tk.grouped_outer_backward(grad, eta, mu, offsets, "add", 1.0)
    assert err(d_eta, mu.float() @ grad.T) < TOL[dt] and err(d_mu, eta.float() @ grad) < TOL[dt]


@cuda_only
def test_weight_sized_outer_70b_bf16(gen):
    """A 70B model's largest weight (o 28672 × i 8192 = 235M entries) with 12 groups of 2048 tokens
    in all: the "none" stack's last groups start past 2^31 entries (11 · 235M), the backward's
    GEMMs read a 235M-entry gradient.  The CPU tests reach int32 limits only through strided
    views; this runs the offsets at the sizes the package is meant for (~35 GB of GPU memory)."""
    check_weight_sized_outer(gen, "cuda", o=28672, i=8192, T=2048, G=12)


def test_weight_sized_outer_small(gen, device):
    """check_weight_sized_outer itself, at a size the interpreter runs."""
    check_weight_sized_outer(gen, device, o=37, i=21, T=40, G=4)


def check_large_outer_backward(gen, eta, mu, offsets):
    """grouped_outer's backward at the benchmark shape.  Which S_g entries are selected can
    legitimately differ from float64 where an entry's deciding value (|S_g| against the best, S_g's
    sign, P + N) is within fp32 rounding of the cut, and each such entry moves the gradient by a
    whole g_out entry; so the gradients are checked in float64 against the kernel's own selection,
    and that selection against float64's away from the cuts."""
    go = _module("grouped_outer")
    G, (o, i) = offsets.shape[0] - 1, (eta.shape[1], mu.shape[1])
    bounds = offsets.tolist()
    grad = randn((o, i), gen, torch.float32, eta.device)
    stack = reference.grouped_outer(*f64(eta, mu), offsets, "none", 1.0)  # (G, o, i) float64
    slack = 1e-5 * stack.abs().amax()
    for fusion in ("max", "sss"):
        sel = go.launch_grouped_outer(eta, mu, offsets, go.FUSION_MODES[fusion], select=True)[0]
        taken = torch.stack([(sel >> g) & 1 for g in range(G)]).bool()
        if fusion == "max":
            mag = stack.abs()
            want = torch.zeros_like(taken).scatter_(0, mag.argmax(0, keepdim=True), True)
            second = mag.topk(2, dim=0).values
            clear = (second[0] - second[1]) > slack
        else:
            pos, neg = stack.clamp(min=0).sum(0), stack.clamp(max=0).sum(0)
            want = torch.where(pos >= -neg, stack > 0, stack < 0)
            clear = ((pos + neg).abs() > slack) & (stack.abs() > slack)
        clear = clear.expand_as(taken) if clear.dim() == 2 else clear
        assert torch.equal(taken[clear], want[clear]), fusion
        d_eta, d_mu = tk.grouped_outer_backward(grad, eta, mu, offsets, fusion, 1.0)
        g64 = grad.double()
        for g in range(G):
            s, e = bounds[g], bounds[g + 1]
            d_s = g64 * taken[g]
            close_large(d_eta[s:e], mu[s:e].double() @ d_s.T)
            close_large(d_mu[s:e], eta[s:e].double() @ d_s)
