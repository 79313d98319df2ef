"""Grouped bilinear product, in place: out[q] += alpha_g Σ_{s∈seg_g} (Q_q · K_s) V_s.

The shift term of `lowrank_delta_linear` and every GEMM-shaped term of its backward have this
form (see there).  Query positions p are sorted by group (q_group[p] = g; < 0 leaves the row
alone) and gather their rows through q_index; the K/V rows of group g are
[kv_offsets[g], kv_offsets[g+1]), possibly through kv_index.  Nothing o×i is ever formed.

Each program owns query positions of ONE group (`segment_matmul._group_tile` over the positions'
group offsets, found on the device by `searchsorted`): a tile straddling groups would run each
group's loop over the tile, and in the second launch the other groups' rows, whose C is loaded
as 0, would pick up 0·inf = NaN from a non-finite V row.

Two launches:
    scores   C[p, j] = alpha_g Q_p · K_{kv_start_g + j}        (j < |seg_g|; fp32, fp64 for fp64)
    apply    out[q_index[p]] += Σ_j C[p, j] V_{kv_start_g + j}
A non-finite alpha_g (±inf, NaN) scales the sum instead, `apply` multiplying it by alpha_g (and the
scores by 1): inf·C summed over j of both signs was inf − inf = NaN where the reference,
alpha_g · Σ_j C V_j, gives ±inf.  A finite alpha_g stays in the scores and the sum is multiplied
by 1, exactly: the same bits as before.
Why not one kernel that keeps C in registers: a program can own only a tile of V's columns, so
every column tile recomputed Q·K.  At lowrank_delta_linear's benchmark shape (N 2048 rows,
i 1600 -> o 6400, 8 groups of 512 tokens, 128-column tiles) that was 50 × 3.4 GFLOP of Q·K for
13.4 GFLOP of (Q·K)·V in the forward, 12.5 × 13.4 for 3.4 in dx and dmu (DK 6400, DV 1600):
181 GFLOP per launch against 16.8 now (10.8× fewer; counted, not yet timed on a GPU).

C is (rows × W) with W the number of K/V rows, an upper bound on any group's length known
without a host sync (rows are processed in chunks that keep C within SCRATCH_ENTRIES); only
j < |seg_g| is written and read.  At the benchmark shape: 2048 × 4096 fp32 = 32 MiB, against
41 MiB for one fp32 o×i shift.
"""

# No `from __future__ import annotations` in a module of @triton.jit kernels: triton 3.0's
# interpreter (torch 2.4) reads the string annotation "tl.constexpr" as no constexpr (tl.arange fails).
import torch
import triton
import triton.language as tl

from .grouped_outer import GRID_YZ_MAX
from .launch import dot_path, dot_split, group_scores_tiles, grouped_bilinear_tiles, native_dot
from .segment_matmul import _group_tile, mma, row_tiles

# Largest scores buffer, in entries (128 MiB in fp32): rows are processed in chunks beyond it.
SCRATCH_ENTRIES = 1 << 25


@triton.jit
def _query_tile(q_index_ptr, q_offsets_ptr, kv_offsets_ptr, G, HAS_Q_INDEX: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Program pid(0)'s group g (-1 past the last tile), its sorted positions, whether each is
    in the group, their rows of q/out, and the group's K/V segment [kv_start, kv_end) (empty
    past the last tile: nothing runs or is stored)."""
    g, pos0, pos_end = _group_tile(q_offsets_ptr, G, BLOCK_M)
    pos = pos0 + tl.arange(0, BLOCK_M).to(tl.int64)
    pos_ok = pos < pos_end
    if HAS_Q_INDEX:
        q_rows = tl.load(q_index_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    else:
        q_rows = pos
    g_safe = tl.maximum(g, 0)
    # int64, whatever kv_offsets' dtype: kv_start + a column index would wrap past 2^31 - 1 in int32
    # (grouped_outer's token index did, test_grouped_outer_token_index_past_int32).
    kv_start = tl.load(kv_offsets_ptr + g_safe).to(tl.int64)
    kv_end = tl.where(g >= 0, tl.load(kv_offsets_ptr + g_safe + 1).to(tl.int64), kv_start)
    return g, pos, pos_ok, q_rows, kv_start, kv_end


@triton.jit
def _kv_rows(kv_index_ptr, s, s_ok, HAS_KV_INDEX: tl.constexpr):
    """Rows of K/V at segment positions s (through kv_index when given)."""
    if HAS_KV_INDEX:
        rows = tl.load(kv_index_ptr + s, mask=s_ok, other=0).to(tl.int64)
    else:
        rows = s.to(tl.int64)
    return rows


@triton.jit
def _group_scores_kernel(
    q_ptr, q_index_ptr, q_offsets_ptr, k_ptr, kv_index_ptr, kv_offsets_ptr, alpha_ptr, c_ptr,
    DK, W, G, J0,
    HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr, IS_FP64: tl.constexpr, NATIVE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[p, j] = alpha_g Q_{q_index[p]} · K_{kv(kv_offsets[g] + j)} for p in group g, j < |seg_g|.

    A program owns BLOCK_M sorted positions of one group × BLOCK_T segment-local columns, from
    column J0 + pid(1) · BLOCK_T (J0: the launch's first column, see `grouped_bilinear_`).
    """
    ACC = c_ptr.dtype.element_ty
    j0 = J0 + tl.program_id(1) * BLOCK_T
    g, pos, pos_ok, q_rows, kv_start, kv_end = _query_tile(q_index_ptr, q_offsets_ptr, kv_offsets_ptr, G,
                                                           HAS_Q_INDEX, BLOCK_M)
    j = j0 + tl.arange(0, BLOCK_T)
    if kv_start + j0 < kv_end:  # this column tile reaches into group g's segment
        s = kv_start + j
        s_ok = s < kv_end
        kv_rows = _kv_rows(kv_index_ptr, s, s_ok, HAS_KV_INDEX)
        c = tl.zeros((BLOCK_M, BLOCK_T), dtype=ACC)
        for k0 in range(0, DK, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < DK
            q = tl.load(q_ptr + q_rows[:, None] * DK + ks[None, :], mask=pos_ok[:, None] & k_ok[None, :], other=0.0)
            kt = tl.load(k_ptr + kv_rows[None, :] * DK + ks[:, None], mask=s_ok[None, :] & k_ok[:, None],
                         other=0.0)
            c = mma(c, q, kt, IS_FP64, NATIVE, SPLIT)
        c = c * tl.load(alpha_ptr + g).to(ACC)
        tl.store(c_ptr + pos[:, None] * W + j[None, :], c, mask=pos_ok[:, None] & s_ok[None, :])


@triton.jit
def _grouped_bilinear_kernel(
    c_ptr, q_index_ptr, q_offsets_ptr, v_ptr, kv_index_ptr, kv_offsets_ptr, scale_ptr, out_ptr,
    DV, W, G,
    HAS_Q_INDEX: tl.constexpr, HAS_KV_INDEX: tl.constexpr, IS_FP64: tl.constexpr, NATIVE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[q_index[p]] += scale_g Σ_{j<|seg_g|} C[p, j] V_{kv(kv_offsets[g] + j)} for p in group g.

    A program owns BLOCK_M sorted positions of one group × BLOCK_N columns of V and loops over
    the group's K/V rows in chunks of BLOCK_T.  C stays fp32: its dot with a bf16 V tile is
    bf16x3, with fp16 (or an fp32 V of a 16-bit op) tf32x3 (see `mma`; rounding C to V's dtype
    would cost accuracy, and fp16 could overflow: x·mu over thousands of features is not
    bounded by 65504).
    """
    ACC = out_ptr.dtype.element_ty
    g, pos, pos_ok, q_rows, kv_start, kv_end = _query_tile(q_index_ptr, q_offsets_ptr, kv_offsets_ptr, G,
                                                           HAS_Q_INDEX, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < DV

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for j0 in range(0, kv_end - kv_start, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        s = kv_start + j
        s_ok = s < kv_end
        kv_rows = _kv_rows(kv_index_ptr, s, s_ok, HAS_KV_INDEX)
        c = tl.load(c_ptr + pos[:, None] * W + j[None, :], mask=pos_ok[:, None] & s_ok[None, :], other=0.0)
        vals = tl.load(v_ptr + kv_rows[:, None] * DV + cols[None, :], mask=s_ok[:, None] & col_ok[None, :],
                       other=0.0)
        acc = mma(acc, c, vals, IS_FP64, NATIVE, SPLIT)
    # g −1 past the last tile: nothing is stored.  An empty segment adds 0, as the reference skips
    # it, not 0 · an infinite scale_g = NaN.
    scale = tl.load(scale_ptr + tl.maximum(g, 0)).to(ACC)
    acc = acc * tl.where(kv_end > kv_start, scale, 1.0).to(ACC)

    out_ptrs = out_ptr + q_rows[:, None] * DV + cols[None, :]
    out_mask = pos_ok[:, None] & col_ok[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc, mask=out_mask)


def grouped_bilinear_(out, q, q_index, q_group, k, v, kv_index, kv_offsets, alpha, precision_from=()):
    """In place: out[q_index[p]] += alpha[g] Σ_{s∈seg_g} (q_{q_index[p]} · k_s) v_s, g = q_group[p].

    out (rows, DV) fp32/fp64, q (rows, DK); q_index (NQ,) int64 or None (identity); q_group (NQ,)
    int64 sorted; k (·, DK), v (·, DV) with group g's rows [kv_offsets[g], kv_offsets[g+1]) of
    kv_index (or of k/v themselves when None); alpha (G,) in out's dtype.  Returns out.
    `precision_from`: the dtypes of the op inputs q, k and v come from, as in segment_matmul: a
    16-bit one lets both launches use tensor cores (`launch.native_dot`).  The scores C are an
    fp32 intermediate of q and k, so their dot with V also counts q's and k's dtypes: without
    them a bf16 layer's fp32 editor factors (grouped_lowrank returns fp32) took the IEEE fp32
    dot on the FMA units in lowrank_delta_linear's forward and dx.
    """
    NQ = q_group.shape[0]
    DK, DV = q.shape[1], v.shape[1]
    G = kv_offsets.shape[0] - 1
    W = kv_index.shape[0] if kv_index is not None else k.shape[0]
    if NQ == 0 or DV == 0 or W == 0:
        return out
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # The kernels index these 1-D tensors as contiguous (kv_offsets[g] at kv_offsets_ptr + g, …).
    q_group, kv_offsets, alpha = q_group.contiguous(), kv_offsets.contiguous(), alpha.contiguous()
    # A non-finite alpha_g scales the sum over V, not the scores (module docstring): 1 in the other place.
    finite = torch.isfinite(alpha)
    alpha, scale = torch.where(finite, alpha, 1.0), torch.where(finite, 1.0, alpha)
    q_index = q_index.contiguous() if q_index is not None else None
    kv_index = kv_index.contiguous() if kv_index is not None else None
    acc = out.dtype
    fp64 = acc == torch.float64
    native_qk = not fp64 and native_dot(q.dtype, k.dtype, *precision_from)
    pv_from = (v.dtype, q.dtype, k.dtype, *precision_from)  # C is in out's dtype, computed from q and k
    native_pv = not fp64 and native_dot(*pv_from)
    score_tiles = group_scores_tiles(NQ, G, W, DK, dot_path(fp64, native_qk, q.dtype, k.dtype))
    apply_tiles = grouped_bilinear_tiles(NQ, G, W, DV, dot_path(fp64, native_pv, acc, v.dtype))
    chunk = min(NQ, max(SCRATCH_ENTRIES // W, 128))  # at least 128 rows a launch
    scores = torch.empty((chunk, W), dtype=acc, device=out.device)
    kv_idx = kv_index if kv_index is not None else kv_offsets  # never read without HAS_KV_INDEX
    flags = dict(HAS_Q_INDEX=q_index is not None, HAS_KV_INDEX=kv_index is not None, IS_FP64=fp64)
    bounds = torch.arange(G + 1, dtype=q_group.dtype, device=q_group.device)
    for p0 in range(0, NQ, chunk):
        rows = min(chunk, NQ - p0)
        # The chunk's positions of each group, [q_offsets[g], q_offsets[g+1]): rows of group < 0
        # come before group 0's, those of group ≥ G after G − 1's, and no program owns them.
        q_offsets = torch.searchsorted(q_group[p0:p0 + rows], bounds)
        if q_index is not None:  # the chunk's rows are gathered from the whole q and out
            index, q_rows, out_rows = q_index[p0:p0 + rows], q, out
        else:  # query position p is row p of q: the chunk's rows start at p0 (index never read)
            index, q_rows, out_rows = q_offsets, q[p0:p0 + rows], out[p0:p0 + rows]
        # Segment-local columns along the grid's second axis, which CUDA caps at GRID_YZ_MAX: W is
        # only a bound on a group's length, so past GRID_YZ_MAX · BLOCK_T (a million K/V rows at
        # BLOCK_T 16) the columns take several launches, from column j0 each.
        span = GRID_YZ_MAX * score_tiles["BLOCK_T"]
        for j0 in range(0, W, span):
            grid = (row_tiles(rows, G, score_tiles["BLOCK_M"]), triton.cdiv(min(span, W - j0), score_tiles["BLOCK_T"]))
            _group_scores_kernel[grid](
                q_rows, index, q_offsets, k, kv_idx, kv_offsets, alpha, scores,
                DK, W, G, j0, NATIVE=native_qk, SPLIT=dot_split(q.dtype, k.dtype, *precision_from), **flags,
                **score_tiles,
            )
        grid = (row_tiles(rows, G, apply_tiles["BLOCK_M"]), triton.cdiv(DV, apply_tiles["BLOCK_N"]))
        _grouped_bilinear_kernel[grid](
            scores, index, q_offsets, v, kv_idx, kv_offsets, scale, out_rows,
            DV, W, G, NATIVE=native_pv, SPLIT=dot_split(*pv_from), **flags, **apply_tiles,
        )
    return out
