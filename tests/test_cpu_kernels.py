"""The C++ kernels (csrc/cpu/; csrc/cuda/'s fisher_mask and apply_shift_ too, on every device of
conftest's `device`) against the plain-PyTorch reference.

Called through the dispatcher (`torch.ops.dcedit.<op>`), so these test exactly what the compiled
`_C` registers for the tensors' device.  The CUDA kernels' tests are these same tests with
device="cuda" (pytorch_scatter's way: one test per op, every device): the inputs are drawn on the
CPU, moved, and the results compared on the CPU.  Every test draws fresh random inputs from conftest's `gen`; the seed
is printed so that a failure can be replayed (DCEDIT_TEST_SEED=<seed>, tests/conftest.py).
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dcedit_kernels._library as library
from dcedit_kernels import reference as R
from helpers import rel_err

pytestmark = pytest.mark.skipif(
    library._C is None,
    reason="dcedit_kernels._C is not built (run `python setup.py build_ext --inplace`) or "
    "DCEDIT_DISABLE_C=1: no C++ CPU kernels to test",
)

ops = torch.ops.dcedit
FUSIONS = ("none", "add", "max", "sss", "ssm")
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BITS = {F16: torch.int16, BF16: torch.int16, F32: torch.int32, F64: torch.int64}
# The kernels tile the output in 64×64 blocks and pack 64 tokens at a time (outer_tile.h): the
# shapes and group sizes below straddle both.
O, I = 70, 130
LAYOUTS = {
    # empty first, middle and last groups, a group over two token chunks, a single token
    "ragged": [0, 150, 3, 0, 77, 1, 0],
    "one_group": [129],
    "all_empty": [0, 0, 0],  # T = 0
}


def test_gen_replays_the_logged_seed(gen, test_seed):
    """`DCEDIT_TEST_SEED=<the logged seed>` replays this file's draws too, as every other file's.
    Its own `gen` fixture drew a second seed from os.urandom, printed after conftest's, which
    nothing could set: a failure here could not be run again on its inputs."""
    assert gen.initial_seed() == test_seed


def offsets_from_counts(counts, dtype=torch.int32):
    off = [0]
    for c in counts:
        off.append(off[-1] + c)
    return torch.tensor(off, dtype=dtype)


def randn(shape, gen, dtype=F32):
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def bits(t):
    return t.contiguous().view(BITS[t.dtype])


def assert_bits_equal(a, b):
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), "not bit-identical"


def mask_on(device, delta, fisher, **kwargs):
    """ops.fisher_mask on `device`'s kernel, its (out, count) back on the CPU."""
    out, count = ops.fisher_mask(delta.to(device), fisher.to(device), **kwargs)
    return out.cpu(), count.cpu()


def shift_on(device, weight, delta, alpha, fisher=None, **kwargs):
    """ops.apply_shift_ of the CPU tensor `weight` by `device`'s kernel: weight written back in place,
    `previous` returned on the CPU."""
    moved = weight.to(device)
    previous = ops.apply_shift_(moved, delta.to(device), alpha, None if fisher is None else fisher.to(device), **kwargs)
    weight.copy_(moved)
    return previous.cpu()


def fp32_tolerance(eta, mu, in_fp64):
    """Elementwise error bound of a summed product: c·eps·Σ_t |η_t||μ_t|ᵀ over all tokens."""
    bound = eta.double().abs().T @ mu.double().abs()
    return bound * (1e-12 if in_fp64 else 2e-5)


# --------------------------------------------------------------------------- grouped_outer


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(
    "eta_dtype,mu_dtype",
    # every (accumulation, input) pair the packing converts: fp64 accumulation takes each dtype
    [(F64, F64), (F32, F32), (F16, F16), (BF16, BF16), (BF16, F32), (F16, F64), (F32, F64), (F64, BF16)],
)
def test_grouped_outer_matches_float64_reference(gen, layout, fusion, eta_dtype, mu_dtype):
    counts = LAYOUTS[layout]
    offsets = offsets_from_counts(counts, torch.int64 if layout == "ragged" else torch.int32)
    T, G = sum(counts), len(counts)
    eta, mu = randn((T, O), gen, eta_dtype), randn((T, I), gen, mu_dtype)
    alpha = 0.37
    out = ops.grouped_outer(eta, mu, offsets, fusion, alpha)

    fp64 = F64 in (eta_dtype, mu_dtype)
    assert out.dtype == (F64 if fp64 else F32)
    assert out.shape == ((G, O, I) if fusion == "none" else (O, I))
    # The reference on the same (already rounded) inputs, computed in float64.
    ref = R.grouped_outer(eta.double(), mu.double(), offsets, fusion, alpha)
    tol = fp32_tolerance(eta, mu, fp64) * alpha
    if fusion in ("none",):
        tol = tol.expand(G, O, I)
    # max and sss select one of two values; where the choice is within rounding of a tie, either
    # answer is right, so those entries are left out (and must be rare).
    stack = R.grouped_outer(eta.double(), mu.double(), offsets, "none", 1.0) * alpha
    decided = torch.ones(ref.shape, dtype=torch.bool)
    if fusion == "max" and G > 1:
        top2 = stack.abs().topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 2 * tol) | (tol == 0)
    elif fusion in ("sss", "ssm"):
        pos, neg = stack.clamp(min=0).sum(0), stack.clamp(max=0).sum(0)
        decided = ((pos + neg).abs() > 2 * tol) | (tol == 0)  # tol 0: every term is 0
    assert decided.float().mean() > 0.95
    err = (out.double() - ref).abs()
    if fusion == "ssm":
        tol = tol / G
    assert bool((err <= tol + 1e-30)[decided].all()), f"max error {err[decided].max()}"


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_fused_modes_follow_the_spec_exactly_from_the_kernels_own_stack(gen, dtype):
    """max / sss / ssm, bit for bit, from the S_g that the same kernel computes for "none"."""
    counts = [0, 40, 130, 0, 9, 66, 0]
    offsets = offsets_from_counts(counts)
    T, G = sum(counts), len(counts)
    eta, mu = randn((T, O), gen, dtype), randn((T, I), gen, dtype)
    alpha = -1.3
    stack = ops.grouped_outer(eta, mu, offsets, "none", 1.0)
    acc = stack.dtype
    a = torch.tensor(alpha, dtype=acc)  # the kernels round alpha to the accumulation type

    winner = stack.abs().argmax(0, keepdim=True)  # first maximal group, as the SPEC says
    assert_bits_equal(ops.grouped_outer(eta, mu, offsets, "max", alpha),
                      stack.gather(0, winner).squeeze(0) * a)

    pos = torch.zeros(O, I, dtype=acc)
    neg = torch.zeros(O, I, dtype=acc)
    for g in range(G):  # group order, as the kernel accumulates
        pos = pos + stack[g].clamp(min=0)
        neg = neg + stack[g].clamp(max=0)
    sss = torch.where(pos >= -neg, pos, neg)
    torch.testing.assert_close(ops.grouped_outer(eta, mu, offsets, "sss", alpha), sss * a,
                               rtol=0, atol=0)
    torch.testing.assert_close(ops.grouped_outer(eta, mu, offsets, "ssm", alpha), sss / G * a,
                               rtol=0, atol=0)
    # "none" scales by alpha too
    torch.testing.assert_close(ops.grouped_outer(eta, mu, offsets, "none", alpha), stack * a,
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, F32, F16])
def test_max_exact_ties_keep_the_first_group(gen, dtype):
    """Group 1 is group 0 negated (|S_1| = |S_0| exactly): the first group's sign must win."""
    n0, n2 = 70, 30
    x, m = randn((n0, O), gen, dtype), randn((n0, I), gen, dtype)
    eta = torch.cat([x, -x, randn((n2, O), gen, dtype) * 0.01])
    mu = torch.cat([m, m, randn((n2, I), gen, dtype)])
    offsets = offsets_from_counts([n0, n0, n2])
    out = ops.grouped_outer(eta, mu, offsets, "max", 1.0)
    stack = ops.grouped_outer(eta, mu, offsets, "none", 1.0)
    assert torch.equal(stack[1], -stack[0])
    s0_wins = stack[0].abs() >= stack[2].abs()
    assert s0_wins.float().mean() > 0.9
    assert torch.equal(out[s0_wins], stack[0][s0_wins])
    assert torch.equal(out[~s0_wins], stack[2][~s0_wins])


def test_grouped_outer_strided_inputs_and_tiny_shapes(gen):
    eta = randn((3, 200), gen).T  # (200, 3) non-contiguous
    mu = randn((1, 200), gen).T   # (200, 1)
    offsets = offsets_from_counts([120, 0, 80])
    for fusion in FUSIONS:
        out = ops.grouped_outer(eta, mu, offsets, fusion, 2.0)
        ref = R.grouped_outer(eta.double(), mu.double(), offsets, fusion, 2.0)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    empty = ops.grouped_outer(randn((5, 0), gen), randn((5, 4), gen), offsets_from_counts([5]), "sss")
    assert empty.shape == (0, 4)


# --------------------------------------------------------------------------- grouped_outer backward


def small_integers(shape, gen, dtype):
    """Values in {-3, ..., 3}: every S_g, P and N is an exact integer in any dtype here, so the
    selection (winner, sign, ties) must be exactly the float64 reference's."""
    return torch.randint(-3, 4, shape, generator=gen).to(dtype)


def outer_backward_f64(grad, eta, mu, offsets, fusion, alpha):
    return R.grouped_outer_backward(grad.double(), eta.double(), mu.double(), offsets, fusion, alpha)


def outer_grad_shape(fusion, G):
    return (G, O, I) if fusion == "none" else (O, I)


@pytest.mark.parametrize("layout", ["ragged", "one_group", "all_empty", "past_32_groups"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize(
    "eta_dtype,mu_dtype,grad_dtype",
    [(F64, F64, F64), (F32, F32, F32), (BF16, BF16, F32), (F16, F32, BF16), (F32, F32, F64)],
)
def test_grouped_outer_backward_matches_float64_reference(gen, layout, fusion, eta_dtype, mu_dtype,
                                                          grad_dtype):
    # 37 groups of 0-4 tokens need two selection words (bit g % 32 of word g // 32).
    counts = (torch.randint(0, 5, (37,), generator=gen).tolist() if layout == "past_32_groups"
              else LAYOUTS[layout])
    offsets = offsets_from_counts(counts, torch.int64 if layout == "ragged" else torch.int32)
    T, G = sum(counts), len(counts)
    eta, mu = small_integers((T, O), gen, eta_dtype), small_integers((T, I), gen, mu_dtype)
    grad = randn(outer_grad_shape(fusion, G), gen, grad_dtype)
    alpha = 0.37
    d_eta, d_mu = ops._grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha)
    assert (d_eta.dtype, d_eta.shape) == (eta_dtype, eta.shape)
    assert (d_mu.dtype, d_mu.shape) == (mu_dtype, mu.shape)
    fp64 = F64 in (eta_dtype, mu_dtype, grad_dtype)
    for out, ref, width in zip((d_eta, d_mu), outer_backward_f64(grad, eta, mu, offsets, fusion, alpha),
                               (I, O)):
        # Each entry sums `width` products of |value| <= 3·|grad|·alpha (accumulated in fp64 or
        # fp32), then rounds to out's dtype.
        bound = 3 * alpha * grad.double().abs().max() * width
        atol = bound * (1e-13 if fp64 else 4e-6)
        rtol = {F64: 1e-13, F32: 2 ** -23, BF16: 2 ** -8, F16: 2 ** -11}[out.dtype]
        err = (out.double() - ref).abs()
        assert bool((err <= atol + rtol * ref.abs()).all()), f"max error {err.max()}"


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_grouped_outer_backward_ties_give_the_gradient_to_the_first_group(gen, dtype):
    """Group 1 copies group 0 and group 2 negates it (exact ties in |S|): max sends the gradient
    to group 0 alone; sss/ssm select by sign (P on P = −N), as the reference."""
    c = 70
    eta0, mu0 = randn((c, O), gen, dtype), randn((c, I), gen, dtype)
    eta, mu = torch.cat([eta0, eta0, -eta0]), torch.cat([mu0, mu0, mu0])
    offsets = offsets_from_counts([0, c, c, c, 0])
    grad = randn((O, I), gen)
    for fusion in ("max", "sss", "ssm"):
        d_eta, d_mu = ops._grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5)
        for out, ref in zip((d_eta, d_mu), outer_backward_f64(grad, eta, mu, offsets, fusion, 0.5)):
            # bf16: the fp32 result and the fp64 one may round to neighbouring bf16 values.
            rtol = 2 ** -7 if dtype == BF16 else 1e-5
            torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=rtol, atol=1e-4)
        if fusion == "max":
            assert not d_eta[c:].any() and not d_mu[c:].any()


def test_grouped_outer_backward_gaussian_float64_and_strided(gen):
    """Continuous values (no ties to speak of) through non-contiguous inputs, and empty sides."""
    counts = [0, 150, 3, 0, 77, 1, 0]
    offsets = offsets_from_counts(counts)
    T = sum(counts)
    eta, mu = randn((O, T), gen, F64).T, randn((I, T), gen, F64).T
    for fusion in FUSIONS:
        grad = randn(outer_grad_shape(fusion, len(counts)), gen, F64).transpose(-1, -2).contiguous().transpose(-1, -2)
        got = ops._grouped_outer_backward(grad, eta, mu, offsets, fusion, -1.5)
        for out, ref in zip(got, outer_backward_f64(grad, eta, mu, offsets, fusion, -1.5)):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for o, i in ((0, 5), (4, 0)):
        e, m = randn((9, o), gen), randn((9, i), gen)
        d_e, d_m = ops._grouped_outer_backward(randn((o, i), gen), e, m, offsets_from_counts([4, 5]), "sss", 1.0)
        assert d_e.shape == (9, o) and d_m.shape == (9, i) and not d_m.any()


def one_hot_rows(T, n, gen, dtype=F32):
    """T rows, each a single 1 at a random column: every product sum with them is exact."""
    return torch.nn.functional.one_hot(torch.randint(0, n, (T,), generator=gen), n).to(dtype)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_grouped_outer_backward_scales_by_alpha_rounded_to_fp32(gen, fusion):
    """With one-hot eta and mu rows, each d_eta / d_mu entry is one entry of the scaled gradient
    (grad · alpha, / G for ssm), with no rounding of its own: the fp32 kernel is bit-identical to
    the reference on the same inputs, which multiplies the fp32 gradient by alpha rounded to fp32.
    The tolerance tests above cannot see the last bit of that product (grad · alpha in float64,
    rounded once to fp32, passed them all)."""
    counts = [0, 90, 3, 0, 70, 1]
    offsets = offsets_from_counts(counts)
    T, G = sum(counts), len(counts)
    eta, mu = one_hot_rows(T, O, gen), one_hot_rows(T, I, gen)
    grad = randn(outer_grad_shape(fusion, G), gen)
    alpha = 0.37  # not an fp32 value
    got = ops._grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha)
    for out, ref in zip(got, R.grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha)):
        assert_bits_equal(out, ref)


# The *_ERRORS tables: each case's message starts with the argument it names (or, for keep and
# threshold together, the words that name both), matched as ^name: a bare match=name also found
# "mu" in "must" and "u" in "v must", so a message from another argument's check passed.
GROUPED_OUTER_BACKWARD_ERRORS = {
    "grad int": (lambda g, e, m, o: (g.int(), e, m, o, "sss", 1.0), "grad"),
    "grad shape": (lambda g, e, m, o: (g.T, e, m, o, "sss", 1.0), "grad"),
    "grad 2-D for none": (lambda g, e, m, o: (g, e, m, o, "none", 1.0), "grad"),
    "eta 1-D": (lambda g, e, m, o: (g, e[0], m, o, "sss", 1.0), "eta"),
    "offsets[-1] != T": (lambda g, e, m, o: (g, e, m, torch.tensor([0, 4, 9]), "max", 1.0), "offsets"),
    "unknown fusion": (lambda g, e, m, o: (g, e, m, o, "mean", 1.0), "fusion"),
}


@pytest.mark.parametrize("case", list(GROUPED_OUTER_BACKWARD_ERRORS))
def test_grouped_outer_backward_rejects_bad_input(case):
    make, name = GROUPED_OUTER_BACKWARD_ERRORS[case]
    eta, mu, offsets = _token_inputs()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops._grouped_outer_backward(*make(torch.randn(6, 5), eta, mu, offsets))


# --------------------------------------------------------------------------- grouped_lowrank


def lowrank_inputs(gen, counts, d, r, dtype, optional):
    """h, offsets, u, v, bias and the optional scale / shift / gain named in `optional`."""
    T, G = sum(counts), len(counts)
    tensors = dict(h=randn((T, d), gen, dtype), u=randn((G, d, r), gen, dtype) * 0.3,
                   v=randn((G, r, d), gen, dtype) * 0.3, bias=randn((G, d), gen, dtype))
    for name in ("scale", "shift"):
        tensors[name] = randn((G, d), gen, dtype) if name in optional else None
    tensors["gain"] = randn((T, d), gen, dtype) if "gain" in optional else None
    t = tensors
    return (t["h"], offsets_from_counts(counts, torch.int64), t["u"], t["v"], t["bias"], t["scale"],
            t["shift"], t["gain"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16])
@pytest.mark.parametrize("optional", [(), ("scale",), ("shift",), ("scale", "shift", "gain")])
def test_grouped_lowrank_is_bit_identical_to_reference(gen, layout, dtype, optional):
    """Same torch GEMMs, the epilogue in the reference's order: every bit equal, and within fp32
    rounding of the float64 reference."""
    args = lowrank_inputs(gen, LAYOUTS[layout], 70, 13, dtype, optional)
    out = ops.grouped_lowrank(*args)
    ref = R.grouped_lowrank(*args)
    assert out.dtype == (F64 if dtype == F64 else F32) and out.shape == args[0].shape
    assert_bits_equal(out, ref)
    ref64 = R.grouped_lowrank(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                for a in args))
    torch.testing.assert_close(out.double(), ref64, rtol=1e-12 if dtype == F64 else 1e-5,
                               atol=1e-12 if dtype == F64 else 1e-4)


def test_grouped_lowrank_mixed_dtypes_strided_h_and_nan(gen):
    h, offsets, u, v, bias, scale, shift, gain = lowrank_inputs(gen, [4, 0, 9], 70, 13, F32, ("scale",))
    h_strided = randn((70, 13), gen).T  # (13, 70), not contiguous
    for args in ((h_strided, offsets, u, v, bias, scale, None, None),
                 (h.to(BF16), offsets, u, v.double(), bias, scale, None, None)):
        assert_bits_equal(ops.grouped_lowrank(*args), R.grouped_lowrank(*args))
    h_nan = h.clone()
    h_nan[2, 5] = float("nan")
    out = ops.grouped_lowrank(h_nan, offsets, u, v, bias, scale, None, None)
    assert_bits_equal(out, R.grouped_lowrank(h_nan, offsets, u, v, bias, scale, None, None))
    assert out[2].isnan().any()


@pytest.mark.parametrize("dtype", [F64, F32])
def test_grouped_lowrank_is_bit_identical_with_u_stored_transposed(gen, dtype):
    """u as a transposed view (u = w.transpose(1, 2)) makes each u_gᵀ a contiguous GEMM operand;
    torch's GEMM then rounded one-token groups that start mid-output differently when the kernel
    wrote the product straight into those output rows (at::mm_out) than into a fresh tensor, as
    the reference's `@` does: the last bits differed (found by the random-shape sweep)."""
    counts = [3, 1, 5, 1, 1, 2, 1, 7, 1]
    h, offsets, _, v, bias, scale, shift, gain = lowrank_inputs(gen, counts, 65, 16, dtype,
                                                                ("scale", "shift", "gain"))
    u = randn((len(counts), 16, 65), gen, dtype).transpose(1, 2)  # (G, d, r), u_gᵀ contiguous
    for args in ((h, offsets, u, v, bias, None, None, None), (h, offsets, u, v, bias, scale, shift, gain)):
        assert_bits_equal(ops.grouped_lowrank(*args), R.grouped_lowrank(*args))


LOWRANK_ARGS = ("h", "offsets", "u", "v", "bias", "scale", "shift", "gain")


@pytest.mark.parametrize("wide", ["h", "u", "v", "bias", "scale", "shift", "gain"])
def test_grouped_lowrank_computes_in_float64_when_any_input_is(gen, wide):
    """One float64 argument among fp32 ones (each in turn, the optional ones included) makes the
    output float64, bit for bit the reference's.  The test above widens only v, so a kernel that
    left one of the others out of the promotion passed it (and computed in fp32)."""
    args = list(lowrank_inputs(gen, [4, 0, 9], 70, 13, F32, ("scale", "shift", "gain")))
    k = LOWRANK_ARGS.index(wide)
    args[k] = args[k].double()
    out = ops.grouped_lowrank(*args)
    assert out.dtype == F64
    assert_bits_equal(out, R.grouped_lowrank(*args))


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_grouped_lowrank_signed_zeros_at_initialisation(gen, dtype):
    """MEND's initialisation (u = 0, bias = 0) makes every pre-activation exactly 0, and a negative
    scale turns it into -0, which the clamp keeps (torch's clamp and the reference give -0): an h
    entry of -0 then stays -0 in the output.  Random inputs never produce an exact zero, so the
    bit-identity tests above cannot tell a clamp that turns -0 into +0."""
    counts = [0, 5, 1, 0, 70, 3]
    h, offsets, u, v, bias, scale, _, _ = lowrank_inputs(gen, counts, 70, 13, dtype, ("scale",))
    u, bias = torch.zeros_like(u), torch.zeros_like(bias)
    scale = -(scale.abs() + 0.5)
    h[:, ::2] = -0.0
    out = ops.grouped_lowrank(h, offsets, u, v, bias, scale, None, None)
    ref = R.grouped_lowrank(h, offsets, u, v, bias, scale, None, None)
    assert torch.equal(out, h.to(out.dtype))
    assert bool(torch.signbit(ref[:, ::2]).all())
    assert_bits_equal(out, ref)


GROUPED_LOWRANK_ERRORS = {
    "h 1-D": (lambda a: (a[0][0], *a[1:]), "h"),
    "h int": (lambda a: (a[0].int(), *a[1:]), "h"),
    "offsets float": (lambda a: (a[0], a[1].float(), *a[2:]), "offsets"),
    "offsets[-1] != T": (lambda a: (a[0], torch.tensor([0, 4, 12]), *a[2:]), "offsets"),
    "offsets decreasing": (lambda a: (a[0], torch.tensor([0, 5, 4, 13]), *a[2:]), "offsets"),
    "u shape": (lambda a: (*a[:2], a[2][:, :3], *a[3:]), "u"),
    # u sets the rank r: a u of another rank makes v's shape the wrong one
    "u rank != v rank": (lambda a: (*a[:2], a[2][:, :, :3], *a[3:]), "v"),
    "v shape": (lambda a: (*a[:3], a[3][:, :3], *a[4:]), "v"),
    "bias shape": (lambda a: (*a[:4], a[4][:1], *a[5:]), "bias"),
    # (d, G): as many entries as (G, d), which a check of numel alone let through
    "bias transposed": (lambda a: (*a[:4], a[4].T, *a[5:]), "bias"),
    "scale shape": (lambda a: (*a[:5], a[4].T, *a[6:]), "scale"),
    # (G, d) transposed has as many entries: unchecked, it was read as the wrong values
    "shift shape": (lambda a: (*a[:6], a[4].T, a[7]), "shift"),
    "gain shape": (lambda a: (*a[:7], a[0][:3]), "gain"),
}


@pytest.mark.parametrize("case", list(GROUPED_LOWRANK_ERRORS))
def test_grouped_lowrank_rejects_bad_input(gen, case):
    """The ValueError's message starts with the argument's name.  A bare match=name let any message
    through for "u" or "h" ("must", "shape"): the "u shape" case changed u's rank, which v's check
    refuses, so u's own check of d was never run, and a kernel without it passed."""
    make, name = GROUPED_LOWRANK_ERRORS[case]
    args = lowrank_inputs(gen, [4, 9], 7, 5, F32, ("scale", "shift", "gain"))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.grouped_lowrank(*make(args))


# --------------------------------------------------------------------------- segmented_fisher


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16])
@pytest.mark.parametrize("counts", [[0, 150, 3, 0, 77, 1, 0], [65], [0, 0]])
def test_segmented_fisher_matches_float64_reference(gen, dtype, counts):
    edit_offsets = offsets_from_counts(counts, torch.int64)
    T, E = sum(counts), len(counts)
    eta, mu = randn((T, O), gen, dtype), randn((T, I), gen, dtype)
    out = ops.segmented_fisher(eta, mu, edit_offsets)
    assert out.dtype == (F64 if dtype == F64 else F32) and out.shape == (O, I)
    ref = R.segmented_fisher(eta.double(), mu.double(), edit_offsets)
    # |error of S_e²| <= (2|S_e| + tol_e)·tol_e <= 3·B_e·tol_e with B_e = Σ_{t∈e} |η_t||μ_t|ᵀ
    tol = torch.zeros(O, I, dtype=F64)
    for s, e in zip(edit_offsets[:-1].tolist(), edit_offsets[1:].tolist()):
        b = eta[s:e].double().abs().T @ mu[s:e].double().abs()
        tol += 3 * b * b * (1e-12 if dtype == F64 else 2e-5)
    assert bool(((out.double() - ref).abs() <= tol / E + 1e-30).all())


# --------------------------------------------------------------------------- fisher_mask


def fisher_values(kind, n, gen, dtype):
    if kind == "ties":  # few distinct values: the keep threshold lands inside a block of ties
        return torch.randint(0, 7, (n,), generator=gen).to(dtype) * 0.25
    if kind == "signed_zeros":
        v = torch.tensor([-1.0, -0.0, 0.0, 2.0], dtype=F64)
        return v[torch.randint(0, 4, (n,), generator=gen)].to(dtype)
    if kind == "nan":
        f = torch.rand(n, generator=gen, dtype=F64).to(dtype)
        f[torch.randint(0, n, (n // 10,), generator=gen)] = float("nan")
        return f
    return torch.rand(n, generator=gen, dtype=F64).square().to(dtype)


@pytest.mark.parametrize("fisher_dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("kind", ["continuous", "ties", "signed_zeros", "nan"])
@pytest.mark.parametrize("keep", [1e-9, 0.05, 0.5, 0.999, 1.0])
def test_fisher_mask_keep_is_bit_identical_to_reference(gen, fisher_dtype, kind, keep, device):
    shape = (97, 131)
    fisher = fisher_values(kind, math.prod(shape), gen, fisher_dtype).reshape(shape)
    delta = randn(shape, gen)
    out, count = mask_on(device, delta, fisher, keep=keep)
    ref_out, ref_count = R.fisher_mask(delta, fisher, keep=keep)
    assert count.dtype == torch.int64 and count.dim() == 0
    assert int(count) == int(ref_count)
    assert_bits_equal(out, ref_out)  # includes +0.0 (not -0.0) for unkept negative deltas
    if kind == "ties" and keep == 0.5:
        assert int(count) > math.ceil(0.5 * fisher.numel())  # every tie at the threshold kept


@pytest.mark.parametrize("fisher_dtype", [F32, F16, BF16, F64])
def test_fisher_mask_ranks_nan_of_either_sign_above_everything(gen, fisher_dtype, device):
    """A NaN ranks above +inf whatever its sign bit, as in torch.kthvalue (the reference): x86's
    default NaN (0·inf, inf - inf, 0/0 in a Fisher estimate) has the sign bit set.  The NaNs of
    the "nan" kind above are all positive, and their keys sort above +inf even without the
    NaN case of the order key: a negative NaN then sorted below -inf and moved the threshold."""
    shape = (97, 131)
    fisher = fisher_values("nan", math.prod(shape), gen, fisher_dtype).reshape(shape)
    negative = fisher.isnan() & (torch.rand(shape, generator=gen) < 0.5)
    fisher.view(BITS[fisher_dtype])[negative] |= torch.iinfo(BITS[fisher_dtype]).min  # sign bit
    assert bool(torch.signbit(fisher[negative]).all()) and bool(negative.any())
    delta = randn(shape, gen)
    for keep in (0.03, 0.3, 0.8):  # the threshold among the NaNs (nothing kept), then below them
        out, count = mask_on(device, delta, fisher, keep=keep)
        ref_out, ref_count = R.fisher_mask(delta, fisher, keep=keep)
        assert int(count) == int(ref_count)
        assert_bits_equal(out, ref_out)


@pytest.mark.parametrize("fisher_dtype", [F32, F16, BF16, F64])
def test_fisher_mask_threshold_is_bit_identical_to_reference(gen, fisher_dtype, device):
    fisher = (torch.randint(0, 9, (300, 7), generator=gen) * 0.125).to(fisher_dtype)
    delta = randn((300, 7), gen, F64)
    # 0.375 is itself a Fisher value (strict >); 0.375 - 1e-4 rounds up to it in fp16 and bf16
    # (then nothing at 0.375 is kept), not in fp32; 1+2^-11+2^-40 rounds through fp32 for
    # fp16/bf16, as torch does.  (A NaN threshold is refused: FISHER_MASK_ERRORS.)
    for threshold in [0.375, 0.375 - 1e-4, 0.1, 1 + 2**-11 + 2**-40, -1.0, 1e6]:
        out, count = mask_on(device, delta, fisher, threshold=threshold)
        ref_out, ref_count = R.fisher_mask(delta, fisher, threshold=threshold)
        assert out.dtype == F64  # an fp64 delta stays fp64
        assert int(count) == int(ref_count)
        assert_bits_equal(out, ref_out)
    edge = torch.tensor([1.0009765625], dtype=F16)  # the fp16 double-rounding case
    _, c = mask_on(device, torch.ones(1), edge, threshold=1 + 2**-11 + 2**-40)
    assert int(c) == int((edge > 1 + 2**-11 + 2**-40).sum())


def test_fisher_mask_float64_threshold_is_not_rounded_to_fp32(gen, device):
    """A float64 Fisher array is compared with the threshold itself (fp16/bf16/fp32 ones with it
    rounded to fp32, then their dtype): fp64 values that lie between a threshold and its fp32
    rounding must be decided as the reference decides them.  The other threshold tests' Fisher
    values are multiples of 1/8, none between, so a kernel that rounded every threshold through
    fp32 passed them."""
    delta = randn((4000,), gen, F64)
    for threshold in (0.1, 1 / 3, 0.7, -2.2e-3):
        gap = abs(float(torch.tensor(threshold, dtype=F32)) - threshold)
        fisher = threshold + (torch.rand(4000, generator=gen, dtype=F64) - 0.5) * 4 * gap
        between = (fisher > min(threshold, threshold + gap)) & (fisher < max(threshold, threshold + gap))
        assert int(between.sum()) > 100
        out, count = mask_on(device, delta, fisher, threshold=threshold)
        ref_out, ref_count = R.fisher_mask(delta, fisher, threshold=threshold)
        assert int(count) == int(ref_count) == int((fisher > threshold).sum())
        assert_bits_equal(out, ref_out)


def test_fisher_mask_delta_dtypes_and_infinite_deltas(gen, device):
    fisher = torch.rand(64, 65, generator=gen)
    for dtype in (F16, BF16, F32):
        delta = randn((64, 65), gen, dtype)
        delta[0, :5] = float("inf")
        out, _ = mask_on(device, delta, fisher, keep=0.3)
        ref, _ = R.fisher_mask(delta, fisher, keep=0.3)
        assert out.dtype == F32
        assert_bits_equal(out, ref)  # an unkept inf gives +0 (a select), a kept one stays inf
        assert not bool(out.isnan().any())


@pytest.mark.parametrize("mode", [{"keep": 0.4}, {"threshold": 0.6}])
def test_fisher_mask_counts_kept_entries_not_nonzero_outputs(gen, mode, device):
    """The count is the number of kept Fisher entries, whatever delta holds there: a kept delta of
    ±0 counts, an unkept inf (which gives 0) does not.  Random deltas are never 0, so a count of
    the nonzero outputs matched the reference's in every other test."""
    shape = (64, 65)
    fisher = torch.rand(shape, generator=gen)
    delta = randn(shape, gen)
    zeros = torch.rand(shape, generator=gen) < 0.3
    delta[zeros] = 0.0
    delta[zeros & (torch.rand(shape, generator=gen) < 0.5)] = -0.0
    delta[~zeros & (torch.rand(shape, generator=gen) < 0.05)] = float("inf")
    out, count = mask_on(device, delta, fisher, **mode)
    ref_out, ref_count = R.fisher_mask(delta, fisher, **mode)
    assert int(count) == int(ref_count) == int(R.fisher_mask(torch.ones(shape), fisher, **mode)[1])
    assert_bits_equal(out, ref_out)


def test_fisher_mask_above_2_pow_24_entries(gen, device):
    n = 2**24 + 3
    # 2^20 distinct values: selection over many ties, beyond torch.quantile's limit
    fisher = torch.randint(0, 2**20, (n,), generator=gen).float()
    delta = torch.randn(n, generator=gen)
    for keep in (0.37, 1 / n):
        out, count = mask_on(device, delta, fisher, keep=keep)
        ref_out, ref_count = R.fisher_mask(delta, fisher, keep=keep)
        assert int(count) == int(ref_count) >= math.ceil(keep * n)
        assert torch.equal(out != 0, ref_out != 0)
        assert torch.equal(out, ref_out)


# --------------------------------------------------------------------------- apply_shift_


@pytest.mark.parametrize("weight_dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("mode", ["all", "keep", "threshold"])
def test_apply_shift_is_bit_identical_and_restorable(gen, weight_dtype, mode, device):
    shape = (300, 257)  # several parallel blocks
    weight = randn(shape, gen, weight_dtype)
    # Small shifts relative to the weight: the final rounding to bf16/fp16 decides most entries.
    delta = randn(shape, gen) * 1e-2
    fisher = torch.randint(0, 50, shape, generator=gen).float()
    kwargs = {"all": {}, "keep": {"fisher": fisher, "keep": 0.25},
              "threshold": {"fisher": fisher, "threshold": 30.0}}[mode]
    original = weight.clone()
    expected = weight.clone()
    alpha = 0.37
    previous = shift_on(device, weight, delta, alpha, **kwargs)
    R.apply_shift_(expected, delta, alpha, **kwargs)
    assert_bits_equal(weight, expected)
    assert not torch.equal(bits(weight), bits(original))
    assert_bits_equal(previous, original)
    weight.copy_(previous)
    assert_bits_equal(weight, original)


@pytest.mark.parametrize("weight_dtype", [F32, BF16])
def test_apply_shift_selects_the_kept_entries(gen, weight_dtype, device):
    """apply_shift_ leaves an unkept entry's bits as they were, as the reference's select does: an
    unkept inf stays out of the weight (inf·0 gave NaN there), and a -0 weight entry under an
    unkept positive delta stays -0 (adding alpha·(+0) made it +0).  The other tests' weights and
    deltas are finite and nonzero, where adding alpha·(delta·kept) gives the same bits: a kernel
    that multiplied by the kept flags passed them all."""
    shape = (64, 65)
    weight = randn(shape, gen, weight_dtype)
    weight[torch.rand(shape, generator=gen) < 0.3] = -0.0
    delta = randn(shape, gen)
    delta[torch.rand(shape, generator=gen) < 0.05] = float("inf")
    fisher = torch.rand(shape, generator=gen)
    original = weight.clone()
    expected = weight.clone()
    shift_on(device, weight, delta, 0.37, fisher, threshold=0.5)
    R.apply_shift_(expected, delta, 0.37, fisher, threshold=0.5)
    unkept = fisher <= 0.5
    assert bool((unkept & delta.isinf()).any()) and bool((unkept & (delta > 0) & torch.signbit(original)).any())
    assert_bits_equal(expected[unkept], original[unkept])
    assert_bits_equal(weight, expected)


@pytest.mark.parametrize("delta_dtype", [F64, BF16, F16])
def test_apply_shift_converts_delta_like_the_reference(gen, delta_dtype, device):
    weight = randn((33, 45), gen, BF16)
    delta = randn((33, 45), gen, delta_dtype)
    fisher = randn((33, 45), gen, F64)
    expected = weight.clone()
    shift_on(device, weight, delta, -2.5, fisher, keep=0.6)
    R.apply_shift_(expected, delta, -2.5, fisher, keep=0.6)
    assert_bits_equal(weight, expected)


def test_apply_shift_on_a_strided_weight(gen, device):
    base = randn((40, 30), gen).to(device)
    weight = base.T  # (30, 40) view, as a Conv1D weight seen as out×in would be
    original = weight.cpu().clone()  # .cpu() of a CPU tensor is itself
    delta = randn((30, 40), gen)
    expected = original.clone()
    previous = ops.apply_shift_(weight, delta.to(device), 0.5)
    R.apply_shift_(expected, delta, 0.5)
    assert_bits_equal(base.T.contiguous(), expected)  # written through the view
    assert_bits_equal(previous, original)
    # previous in weight's layout, as the reference's clone and the fake (torch.compile checks it)
    assert previous.stride() == weight.stride()
    empty = torch.empty(0, 3, device=device)
    assert ops.apply_shift_(empty, torch.empty(0, 3, device=device), 1.0).shape == (0, 3)


WEIGHT_VIEWS = {
    "rows": (slice(7, 37), slice(None)),  # rows of a fused projection: contiguous, at an offset
    # a block: neither contiguous nor dense, so its clone (and previous) is contiguous, not strided
    # like weight (the transposed weight of test_apply_shift_on_a_strided_weight is dense: its
    # clone keeps its strides, so that test cannot tell the two layouts apart)
    "block": (slice(3, 33), slice(10, 50)),
}


@pytest.mark.parametrize("view", list(WEIGHT_VIEWS))
def test_apply_shift_on_a_view_into_a_larger_weight(gen, view, device):
    """A weight that is a view into a larger tensor: the shift lands on the view's elements and
    nothing else, and `previous` holds their old values in the layout of the reference's
    weight.clone() (the fake's empty_like, which inductor asserts).  Every other test's weight
    starts at storage offset 0, so a kernel that wrote from the storage's start instead of the
    view's passed them all."""
    index = WEIGHT_VIEWS[view]
    base = randn((50, 64), gen).to(device)
    original_base = base.cpu().clone()  # .cpu() of a CPU tensor is itself
    weight = base[index]
    assert weight.storage_offset() > 0
    delta, fisher = randn(weight.shape, gen), torch.rand(weight.shape, generator=gen)
    expected = weight.cpu().clone()
    previous = ops.apply_shift_(weight, delta.to(device), 0.37, fisher.to(device), keep=0.5)
    R.apply_shift_(expected, delta, 0.37, fisher, keep=0.5)
    assert_bits_equal(base[index], expected)
    base = base.cpu()
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[index] = False
    assert_bits_equal(base[outside], original_base[outside])  # nothing else written
    assert_bits_equal(previous, original_base[index])
    assert previous.stride() == weight.clone().stride()


@pytest.mark.parametrize("shared", ["delta", "fisher", "both", "same_tensor"])
def test_apply_shift_reads_inputs_that_share_weights_memory_before_writing(gen, shared, device):
    # weight = buf[:n] and delta (or fisher) = buf[n/2 : n/2 + n]: the threads wrote weight while
    # another thread still had to read the shared half (1 thread happened to read it first).
    n = 1 << 18  # several parallel blocks per thread
    buf = randn((n + n // 2,), gen, F64).abs().float()
    expected_buf = buf.clone()

    def inputs(b):
        weight, shifted = b[:n], b[n // 2: n // 2 + n]
        own = {"delta": randn((n,), gen).to(b.device), "fisher": torch.rand(n, generator=gen).to(b.device)}
        if shared == "same_tensor":
            return weight, weight, weight
        delta = shifted if shared in ("delta", "both") else own["delta"]
        fisher = shifted if shared in ("fisher", "both") else own["fisher"]
        return weight, delta, fisher

    state = gen.get_state()
    buf = buf.to(device)
    weight, delta, fisher = inputs(buf)
    gen.set_state(state)
    ref_weight, ref_delta, ref_fisher = inputs(expected_buf)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        previous = ops.apply_shift_(weight, delta, -0.7, fisher, threshold=0.5)
    finally:
        torch.set_num_threads(threads)
    original = expected_buf[:n].clone()
    R.apply_shift_(ref_weight, ref_delta, -0.7, ref_fisher, threshold=0.5)
    assert_bits_equal(buf, expected_buf)
    assert_bits_equal(previous, original)


def test_tiled_results_do_not_depend_on_the_thread_count(gen):
    """The kernels that own their loops (grouped_outer's and segmented_fisher's tiles, fisher_mask's
    and apply_shift_'s fixed blocks and radix select) give the same bits on 1 and 3 threads, on
    shapes over several tiles and token chunks and a Fisher array of several select blocks."""
    eta, mu = randn((300, 150), gen), randn((300, 140), gen)
    offsets = offsets_from_counts([100, 0, 200])
    n = (1 << 18) + 3  # several radix-select blocks on 3 threads (n >> 16 per block)
    fisher, delta = torch.rand(n, generator=gen), randn((n,), gen)
    fisher[::5] = fisher[1]  # ties at the threshold
    weight = randn((n,), gen, BF16)

    def run():
        w = weight.clone()
        previous = ops.apply_shift_(w, delta, 0.3, fisher, keep=0.2)
        return (*(ops.grouped_outer(eta, mu, offsets, f, 1.0) for f in FUSIONS),
                ops.segmented_fisher(eta, mu, offsets),
                *ops.fisher_mask(delta, fisher, keep=0.2), w, previous)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run()
        torch.set_num_threads(3)
        parallel = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        if a.is_floating_point():
            assert_bits_equal(a, b)
        else:  # fisher_mask's count
            assert torch.equal(a, b)


def test_gemm_backed_results_follow_torch_on_any_thread_count(gen):
    """grouped_lowrank and grouped_outer's backward run torch's GEMMs (MKL here), whose last bits
    can change with the thread count at real layer widths (README, "Thread counts"): on each
    count they agree with the float64 reference to rounding, and grouped_lowrank stays bit-identical
    to the reference run on that count."""
    counts, o, i = [8, 0, 32], 96, 200
    eta, mu = randn((40, o), gen), randn((40, i), gen)
    offsets = offsets_from_counts(counts)
    grad = randn((o, i), gen)
    args = lowrank_inputs(gen, counts, o + i, 16, F32, ("scale", "shift", "gain"))
    wide = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    ref = R.grouped_lowrank(*wide)
    # "add" and "none": no selection, whose ties fp32 and float64 could break differently.
    grads = {"add": grad, "none": randn((len(counts), o, i), gen)}
    ref_back = {f: R.grouped_outer_backward(g.double(), eta.double(), mu.double(), offsets, f, 1.0)
                for f, g in grads.items()}
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = ops.grouped_lowrank(*args)
            assert_bits_equal(out, R.grouped_lowrank(*args))
            assert rel_err(out, ref) < 1e-6
            for f, g in grads.items():
                for got, want in zip(ops._grouped_outer_backward(g, eta, mu, offsets, f, 1.0), ref_back[f]):
                    assert rel_err(got, want) < 1e-6
    finally:
        torch.set_num_threads(threads)


def test_strided_offsets(gen):
    """offsets as a non-contiguous view (stride 2; any (G+1,) tensor may be): every C++ kernel that
    reads them gives what it gives for the contiguous copy, bit for bit."""
    counts = [0, 150, 3, 0, 77, 1, 0]
    offsets = offsets_from_counts(counts, torch.int64)
    s_offsets = offsets.repeat_interleave(2)[::2]  # its buffer: 0, 0, 0, 0, 150, 150, ...
    assert torch.equal(s_offsets, offsets) and not s_offsets.is_contiguous()
    T, G = sum(counts), len(counts)
    eta, mu = randn((T, O), gen), randn((T, I), gen)
    for fusion in FUSIONS:
        assert_bits_equal(ops.grouped_outer(eta, mu, s_offsets, fusion, 0.5),
                          ops.grouped_outer(eta, mu, offsets, fusion, 0.5))
        grad = randn(outer_grad_shape(fusion, G), gen)
        for a, b in zip(ops._grouped_outer_backward(grad, eta, mu, s_offsets, fusion, 0.5),
                        ops._grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5)):
            assert_bits_equal(a, b)
    assert_bits_equal(ops.segmented_fisher(eta, mu, s_offsets), ops.segmented_fisher(eta, mu, offsets))
    args = lowrank_inputs(gen, counts, 70, 13, F32, ("scale", "shift", "gain"))
    assert_bits_equal(ops.grouped_lowrank(args[0], s_offsets, *args[2:]), ops.grouped_lowrank(*args))


# --------------------------------------------------------------------------- sizes of 1


@pytest.mark.parametrize("dims", [(1, 1), (1, 130), (70, 1)])
@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_unit_sizes(gen, dims, dtype):
    """Every C++ kernel with dimensions of 1 (o, i; d, r) and one-token groups, against the
    float64 reference (grouped_lowrank and the masks bit for bit, as their other tests)."""
    o, i = dims
    counts = [1, 0, 1, 2, 0]
    offsets = offsets_from_counts(counts)
    T, G = sum(counts), len(counts)
    eta, mu = randn((T, o), gen, dtype), randn((T, i), gen, dtype)
    tol = 1e-12 if dtype == F64 else 1e-5
    for fusion in FUSIONS:
        out = ops.grouped_outer(eta, mu, offsets, fusion, 0.37)
        torch.testing.assert_close(out.double(), R.grouped_outer(eta.double(), mu.double(), offsets, fusion, 0.37),
                                   rtol=tol, atol=tol)
        grad = randn((G, o, i) if fusion == "none" else (o, i), gen, F32 if dtype != F64 else F64)
        got = ops._grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.37)
        for out, ref in zip(got, outer_backward_f64(grad, eta, mu, offsets, fusion, 0.37)):
            torch.testing.assert_close(out.double(), ref.to(out.dtype).double(),
                                       rtol=2 ** -7 if dtype == BF16 else tol, atol=tol)
    torch.testing.assert_close(ops.segmented_fisher(eta, mu, offsets).double(),
                               R.segmented_fisher(eta.double(), mu.double(), offsets), rtol=tol, atol=tol)
    args = lowrank_inputs(gen, counts, o, i, dtype, ("scale", "shift", "gain"))
    assert_bits_equal(ops.grouped_lowrank(*args), R.grouped_lowrank(*args))
    delta, fisher = randn((o, i), gen, dtype), torch.rand(o, i, generator=gen)
    for kwargs in (dict(keep=1e-9), dict(keep=1.0), dict(threshold=0.5)):
        got, count = ops.fisher_mask(delta, fisher, **kwargs)
        want, want_count = R.fisher_mask(delta, fisher, **kwargs)
        assert_bits_equal(got, want)
        assert int(count) == int(want_count)
    weight = randn((o, i), gen, dtype)
    expected = weight.clone()
    ops.apply_shift_(weight, delta, 0.5, fisher, keep=0.5)
    R.apply_shift_(expected, delta, 0.5, fisher, keep=0.5)
    assert_bits_equal(weight, expected)


# --------------------------------------------------------------------------- bad input


def _token_inputs():
    eta, mu = torch.randn(10, 6), torch.randn(10, 5)
    return eta, mu, torch.tensor([0, 4, 10], dtype=torch.int32)


GROUPED_OUTER_ERRORS = {
    "eta 1-D": (lambda e, m, o: (e[0], m, o, "add"), "eta"),
    "eta int": (lambda e, m, o: (e.int(), m, o, "add"), "eta"),
    "mu 3-D": (lambda e, m, o: (e, m[None], o, "add"), "mu"),
    # (without its own check, an int mu reached the packing: NotImplementedError from a dispatch)
    "mu int": (lambda e, m, o: (e, m.int(), o, "add"), "mu"),
    "mu rows != eta rows": (lambda e, m, o: (e, m[:9], o, "add"), "mu"),
    "offsets float": (lambda e, m, o: (e, m, o.float(), "add"), "offsets"),
    "offsets 2-D": (lambda e, m, o: (e, m, o[None], "add"), "offsets"),
    "offsets too short": (lambda e, m, o: (e, m, o[:1], "add"), "offsets"),
    # [0] over no tokens passes the checks of [0] and [-1]: only the length check refuses it
    "offsets [0], no tokens": (lambda e, m, o: (e[:0], m[:0], o[:1], "add"), "offsets"),
    "offsets[0] != 0": (lambda e, m, o: (e, m, torch.tensor([1, 4, 10]), "add"), "offsets"),
    "offsets[-1] != T": (lambda e, m, o: (e, m, torch.tensor([0, 4, 9]), "add"), "offsets"),
    "offsets decreasing": (lambda e, m, o: (e, m, torch.tensor([0, 6, 4, 10]), "add"), "offsets"),
    # the last pair decreasing: group 0 would read rows 10 and 11 of a 10-row eta
    "offsets past T, then back": (lambda e, m, o: (e, m, torch.tensor([0, 12, 10]), "add"), "offsets"),
    "unknown fusion": (lambda e, m, o: (e, m, o, "mean"), "fusion"),
}


@pytest.mark.parametrize("case", list(GROUPED_OUTER_ERRORS))
def test_grouped_outer_and_segmented_fisher_reject_bad_input(case):
    make, name = GROUPED_OUTER_ERRORS[case]
    eta, mu, offsets = _token_inputs()
    args = make(eta, mu, offsets)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.grouped_outer(*args)
    if name != "fusion":
        expected = "edit_offsets" if name == "offsets" else name
        with pytest.raises(ValueError, match=expected):
            ops.segmented_fisher(*args[:3])
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _mask_inputs():
    return torch.randn(8, 9), torch.rand(8, 9)


FISHER_MASK_ERRORS = {
    "delta int": (lambda d, f: ((d.int(), f), {"keep": 0.5}), "delta"),
    "fisher int": (lambda d, f: ((d, f.int()), {"keep": 0.5}), "fisher"),
    "fisher shape": (lambda d, f: ((d, f[:7]), {"keep": 0.5}), "fisher"),
    # as many entries in another shape: a check of numel alone let it through
    "fisher transposed": (lambda d, f: ((d, f.T), {"keep": 0.5}), "fisher"),
    "keep and threshold": (lambda d, f: ((d, f), {"keep": 0.5, "threshold": 0.1}), "give exactly one of keep or threshold"),
    "neither": (lambda d, f: ((d, f), {}), "give exactly one of keep or threshold"),
    "keep 0": (lambda d, f: ((d, f), {"keep": 0.0}), "keep"),
    "keep > 1": (lambda d, f: ((d, f), {"keep": 1.5}), "keep"),
    "keep nan": (lambda d, f: ((d, f), {"keep": float("nan")}), "keep"),
    "threshold nan": (lambda d, f: ((d, f), {"threshold": float("nan")}), "threshold"),
}


@pytest.mark.parametrize("case", list(FISHER_MASK_ERRORS))
def test_fisher_mask_rejects_bad_input(case, device):
    make, name = FISHER_MASK_ERRORS[case]
    delta, fisher = (t.to(device) for t in _mask_inputs())
    args, kwargs = make(delta, fisher)
    before = [a.clone() for a in args]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.fisher_mask(*args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, args))


APPLY_SHIFT_ERRORS = {
    "weight int": (lambda w, d, f: ((w.int(), d), {}), "weight"),
    "weight expanded": (lambda w, d, f: ((w[:1].expand(6, 7), d), {}), "weight"),
    "delta int": (lambda w, d, f: ((w, d.int()), {}), "delta"),
    "delta shape": (lambda w, d, f: ((w, d.T), {}), "delta"),
    "fisher shape": (lambda w, d, f: ((w, d, 1.0, f[:, :5]), {"keep": 0.5}), "fisher"),
    # as many entries in another shape: a check of numel alone let it through
    "fisher transposed": (lambda w, d, f: ((w, d, 1.0, f.T), {"keep": 0.5}), "fisher"),
    "fisher int": (lambda w, d, f: ((w, d, 1.0, f.int()), {"keep": 0.5}), "fisher"),
    "keep and threshold": (lambda w, d, f: ((w, d, 1.0, f), {"keep": 0.5, "threshold": 0.1}), "give exactly one of keep or threshold"),
    "fisher without keep or threshold": (lambda w, d, f: ((w, d, 1.0, f), {}), "give exactly one of keep or threshold"),
    "keep 0": (lambda w, d, f: ((w, d, 1.0, f), {"keep": 0.0}), "keep"),
    "keep > 1": (lambda w, d, f: ((w, d, 1.0, f), {"keep": 1.01}), "keep"),
    "keep without fisher": (lambda w, d, f: ((w, d, 1.0, None), {"keep": 0.5}), "keep"),
    "threshold without fisher": (lambda w, d, f: ((w, d), {"threshold": 0.5}), "keep and threshold select"),
    "threshold nan": (lambda w, d, f: ((w, d, 1.0, f), {"threshold": float("nan")}), "threshold"),
}


@pytest.mark.parametrize("weight_dtype", [F32, BF16])
@pytest.mark.parametrize("case", list(APPLY_SHIFT_ERRORS))
def test_apply_shift_rejects_bad_input_and_leaves_weight_unchanged(case, weight_dtype, device):
    make, name = APPLY_SHIFT_ERRORS[case]
    weight = torch.randn(6, 7).to(weight_dtype).to(device)
    args, kwargs = make(weight, torch.randn(6, 7, device=device), torch.rand(6, 7, device=device))
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.apply_shift_(*args, **kwargs)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(bits(a) if a.is_floating_point() else a,
                           bits(b) if b.is_floating_point() else b)
               for a, b in zip(before, after))


# --------------------------------------------------------------------------- memory


_PEAK_SNIPPET = textwrap.dedent(
    """
    import sys, torch
    import dcedit_kernels._library
    from dcedit_kernels import reference as R

    def kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])

    which, G = sys.argv[1], int(sys.argv[2])
    o = i = 1024
    T = 2048
    cuts = torch.sort(torch.randint(0, T + 1, (G - 1,))).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([T])]).int()
    eta, mu = torch.randn(T, o), torch.randn(T, i)
    fn = torch.ops.dcedit.grouped_outer if which == "kernel" else R.grouped_outer
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = kib("VmRSS:")
    out = fn(eta, mu, offsets, "sss", 1.0)
    print(kib("VmHWM:") - before, out.numel() * out.element_size() // 1024)
    """
)


def _peak_increase_kib(which, G):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(library.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _PEAK_SNIPPET, which, str(G)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    increase, output = map(int, result.stdout.split())
    return increase, output


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_fused_grouped_outer_peak_memory_stays_near_the_output_size():
    """Peak RSS growth of "sss" at G=16, o=i=1024, T=2048 (ragged), measured in a fresh process."""
    increase, output = _peak_increase_kib("kernel", 16)
    assert increase < 2 * output, f"kernel peak grew {increase} KiB for a {output} KiB output"
    ref_small, _ = _peak_increase_kib("reference", 4)
    ref_large, _ = _peak_increase_kib("reference", 16)
    # The reference holds the (G, o, i) stack: its peak grows with G, the kernel's does not.
    assert ref_large > ref_small + 8 * output and ref_large > 8 * output, (ref_small, ref_large)


def _allocator_events(fn) -> list[int]:
    """The bytes of each CPU allocation (> 0) and free (< 0) during fn(), in time order, from the
    profiler's event tree: the allocator's own record, not RSS, which MKL's buffers and glibc's reuse blur."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    return [nbytes for _, nbytes in sorted(events)]


def _live_tensor_peak(fn) -> int:
    """The peak of fn()'s live CPU tensor bytes (`_allocator_events`)."""
    live = peak = 0
    for nbytes in _allocator_events(fn):
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("fusion", ["add", "max", "sss", "ssm"])
def test_python_fallbacks_of_the_fused_forms_hold_a_fixed_number_of_shifts(fusion):
    """SPEC: the fused forms never hold G o×i matrices.  Where no compiled kernel serves (no `_C`, a
    GPU Triton does not support, a double backward), grouped_outer's forward is the streaming
    reference and its backward the reference's: their peaks do not grow with G and stay within
    what their docstrings say (forward 3 / 5 / 6.25 o×i for add / sss, ssm / max; backward 1 /
    ~7 / ~10 beside its outputs; the backward's said "at most three" and the forward's an RSS
    reading of 2.6 MiB for a 1 MiB result, neither of which the allocator bears out)."""
    from dcedit_kernels.reference.grouped_outer import grouped_outer_streaming

    T, o, i = 256, 128, 192
    g = torch.Generator().manual_seed(0)
    eta, mu, grad = (torch.randn(shape, generator=g) for shape in ((T, o), (T, i), (o, i)))
    shift, outputs = o * i * 4, (T * o + T * i) * 4
    peaks = {}
    for G in (2, 32):
        offsets = torch.linspace(0, T, G + 1).round().to(torch.int32)
        peaks[G] = (_live_tensor_peak(lambda: grouped_outer_streaming(eta, mu, offsets, fusion, 0.5)) / shift,
                    (_live_tensor_peak(lambda: R.grouped_outer_backward(grad, eta, mu, offsets, fusion, 0.5))
                     - outputs) / shift)
    # A quarter o×i above the measured peaks, for the small tensors beside them (bounds, a scalar).
    forward_bound, backward_bound = {"add": (3.25, 1.25), "max": (6.5, 10.5)}.get(fusion, (5.25, 7.5))
    for G, (forward, backward) in peaks.items():
        assert forward <= forward_bound and backward <= backward_bound, (G, forward, backward)
        assert forward <= peaks[2][0] + 0.5 and backward <= peaks[2][1] + 0.5, peaks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_delta_linear_on_the_cpu_forms_no_shift(dtype):
    """The CPU path (the reference) never forms a group's o×i shift, forward or backward: its only
    tensors of o×i entries are the fp32 copy of a 16-bit weight, one per call and one per backward
    (the op's fp32 arithmetic: torch's CPU matmul gives 16-bit operands a 16-bit product only), as
    train_loss's docstring says; an fp32 weight is read as it is.  Allocations from the profiler's
    events, at a weight far larger than every other tensor of the call."""
    from dcedit_kernels import ops

    N, T, G, o, i = 12, 9, 3, 512, 384
    g = torch.Generator().manual_seed(0)
    rn = lambda *shape: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    x, mu_t, eta_t = (rn(*shape).requires_grad_() for shape in ((N, i), (T, i), (T, o)))
    weight, bias = rn(o, i), rn(o)
    offsets, row_group = torch.tensor([0, 3, 5, 9], dtype=torch.int32), torch.tensor([0, 1, 2, -1] * 3)
    alpha = torch.rand(G, generator=g).requires_grad_()
    out = []
    forward = _allocator_events(lambda: out.append(
        ops.lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha)))
    backward = _allocator_events(lambda: torch.autograd.grad(out[0], (x, mu_t, eta_t, alpha), torch.ones_like(out[0])))
    copies = [] if dtype == torch.float32 else [o * i * 4]  # the fp32 weight, never a shift
    for events in (forward, backward):
        assert [n for n in events if n >= o * i * min(2, weight.element_size())] == copies, events
