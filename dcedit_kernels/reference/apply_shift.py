import torch

from .fisher_mask import kept_entries


def apply_shift_(weight, delta, alpha=1.0, fisher=None, keep=None, threshold=None):
    """weight += alpha·(delta ⊙ kept) in weight's dtype with fp32 arithmetic (float64 for a
    float64 weight; a float64 delta on another weight is rounded to fp32 first).  Entries not kept
    are left as they were (bit for bit), whatever delta or alpha holds there.

    Returns the previous values of `weight`: copying them back undoes the edit bit for bit,
    which subtracting the shift cannot do once the sum has been rounded to bf16.
    """
    previous = weight.detach().clone()
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        shifted = (weight.to(acc) + alpha * delta.to(acc)).to(weight.dtype)
        if fisher is not None:
            # An entry the mask leaves out keeps its bits whatever delta and alpha hold there: adding
            # alpha·0 would write NaN for an unkept inf (or an infinite alpha) and turn -0 into +0.
            shifted = torch.where(kept_entries(fisher, keep, threshold), shifted, weight)
        weight.copy_(shifted)
    return previous


def undo_shift_(weight, previous):
    with torch.no_grad():
        weight.copy_(previous)
    return weight
