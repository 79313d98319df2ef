"""A linear layer seen through group g's shift, without forming it (SPEC lowrank_delta_linear).

    y_n = x_n Wᵀ + b + alpha_g · (x_n mu_tᵍᵀ) eta_tᵍ        (g = row_group[n]; −1: unedited)

The dense part is a torch matmul.  The shift term, and every GEMM-shaped term of the backward,
has one form: for query rows q of group g,

    out_q += alpha_g Σ_{s∈seg_g} (q · K_s) V_s

with (K, V) rows of group g contiguous (possibly through an index permutation).  One Triton
kernel does it: a program owns a tile of (group-sorted) query rows × a tile of V's columns and
loops over the groups present in its rows and, inside, over the group's K/V rows in chunks:
c = Q_tile K_chunkᵀ, acc += alpha_g c V_chunk.  Nothing o×i is ever formed.

Rows of x are not sorted by group, so the launcher sorts them on the device (stable argsort, no
host sync) and the kernel gathers rows through the permutation and scatters its results back.

Backward (c_{n,s} = x_n · mu_t[s]):
    dx_n     = grad_n W + alpha_g Σ_s (grad_n · eta_t[s]) mu_t[s]      Q=grad, K=eta_t, V=mu_t
    deta_t[s] = alpha_g Σ_{n∈g} (mu_t[s] · x_n) grad_n                  Q=mu_t, K=x,     V=grad
    dmu_t[s]  = alpha_g Σ_{n∈g} (eta_t[s] · grad_n) x_n                 Q=eta_t, K=grad, V=x
    dalpha_g  = Σ_{s∈g} eta_t[s] · (deta_t[s] / alpha_g)
The last one is a torch reduction over the kernel's deta computed with alpha = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_delta_linear_shapes, check_same_device, check_tensor, compute_dtype
from ..reference.segments import group_ids
from .launch import dot_path, grouped_bilinear_tiles, native_dot
from .segment_matmul import mma, segment_matmul


@triton.jit
def _grouped_bilinear_kernel(
    q_ptr, q_index_ptr, q_group_ptr, k_ptr, v_ptr, kv_index_ptr, kv_offsets_ptr, alpha_ptr, out_ptr,
    NQ, DK, DV, G,
    HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr, IS_FP64: tl.constexpr,
    NATIVE_QK: tl.constexpr, NATIVE_PV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[q_index[p]] += alpha_g Σ_{s∈[kv_offsets[g], kv_offsets[g+1])} (Q_p·K_{kv(s)}) V_{kv(s)}.

    p runs over query positions sorted by q_group (q_group[p] = g, < 0 for rows left alone);
    Q (·, DK), K (·, DK), V (·, DV) and out (·, DV) are row-major contiguous.  alpha_g (Q·K)
    stays fp32: with NATIVE_PV its dot with a 16-bit V tile is tf32x3 (see `mma`; rounding it to
    V's dtype would cost accuracy, and fp16 could overflow: x·mu over thousands of features is
    not bounded by 65504).
    """
    ACC = out_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_ok = pos < NQ
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < DV
    if HAS_Q_INDEX:
        q_rows = tl.load(q_index_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    else:
        q_rows = pos.to(tl.int64)
    q_group = tl.load(q_group_ptr + pos, mask=pos_ok, other=-1)
    # Groups present in the tile; rows outside [0, G) are left unedited.
    g_first = tl.min(tl.where(q_group >= 0, q_group, 2147483647), axis=0)
    g_last = tl.max(tl.where(q_group < G, q_group, -1), axis=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for g in range(g_first, g_last + 1):
        in_g = q_group == g
        alpha_g = tl.load(alpha_ptr + g).to(ACC)
        kv_start = tl.load(kv_offsets_ptr + g)
        kv_end = tl.load(kv_offsets_ptr + g + 1)
        for s0 in range(kv_start, kv_end, BLOCK_T):
            s = s0 + tl.arange(0, BLOCK_T)
            s_ok = s < kv_end
            if HAS_KV_INDEX:
                kv_rows = tl.load(kv_index_ptr + s, mask=s_ok, other=0).to(tl.int64)
            else:
                kv_rows = s.to(tl.int64)
            c = tl.zeros((BLOCK_M, BLOCK_T), dtype=ACC)
            for k0 in range(0, DK, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < DK
                q = tl.load(q_ptr + q_rows[:, None] * DK + ks[None, :],
                            mask=in_g[:, None] & k_ok[None, :], other=0.0)
                kt = tl.load(k_ptr + kv_rows[None, :] * DK + ks[:, None],
                             mask=s_ok[None, :] & k_ok[:, None], other=0.0)
                c = mma(c, q, kt, IS_FP64, NATIVE_QK)
            vals = tl.load(v_ptr + kv_rows[:, None] * DV + cols[None, :],
                           mask=s_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(acc, c * alpha_g, vals, IS_FP64, NATIVE_PV)

    out_ptrs = out_ptr + q_rows[:, None] * DV + cols[None, :]
    out_mask = pos_ok[:, None] & col_ok[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc, mask=out_mask)


def _grouped_bilinear_(out, q, q_index, q_group, k, v, kv_index, kv_offsets, alpha):
    """In place: out[q_index[p]] += alpha_g Σ_{s∈g} (q_{q_index[p]} · k_s) v_s (see the kernel)."""
    NQ = q_group.shape[0]
    DK, DV = q.shape[1], v.shape[1]
    G = kv_offsets.shape[0] - 1
    if NQ == 0 or DV == 0:
        return out
    fp64 = out.dtype == torch.float64
    native_qk = not fp64 and native_dot(q.dtype, k.dtype)
    native_pv = not fp64 and native_dot(out.dtype, v.dtype)  # alpha_g (Q·K) is in out's dtype
    tiles = grouped_bilinear_tiles(NQ, G, DK, DV, dot_path(fp64, native_qk or native_pv, q.dtype, k.dtype))
    grid = (triton.cdiv(NQ, tiles["BLOCK_M"]), triton.cdiv(DV, tiles["BLOCK_N"]))
    _grouped_bilinear_kernel[grid](
        q.contiguous(), q_index if q_index is not None else q_group, q_group,
        k.contiguous(), v.contiguous(), kv_index if kv_index is not None else kv_offsets,
        kv_offsets, alpha, out,
        NQ, DK, DV, G,
        HAS_Q_INDEX=q_index is not None, HAS_KV_INDEX=kv_index is not None, IS_FP64=fp64,
        NATIVE_QK=native_qk, NATIVE_PV=native_pv, **tiles,
    )
    return out


def _check(x, weight, row_group, mu_t, eta_t, offsets, alpha, grad=None, bias=None):
    """Shapes, dtypes and devices (offset values and row_group range: the op layer, on the host)."""
    check_delta_linear_shapes(x, weight, bias, row_group, mu_t, eta_t)
    o = weight.shape[0]
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("offsets must be an int32 or int64 tensor")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D with G+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    G = offsets.shape[0] - 1
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
    if acc == torch.float64 or a.dtype != weight.dtype or not native_dot(a.dtype):
        y = a.to(acc) @ (weight.to(acc).T if transpose else weight.to(acc))
        return y if bias is None else y.add_(bias.to(acc))
    rows = a.shape[0]
    one_group = torch.arange(2, device=a.device, dtype=torch.int64) * rows  # [0, rows], no host copy
    return segment_matmul(a, weight[None], one_group, transpose_w=transpose,
                          bias=bias[None] if bias is not None else None,
                          row_groups=torch.zeros(rows, dtype=torch.int64, device=a.device))


def lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha):
    """y_n = x_n Wᵀ + b + alpha_g (x_n mu_tᵍᵀ) eta_tᵍ; rows with row_group −1 see the plain layer.

    x (N, i); weight (o, i); bias (o,) or None; row_group int (N,); mu_t (Tm, i), eta_t (Tm, o)
    grouped by offsets (G+1,); alpha (G,) or one entry.  Returns x's dtype (fp64 stays fp64);
    arithmetic in fp32 (fp64 when an input is fp64).
    """
    G = _check(x, weight, row_group, mu_t, eta_t, offsets, alpha, bias=bias)
    acc = compute_dtype(x, weight, mu_t, eta_t, alpha)
    y = _dense(x, weight, True, acc, bias)
    perm, sorted_groups, _ = _sort_rows(row_group, G)
    # The kernel takes the inputs in their own dtypes (it casts tiles as `mma` needs them).
    _grouped_bilinear_(y, x, perm, sorted_groups, mu_t, eta_t, None, offsets,
                       _alpha_per_group(alpha, G, acc))
    out_dtype = x.dtype if x.dtype != torch.float64 else acc
    return y.to(out_dtype)


def lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha):
    """(dx, dmu_t, deta_t, dalpha) of lowrank_delta_linear; weight and bias are frozen (no grad).

    Each gradient has its input's dtype and shape (a one-entry alpha gets the summed gradient).
    """
    G = _check(x, weight, row_group, mu_t, eta_t, offsets, alpha, grad=grad)
    acc = compute_dtype(grad, x, weight, mu_t, eta_t, alpha)
    grad, x, mu_t, eta_t = grad.contiguous(), x.contiguous(), mu_t.contiguous(), eta_t.contiguous()
    alpha_g = _alpha_per_group(alpha, G, acc)
    ones = torch.ones_like(alpha_g)
    perm, sorted_groups, row_offsets = _sort_rows(row_group, G)
    token_groups = group_ids(offsets, mu_t.shape[0])

    dx = _dense(grad, weight, False, acc)
    _grouped_bilinear_(dx, grad, perm, sorted_groups, eta_t, mu_t, None, offsets, alpha_g)

    # deta without alpha first: dalpha_g = Σ_{s∈g} eta_t[s] · deta_unscaled[s].
    deta = torch.zeros(eta_t.shape, dtype=acc, device=x.device)
    _grouped_bilinear_(deta, mu_t, None, token_groups, x, grad, perm, row_offsets, ones)
    dalpha = torch.zeros(G, dtype=acc, device=x.device).index_add_(0, token_groups, (eta_t.to(acc) * deta).sum(1))
    deta *= alpha_g[token_groups][:, None]

    dmu = torch.zeros(mu_t.shape, dtype=acc, device=x.device)
    _grouped_bilinear_(dmu, eta_t, None, token_groups, grad, x, perm, row_offsets, alpha_g)

    if alpha.numel() == 1:  # one alpha shared by every group: its gradient is the sum
        dalpha = dalpha.sum()
    dalpha = dalpha.reshape(alpha.shape)
    return dx.to(x.dtype), dmu.to(mu_t.dtype), deta.to(eta_t.dtype), dalpha.to(alpha.dtype)
