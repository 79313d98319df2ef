import math

import torch

from .._checks import compute_dtype


# keep·n in floating point can land just above the integer it is in exact arithmetic (0.07·100 =
# 7.000000000000001, so a plain ceil kept 8 of 100 entries at keep=0.07; also 0.14, 0.28, 0.55 and
# 0.56 of 100): the product is shrunk by a relative 1e-15 first, a few times the ~2.2e-16 rounding
# of keep and of the product, so it falls back below that integer.  A product truly above an
# integer m stays above it when its excess is more than ~m·1e-15: for a keep of d decimals, when
# n·10^d < ~10^15 (a 1e-12 shrink, tried first, rounded 0.77092 of 59,485,337 entries down).  The
# C++ and CUDA kernels compute the same double.
KEEP_ROUNDING = 1 - 1e-15


def keep_count(keep, n):
    """k = ceil(keep·n) as in exact arithmetic (see KEEP_ROUNDING), clamped to [1, n]; n ≥ 1."""
    return min(max(math.ceil(keep * n * KEEP_ROUNDING), 1), n)


def fisher_threshold_for_keep(fisher, keep):
    """The k-th largest Fisher value, k = `keep_count(keep, n)`.  kthvalue handles n > 2**24."""
    flat = fisher.reshape(-1)
    n = flat.numel()
    return torch.kthvalue(flat, n - keep_count(keep, n) + 1).values


def kept_entries(fisher, keep=None, threshold=None):
    """The boolean mask of the kept entries; ties at the keep threshold are all kept."""
    if keep is not None:
        return fisher >= fisher_threshold_for_keep(fisher, keep)
    return fisher > threshold


def fisher_mask(delta, fisher, keep=None, threshold=None):
    """(delta ⊙ kept, kept count): delta where kept, else 0.  A select, not `delta * kept`: an
    unkept inf or NaN gives 0 (not inf·0 = NaN), so the mask's backward (this op on the gradient)
    passes nothing of a non-finite gradient to the entries it drops."""
    kept = kept_entries(fisher, keep, threshold)
    d = delta.to(compute_dtype(delta))
    # Contiguous, as the C++ kernels and the fake return it (a transposed delta kept its layout).
    out = torch.where(kept, d, d.new_zeros(())).contiguous()
    return out, kept.sum()
