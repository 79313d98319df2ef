"""Gradients of grouped_outer: ``dη_t = dS_g μ_t``, ``dμ_t = dS_gᵀ η_t`` for t in group g.

dS_g is the output gradient (× alpha, / G for ssm) on the entries of S_g that reached the fused
output: all of them for "add", out[g] for "none", the winner's for "max", the entries of P's or
N's sign for "sss"/"ssm".  For the last three the selection pass of the forward kernel
(`launch_grouped_outer(select=True)`) recomputes the S_g tiles in registers and keeps one bit per
group and entry (one int32 o×i word per 32 groups); the two masked, row-grouped GEMMs then read
the one shared gradient and that word (`segment_matmul(select=)`).  Extra memory: the scaled
gradient and the words, two o×i matrices at G ≤ 32, where the reference holds P, N, S_g, the
mask and dS_g (five, plus an int64 winner map for "max").
"""

from __future__ import annotations

from .._checks import check_real_number, check_tensor, compute_dtype
from .grouped_outer import FUSION_MODES, check_outer_inputs, launch_grouped_outer
from .segment_matmul import one_group, segment_matmul


def grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha):
    """(d_eta, d_mu) of grouped_outer(eta, mu, offsets, fusion, alpha) for the output gradient
    `grad` ((o, i), or (G, o, i) for "none"), in eta's and mu's dtypes."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {tuple(FUSION_MODES)}, got {fusion!r}")
    check_tensor(grad, "grad", 3 if fusion == "none" else 2)
    check_outer_inputs(eta, mu, offsets, grad=grad)
    check_real_number(alpha, "alpha")  # float() below: a tensor would be a host read
    G, T = offsets.shape[0] - 1, eta.shape[0]
    O, I = eta.shape[1], mu.shape[1]
    shape = (G, O, I) if fusion == "none" else (O, I)
    if tuple(grad.shape) != shape:
        raise ValueError(f"grad must have shape {shape}, got {tuple(grad.shape)}")
    acc = compute_dtype(eta, mu, grad)
    scale = float(alpha) / G if fusion == "ssm" else float(alpha)
    g_out = (grad.to(acc) * scale).contiguous()
    src = tuple(t.dtype for t in (grad, eta, mu))
    select = None
    if fusion in ("max", "sss", "ssm"):
        select = launch_grouped_outer(eta, mu, offsets, FUSION_MODES[fusion], precision_from=src, select=True)
    if fusion == "add":
        # Every group's dS_g is g_out: all rows as one group, so no group ends in a partly
        # filled row tile of its own.
        offsets = one_group(T, eta.device)
        G = 1
    # One weight per group: "none" has its own, max/sss/ssm share g_out (a stride-0 view, no copy).
    w = g_out if fusion == "none" else g_out.expand(G, O, I)
    d_eta = segment_matmul(mu, w, offsets, transpose_w=True, precision_from=src, select=select)  # μ_t dS_gᵀ
    d_mu = segment_matmul(eta, w, offsets, transpose_w=False, precision_from=src, select=select)  # η_t dS_g
    return d_eta.to(eta.dtype), d_mu.to(mu.dtype)
