"""dcedit::apply_shift_: add a (Fisher-masked) shift to a weight in place, undoably."""

import torch

from .. import reference
from .._checks import (
    check_alpha_within, check_finite_alpha, check_real_number, check_same_device, check_tensor, compute_dtype, tracing,
)
from .._library import _LIB
from ._dispatch import opcall, register
from .fisher_mask import check_fisher_mask


@torch.library.register_fake("dcedit::apply_shift_")
def _(weight, delta, alpha=1.0, fisher=None, keep=None, threshold=None):
    return torch.empty_like(weight)


def apply_shift_(weight, delta, alpha=1.0, fisher=None, keep=None, threshold=None) -> torch.Tensor:
    """In place ``weight += alpha · (delta ⊙ kept)`` in weight's dtype, fp32 arithmetic.

    float64 arithmetic for a float64 weight; for any other weight a float64 delta is rounded to
    fp32 first (the arithmetic follows the weight, not the delta).
    kept as in :func:`fisher_mask` (fisher with exactly one of keep or threshold, as its
    arguments; every entry when fisher is None, which takes neither); an entry not
    kept is left as it was, bit for bit, whatever delta or alpha holds there.  Returns the previous
    values of weight; ``undo_shift_(weight, previous)`` restores it bit for bit.  The sum is
    rounded to weight's dtype: in bf16/fp16 a shift entry below half the weight's resolution
    (bf16: |W|·2⁻⁹ to |W|·2⁻⁸) leaves its entry unchanged.  A NaN or infinite alpha, or one beyond
    the arithmetic's range (fp32's, float64's for a float64 weight), is refused (ValueError, nothing
    written): it wrote NaN or inf into every kept entry.
    """
    check_apply_shift(weight, delta, alpha, fisher, keep, threshold)
    check_finite_alpha(alpha)  # the wrapper's: the raw op takes any float, as its kernels do
    check_alpha_within(alpha, compute_dtype(weight))  # the arithmetic follows the weight, not delta
    with torch.no_grad():
        return opcall("apply_shift_")(
            weight, delta, float(alpha), fisher,
            None if keep is None else float(keep), None if threshold is None else float(threshold),
        )


def check_shiftable_weight(weight):
    """The checks of `weight` alone: a float tensor whose elements can each take their shift
    (also run by `GroupedEditor.apply_` before its forward, see `editors.grouped_edit.check_weight`)."""
    check_tensor(weight, "weight")
    if any(stride == 0 and size > 1 for stride, size in zip(weight.stride(), weight.shape)):
        # An expand()ed weight: its elements share memory, so they cannot each take their shift
        # (torch's in-place write refuses it too, with a RuntimeError).
        raise ValueError(f"weight must not have elements that share memory (an expanded view), got strides "
                         f"{tuple(weight.stride())} for shape {tuple(weight.shape)}")
    # torch refuses an in-place update of an inference tensor outside inference mode, and so did the
    # reference and undo_shift_'s copy_; the C++ kernel writes through the data pointer and did not, so
    # apply_shift_ changed such a weight that undo_shift_ then could not restore.  Not while
    # torch.compile traces: dynamo cannot trace is_inference() (a graph break it calls fundamental).
    if not tracing() and weight.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("weight must not be an inference tensor (created under torch.inference_mode()) outside "
                         "inference mode: it can be changed in place only inside torch.inference_mode()")


def check_apply_shift(weight, delta, alpha=1.0, fisher=None, keep=None, threshold=None):
    check_shiftable_weight(weight)
    check_tensor(delta, "delta")
    if delta.shape != weight.shape:
        raise ValueError(f"delta must have the shape of weight {tuple(weight.shape)}, got {tuple(delta.shape)}")
    check_real_number(alpha, "alpha")
    if fisher is not None:
        check_fisher_mask(delta, fisher, keep, threshold)
    elif keep is not None or threshold is not None:
        raise ValueError("keep and threshold need fisher")
    check_same_device(dict(weight=weight, delta=delta, fisher=fisher))


register("apply_shift_", reference.apply_shift_, check=check_apply_shift)


def check_not_differentiated(weight, delta):
    """ValueError when grad mode is on and weight or delta requires grad: apply_shift_ has no
    gradient formula, so autograd cannot record its write.  torch's own in-place ops refuse a leaf
    that requires grad under grad mode (RuntimeError "a leaf Variable that requires grad is being
    used in an in-place operation"); the raw op wrote such a leaf (an nn.Parameter) without a word,
    gave the previous values a grad_fn (torch's autograd fallback), and dropped the gradient of a
    delta that requires grad.  The wrapper runs the op under no_grad, which is what this asks of a
    raw call; under no_grad (or inside inference mode) every weight is shifted as before."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("weight", weight), ("delta", delta)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but dcedit::apply_shift_ is not differentiable and autograd "
                             "cannot record its in-place write: call it under torch.no_grad(), as "
                             "dcedit_kernels.ops.apply_shift_ does")


def _bump_version(weight, *args):
    """The in-place write counts as one for autograd: weight's version goes up, so a graph that
    saved the old weight refuses to backpropagate through it ("modified by an inplace operation"),
    as it does after torch's own in-place ops.  The C++ kernels write through the data pointer,
    which bumps nothing; this ADInplaceOrView kernel does it for every backend (under torch.compile
    the functionalised write may count twice).  Every call of non-inference tensors outside
    inference mode passes here, raw ones included, so the grad-mode check (`check_not_differentiated`)
    is here too, before anything is written.  (An inference tensor skips this key; it is refused
    outside inference mode by every kernel's own check, see `check_shiftable_weight`.)"""
    check_not_differentiated(weight, args[0] if args else None)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        previous = torch.ops.dcedit.apply_shift_.default(weight, *args)
    torch.autograd.graph.increment_version(weight)
    return previous


_LIB.impl("apply_shift_", _bump_version, "ADInplaceOrView")


def undo_shift_(weight, previous) -> torch.Tensor:
    """Restore a weight from what :func:`apply_shift_` returned (`previous`: same shape and
    dtype as weight; it may be on another device), bit for bit, in place; returns weight."""
    # Both named, as apply_shift_'s checks do, before .shape fails on a non-tensor.  An expanded
    # weight is refused as apply_shift_ refuses it (it was torch's RuntimeError from copy_).
    check_shiftable_weight(weight)
    check_tensor(previous, "previous")
    if previous.shape != weight.shape or previous.dtype != weight.dtype:
        raise ValueError("previous must be what apply_shift_ returned for this weight")
    # copy_ crosses devices (previous may be kept elsewhere), but a meta previous has no values to
    # restore: it was torch's NotImplementedError ("Cannot copy out of meta tensor; no data!").
    if previous.is_meta and not weight.is_meta:
        raise ValueError(f"previous must hold the values to restore, got a meta tensor for a weight on {weight.device}")
    return reference.undo_shift_(weight, previous)
