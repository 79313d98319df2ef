"""dcedit::fisher_mask: keep the shift entries with the highest Fisher information."""

import torch

from .. import reference
from .._checks import check_fraction_or_threshold, check_same_device, check_tensor, compute_dtype
from .._library import ignoring_autocast
from ._dispatch import in_reference_mode, opcall, register


@torch.library.register_fake("dcedit::fisher_mask")
def _(delta, fisher, keep=None, threshold=None):
    out = delta.new_empty(delta.shape, dtype=compute_dtype(delta))
    return out, delta.new_empty((), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    _, fisher, keep, threshold = inputs
    ctx.save_for_backward(fisher)
    ctx.keep, ctx.threshold = keep, threshold


def _backward(ctx, grad, _grad_count):
    (fisher,) = ctx.saved_tensors
    d_delta, _ = opcall("fisher_mask")(grad, fisher, ctx.keep, ctx.threshold)
    return d_delta, None, None, None


torch.library.register_autograd("dcedit::fisher_mask", ignoring_autocast(_backward),
                                setup_context=_setup_context)


def check_fisher_mask(delta, fisher, keep=None, threshold=None, delta_name="delta"):
    check_tensor(delta, delta_name)
    check_tensor(fisher, "fisher")
    if fisher.shape != delta.shape:
        raise ValueError(f"fisher must have the shape of {delta_name} {tuple(delta.shape)}, got {tuple(fisher.shape)}")
    if delta.numel() == 0:
        raise ValueError(f"{delta_name} must not be empty")
    # In reference_mode the wrapper calls the reference, traced inline: no kernel checks the values later.
    check_fraction_or_threshold(keep, threshold, values_when_tracing=in_reference_mode())
    check_same_device({delta_name: delta, "fisher": fisher})


register("fisher_mask", reference.fisher_mask, check=check_fisher_mask)


def fisher_mask(delta, fisher, keep=None, threshold=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta ⊙ kept, count kept)``: exactly one of keep (fraction in (0, 1]) or threshold.

    keep: k = ceil(keep·n) (as in exact arithmetic: keep=0.07 keeps 7 of 100 entries, see
    `dcedit_kernels.reference.keep_count`), t = the k-th largest Fisher value, kept = fisher ≥ t
    (every tie at t kept).  threshold: kept = fisher > threshold, compared as torch compares a
    tensor with a Python number: the threshold rounded to fisher's dtype first (a bf16 fisher
    entry 1.421875 is not kept at threshold 1.418, which rounds to it).  The count is a 0-dim int64
    tensor on delta's device (no host synchronisation).  Works for any n (no torch.quantile).
    The mask selects: an entry not kept is +0 whatever delta holds there (an inf or NaN too, not
    inf·0 = NaN), and the gradient reaches the kept entries only.
    """
    check_fisher_mask(delta, fisher, keep, threshold)
    return opcall("fisher_mask")(
        delta, fisher, None if keep is None else float(keep), None if threshold is None else float(threshold)
    )
