"""dcedit::segmented_fisher: empirical Fisher of each weight entry over E edits."""

import torch

from .. import reference
from .._checks import check_offsets, check_same_device, check_tensor, compute_dtype
from .._library import _LIB
from ._dispatch import opcall, register, triton_launcher


@torch.library.register_fake("dcedit::segmented_fisher")
def _(eta, mu, edit_offsets):
    return eta.new_empty((eta.shape[1], mu.shape[1]), dtype=compute_dtype(eta, mu))


def check_segmented_fisher(eta, mu, edit_offsets):
    check_tensor(eta, "eta", 2)
    check_tensor(mu, "mu", 2)
    if eta.shape[0] != mu.shape[0]:
        raise ValueError(f"eta and mu must have the same number of tokens, got {eta.shape[0]} and {mu.shape[0]}")
    check_offsets(edit_offsets, "edit_offsets", eta.shape[0])
    check_same_device(dict(eta=eta, mu=mu, edit_offsets=edit_offsets))


register("segmented_fisher", reference.segmented_fisher, triton_launcher("segmented_fisher"),
         check=check_segmented_fisher)
# SPEC: not differentiable.  Autograd falls through to the kernel, so the output does not require
# grad (as torch's own non-differentiable ops) instead of taking torch's deprecated "no autograd
# kernel" fallback, which marks it requires_grad and warns, then yields no gradient on backward.
_LIB.impl("segmented_fisher", torch.library.fallthrough_kernel, "Autograd")


def segmented_fisher(eta, mu, edit_offsets) -> torch.Tensor:
    """``F = (1/E) Σ_e (Σ_{t∈e} η_t μ_tᵀ)²`` (o × i); never holds E per-edit gradients.

    eta (T, o), mu (T, i), edit_offsets int (E+1,) (one segment per edit; an empty edit counts in
    E, with a zero gradient).  Returns fp32 (fp64 for fp64 inputs).  Not differentiable: the
    result does not require grad.
    """
    check_segmented_fisher(eta, mu, edit_offsets)
    return opcall("segmented_fisher")(eta, mu, edit_offsets)
