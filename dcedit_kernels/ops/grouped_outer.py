"""dcedit::grouped_outer: per-group rank-T shifts S_g = Σ η μᵀ, fused across groups."""

import torch

from .. import reference
from .._checks import (check_finite_alpha, check_grad, check_offsets, check_real_number, check_same_device, check_tensor,
                       compute_dtype)
from .._library import ignoring_autocast
from ..reference.grouped_outer import FUSIONS, grouped_outer_streaming
from ._dispatch import backward_op, opcall, register, triton_launcher

# No backward holds G o×i matrices: the reference recomputes one S_g at a time; the C++ (CPU) and
# Triton (CUDA) kernels recompute S_g's tiles once and keep one selection bit per group and entry.


@torch.library.register_fake("dcedit::grouped_outer")
def _(eta, mu, offsets, fusion="add", alpha=1.0):
    o, i = eta.shape[1], mu.shape[1]
    shape = (offsets.shape[0] - 1, o, i) if fusion == "none" else (o, i)
    return eta.new_empty(shape, dtype=compute_dtype(eta, mu))


@torch.library.register_fake("dcedit::_grouped_outer_backward")
def _(grad, eta, mu, offsets, fusion, alpha):
    # Contiguous whatever eta's and mu's layout, as every kernel (C++, Triton, reference) returns
    # them: inductor asserts that the real outputs have the fake's strides.
    return eta.new_empty(eta.shape), mu.new_empty(mu.shape)


def _setup_context(ctx, inputs, output):
    eta, mu, offsets, fusion, alpha = inputs
    ctx.save_for_backward(eta, mu, offsets)
    ctx.fusion, ctx.alpha = fusion, alpha


def _backward(ctx, grad):
    eta, mu, offsets = ctx.saved_tensors
    d_eta, d_mu = backward_op("grouped_outer", grad, eta, mu)(grad, eta, mu, offsets, ctx.fusion, ctx.alpha)
    return d_eta, d_mu, None, None, None


torch.library.register_autograd("dcedit::grouped_outer", ignoring_autocast(_backward),
                                setup_context=_setup_context)


def check_grouped_outer(eta, mu, offsets, fusion="add", alpha=1.0):
    check_tensor(eta, "eta", 2)
    check_tensor(mu, "mu", 2)
    if eta.shape[0] != mu.shape[0]:
        raise ValueError(f"eta and mu must have the same number of tokens, got {eta.shape[0]} and {mu.shape[0]}")
    check_offsets(offsets, "offsets", eta.shape[0])
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    check_real_number(alpha, "alpha")
    check_same_device(dict(eta=eta, mu=mu, offsets=offsets))


def check_grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha):
    """The forward's checks plus grad's: a raw call of the backward op gets them too (autograd's
    calls, through opcall, skip them: the forward checked the same tensors)."""
    check_grouped_outer(eta, mu, offsets, fusion, alpha)
    o, i = eta.shape[1], mu.shape[1]
    check_grad(grad, (offsets.shape[0] - 1, o, i) if fusion == "none" else (o, i), eta, "eta")


# Not the oracle reference.grouped_outer, which stacks all G shifts: the streaming form folds one at a time.
register("grouped_outer", grouped_outer_streaming, triton_launcher("grouped_outer"), check=check_grouped_outer)
register("_grouped_outer_backward", reference.grouped_outer_backward, triton_launcher("grouped_outer_backward"),
         check=check_grouped_outer_backward)


def grouped_outer(eta, mu, offsets, fusion="add", alpha=1.0) -> torch.Tensor:
    """Per-group shifts ``S_g = Σ_{t∈g} η_t μ_tᵀ`` (o × i), fused elementwise, times alpha.

    fusion: "none" (the (G, o, i) stack), "add", "max" (largest |S_g|, first on ties), "sss"
    (P = Σ max(S_g, 0), N = Σ min(S_g, 0); P where P ≥ −N else N) or "ssm" (sss / G).
    eta (T, o), mu (T, i), offsets int (G+1,).  Returns fp32 (fp64 for fp64 inputs).
    A NaN from η or μ propagates the same on every backend, as torch's own ops: a NaN S_g entry
    ranks above every number for max (the first NaN group wins, and gets the gradient) and makes
    P and N NaN.  A non-finite incoming gradient reaches the selected entries only: the
    backward selects (0 elsewhere, as torch's clamp and gather backwards), on every backend.
    alpha must be finite (ValueError: a NaN or inf alpha made every entry NaN or inf).
    """
    check_grouped_outer(eta, mu, offsets, fusion, alpha)
    check_finite_alpha(alpha)  # the wrapper's: the raw op and its backward take any float
    return opcall("grouped_outer")(eta, mu, offsets, fusion, float(alpha))
