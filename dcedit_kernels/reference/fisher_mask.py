import math

import torch

from .._checks import compute_dtype


def fisher_threshold_for_keep(fisher, keep):
    """The k-th largest Fisher value, k = ceil(keep·n).  kthvalue handles n > 2**24."""
    flat = fisher.reshape(-1)
    n = flat.numel()
    k = min(max(math.ceil(keep * n), 1), n)
    return torch.kthvalue(flat, n - k + 1).values


def fisher_mask(delta, fisher, keep=None, threshold=None):
    """(delta ⊙ kept, kept count); ties at the keep threshold are all kept."""
    if keep is not None:
        kept = fisher >= fisher_threshold_for_keep(fisher, keep)
    else:
        kept = fisher > threshold
    out = delta.to(compute_dtype(delta)) * kept
    return out, kept.sum()
