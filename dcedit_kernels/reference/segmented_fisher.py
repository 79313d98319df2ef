import torch

from .._checks import compute_dtype
from .segments import segment_bounds


@torch.no_grad()
def segmented_fisher(eta, mu, edit_offsets):
    """F = (1/E) Σ_e (Σ_{t∈e} η_t μ_tᵀ)², one per-edit gradient at a time.

    Not differentiable (SPEC), on every backend: served under Autograd's fallthrough (no `_C`, or a
    GPU without Triton support), its torch ops would otherwise record a graph."""
    acc = compute_dtype(eta, mu)
    bounds = segment_bounds(edit_offsets)
    out = torch.zeros(eta.shape[1], mu.shape[1], dtype=acc, device=eta.device)
    for s, e in bounds:
        if s < e:
            out += (eta[s:e].to(acc).T @ mu[s:e].to(acc)).square()
    return out / max(len(bounds), 1)
