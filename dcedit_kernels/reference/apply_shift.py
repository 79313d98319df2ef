import torch

from .fisher_mask import fisher_mask


def apply_shift_(weight, delta, alpha=1.0, fisher=None, keep=None, threshold=None):
    """weight += alpha·(delta ⊙ kept) in weight's dtype with fp32 arithmetic (float64 for a
    float64 weight; a float64 delta on another weight is rounded to fp32 first).

    Returns the previous values of `weight`: copying them back undoes the edit bit for bit,
    which subtracting the shift cannot do once the sum has been rounded to bf16.
    """
    previous = weight.detach().clone()
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d = delta.to(acc)
    if fisher is not None:
        d, _ = fisher_mask(d, fisher, keep=keep, threshold=threshold)
        d = d.to(acc)
    with torch.no_grad():
        weight.copy_((weight.to(acc) + alpha * d).to(weight.dtype))
    return previous


def undo_shift_(weight, previous):
    with torch.no_grad():
        weight.copy_(previous)
    return weight
