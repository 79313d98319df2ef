"""A linear layer seen through group g's shift, without forming it (SPEC lowrank_delta_linear).

    y_n = x_n Wᵀ + b + alpha_g · (x_n mu_tᵍᵀ) eta_tᵍ        (g = row_group[n]; −1: unedited)

The dense part is a torch matmul.  The shift term, and every GEMM-shaped term of the backward,
has one form: for query rows q of group g,

    out_q += alpha_g Σ_{s∈seg_g} (q · K_s) V_s

with (K, V) rows of group g contiguous (possibly through an index permutation): `grouped_bilinear_`
(grouped_bilinear.py, two launches: the scores alpha_g Q·K, then their product with V).  Nothing
o×i is ever formed.

Rows of x are not sorted by group, so the launcher sorts them on the device (stable argsort, no
host sync) and the kernels gather rows through the permutation and scatter their results back.

Backward (c_{n,s} = x_n · mu_t[s]):
    dx_n     = grad_n W + alpha_g Σ_s (grad_n · eta_t[s]) mu_t[s]      Q=grad, K=eta_t, V=mu_t
    deta_t[s] = alpha_g Σ_{n∈g} (mu_t[s] · x_n) grad_n                  Q=mu_t, K=x,     V=grad
    dmu_t[s]  = alpha_g Σ_{n∈g} (eta_t[s] · grad_n) x_n                 Q=eta_t, K=grad, V=x
    dalpha_g  = Σ_{s∈g} eta_t[s] · (deta_t[s] / alpha_g)
The last one is a torch reduction over the kernel's deta computed with alpha = 1.
"""

from __future__ import annotations

import torch

from .._checks import check_delta_linear_shapes, check_same_device, check_tensor, compute_dtype, launcher_offsets_groups
from ..reference.segments import group_ids
from .grouped_bilinear import grouped_bilinear_
from .launch import HALF, native_dot
from .segment_matmul import one_group, segment_matmul


def _check(x, weight, row_group, mu_t, eta_t, offsets, alpha, grad=None, bias=None):
    """Shapes, dtypes and devices (offset values and row_group range: the op layer, on the host)."""
    check_delta_linear_shapes(x, weight, bias, row_group, mu_t, eta_t)
    o = weight.shape[0]
    G = launcher_offsets_groups(offsets)
    check_tensor(alpha, "alpha")
    if alpha.numel() not in (1, G):
        raise ValueError(f"alpha must have 1 or G={G} entries, got shape {tuple(alpha.shape)}")
    if grad is not None:
        check_tensor(grad, "grad", 2)
        if tuple(grad.shape) != (x.shape[0], o):
            raise ValueError(f"grad must have shape {(x.shape[0], o)}, got {tuple(grad.shape)}")
    check_same_device(dict(x=x, weight=weight, bias=bias, row_group=row_group, mu_t=mu_t, eta_t=eta_t,
                           offsets=offsets, alpha=alpha, grad=grad))
    return G


def _sort_rows(row_group, G):
    """Stable device-side sort of rows by group: (perm, sorted groups int64, row offsets (G+1,)).

    Row offsets bound each group's rows in sorted order; rows of group −1 sort first and fall
    outside every [row_offsets[g], row_offsets[g+1]).
    """
    sorted_groups, perm = torch.sort(row_group.to(torch.int64), stable=True)
    bounds = torch.arange(G + 1, device=row_group.device, dtype=torch.int64)
    row_offsets = torch.searchsorted(sorted_groups, bounds)
    return perm, sorted_groups, row_offsets


def _alpha_per_group(alpha, G, acc):
    return alpha.detach().to(acc).reshape(-1).expand(G).contiguous()


def _dense(a, weight, transpose, acc, bias=None):
    """a Wᵀ + bias (transpose) or a W, in `acc`.

    Two 16-bit operands of one dtype go through segment_matmul with one group: tensor cores
    with an fp32 accumulator and fp32 output, which is the fp32 product of the same values up to
    summation order (16-bit products are exact in fp32).  Otherwise torch in `acc`, as the
    reference computes it (a half-precision torch matmul would round y before the shift term).
    """
    if acc == torch.float64 or a.dtype not in HALF or a.dtype != weight.dtype or not native_dot(a.dtype):
        y = a.to(acc) @ (weight.to(acc).T if transpose else weight.to(acc))
        return y if bias is None else y.add_(bias.to(acc))
    return segment_matmul(a, weight[None], one_group(a.shape[0], a.device), transpose_w=transpose,
                          bias=bias[None] if bias is not None else None)


def lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha):
    """y_n = x_n Wᵀ + b + alpha_g (x_n mu_tᵍᵀ) eta_tᵍ; rows with row_group −1 see the plain layer.

    x (N, i); weight (o, i); bias (o,) or None; row_group int (N,); mu_t (Tm, i), eta_t (Tm, o)
    grouped by offsets (G+1,); alpha (G,) or one entry.  Returns x's dtype (fp64 stays fp64);
    arithmetic in fp32 (fp64 when an input is fp64, bias included).
    """
    G = _check(x, weight, row_group, mu_t, eta_t, offsets, alpha, bias=bias)
    acc = compute_dtype(x, weight, bias, mu_t, eta_t, alpha)
    y = _dense(x, weight, True, acc, bias)
    perm, sorted_groups, _ = _sort_rows(row_group, G)
    # The kernel takes the inputs in their own dtypes (it casts tiles as `mma` needs them).
    grouped_bilinear_(y, x, perm, sorted_groups, mu_t, eta_t, None, offsets,
                       _alpha_per_group(alpha, G, acc), precision_from=(x.dtype, mu_t.dtype, eta_t.dtype))
    out_dtype = x.dtype if x.dtype != torch.float64 else acc
    return y.to(out_dtype)


def lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha):
    """(dx, dmu_t, deta_t, dalpha) of lowrank_delta_linear; weight and bias are frozen (no grad).

    Each gradient has its input's dtype and shape (a one-entry alpha gets the summed gradient).
    """
    check_tensor(grad, "grad", 2)  # required here (_check skips a None grad)
    G = _check(x, weight, row_group, mu_t, eta_t, offsets, alpha, grad=grad)
    acc = compute_dtype(grad, x, weight, mu_t, eta_t, alpha)
    grad, x, mu_t, eta_t = grad.contiguous(), x.contiguous(), mu_t.contiguous(), eta_t.contiguous()
    alpha_g = _alpha_per_group(alpha, G, acc)
    ones = torch.ones_like(alpha_g)
    perm, sorted_groups, row_offsets = _sort_rows(row_group, G)
    token_groups = group_ids(offsets, mu_t.shape[0])
    src = (grad.dtype, x.dtype, mu_t.dtype, eta_t.dtype)  # a 16-bit one: tensor cores (see grouped_bilinear_)

    dx = _dense(grad, weight, False, acc)
    grouped_bilinear_(dx, grad, perm, sorted_groups, eta_t, mu_t, None, offsets, alpha_g, precision_from=src)

    # deta without alpha first: dalpha_g = Σ_{s∈g} eta_t[s] · deta_unscaled[s].
    deta = torch.zeros(eta_t.shape, dtype=acc, device=x.device)
    grouped_bilinear_(deta, mu_t, None, token_groups, x, grad, perm, row_offsets, ones, precision_from=src)
    # A group no row uses gets zero gradients, as the reference skips it: its deta is exactly 0
    # here, but 0 · a non-finite eta_t entry or alpha_g is NaN (and a NaN dalpha_g makes alpha_g
    # NaN at the next optimizer step).
    used = row_offsets[1:] > row_offsets[:-1]
    dalpha = torch.zeros(G, dtype=acc, device=x.device).index_add_(0, token_groups, (eta_t.to(acc) * deta).sum(1))
    dalpha = torch.where(used, dalpha, 0.0)
    deta *= torch.where(used, alpha_g, 0.0)[token_groups][:, None]

    dmu = torch.zeros(mu_t.shape, dtype=acc, device=x.device)
    grouped_bilinear_(dmu, eta_t, None, token_groups, grad, x, perm, row_offsets, alpha_g, precision_from=src)

    if alpha.numel() == 1:  # one alpha shared by every group: its gradient is the sum
        dalpha = dalpha.sum()
    dalpha = dalpha.reshape(alpha.shape)
    return dx.to(x.dtype), dmu.to(mu_t.dtype), deta.to(eta_t.dtype), dalpha.to(alpha.dtype)
