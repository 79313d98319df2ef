"""Token-grouped GEMM: ``Y[t] = X[t] @ W[g(t)]ᵀ`` (or ``X[t] @ W[g(t)]``) for all groups at once.

Tokens are stored contiguously by group (CSR `offsets`).  Each program owns BLOCK_M rows of ONE
group (`_group_tile`: group g has cdiv(n_g, BLOCK_M) row tiles, numbered in group order), so
its K loop runs once and reads one W_g.  A program owning consecutive rows of several groups,
masked in turn, ran a K loop per group (125 groups of 24 rows at BLOCK_M 128: 141 loops against
125 now), and its shared accumulator gave the other groups' rows, loaded as 0, 0·inf = NaN
from a non-finite W_g.  The grid covers the most tiles any layout can need (`row_tiles`), so
nothing here synchronises with the host; a program past the last tile runs no K loop.

Optional fused prologue (X ⊙ gain) and epilogue (+ bias_g, ⊙ scale_g, + shift_g, clamp(min=0),
+ residual) make `grouped_lowrank` two launches.  An optional per-group mask on W (`select`, bit g
of an int32 word per entry) gives grouped_outer's backward its masked GEMMs from one shared W.

Also home of `mma`, the tile multiply-accumulate every kernel of this package uses (which dot
form it takes and the launch configs: launch.py).
"""

# No `from __future__ import annotations` in a module of @triton.jit kernels: triton 3.0's
# interpreter (torch 2.4) reads the string annotation "tl.constexpr" as no constexpr (tl.arange fails).
import torch
import triton
import triton.language as tl

from .._checks import check_same_device, check_tensor, compute_dtype, launcher_offsets_groups
from ..reference.segments import group_ids
from .launch import dot_path, dot_split, interpreting, native_dot, segment_matmul_tiles


# Whether kernels run on the interpreter, fixed at import like triton itself (TRITON_INTERPRET
# must be set before triton is imported): `_dot16` reads it as a compile-time constant.
_INTERPRET = tl.constexpr(interpreting())


@triton.jit
def _dot16(acc, a, b):
    """acc + a @ b for two 16-bit tiles of one dtype: tensor cores, exact products, fp32 acc.

    Under the interpreter the same exact products go through an IEEE fp32 dot, because the
    interpreter's bf16 tl.dot is silently wrong (triton 3.9): the tests then cover every branch
    of `mma` on the CPU except the tensor-core instruction itself.
    """
    if _INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _split_bf16x3(x, SPLIT: tl.constexpr):
    """fp32 x = hi + mid + lo, three bf16 tiles (each remainder is exact in fp32; bf16 has fp32's
    exponent range).  With all three pieces (SPLIT 3) hi is x truncated (round toward zero): its
    remainder holds x's last 16 significant bits, which mid (round to nearest) and lo hold
    exactly, so the split is exact for every normal x, and a finite x never rounds to hi = inf
    (round to nearest takes |x| above bf16's largest finite value, ~3.39e38, to inf on a GPU,
    whose product turns NaN).  With fewer pieces hi is rounded to nearest, the smaller error:
    2^-9 |x| for hi alone (what an eager bf16 model does to its intermediates, overflow
    included), ~2^-17 |x| for hi + mid (truncation: ~2^-16).  A remainder is taken as 0 where
    the piece already equals x: for x = ±inf, x − hi would be inf − inf = NaN and turn the
    product's ±inf into NaN (for finite x both give the same 0).  Truncating costs nothing
    measurable in the PTX (sm_90a, triton 3.6): hi takes 16 cvt.rz instead of 16 cvt.rn per
    thread per tile, with the same registers."""
    if SPLIT >= 3:
        hi = x.to(tl.bfloat16, fp_downcast_rounding="rtz")
    else:
        hi = x.to(tl.bfloat16)
    hi32 = hi.to(tl.float32)
    rest = tl.where(hi32 == x, 0.0, x - hi32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _finite_or_zero(x):
    """x with ±inf and NaN replaced by 0 (x − x is 0 exactly for finite x), for the dots of a
    split's mid and lo pieces: their entries are often exactly 0 and 0·inf = NaN would replace
    the ±inf that the hi dot already carries (a NaN there stays NaN through the hi dot).  The
    test runs in fp32: the interpreter's bf16 `inf − inf` gives 0 (triton 3.9)."""
    xf = x.to(tl.float32)
    return tl.where(xf - xf == 0.0, x, 0.0)


@triton.jit
def mma(acc, a, b, IS_FP64: tl.constexpr, NATIVE: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a @ b for tiles as loaded (any float dtype); acc is fp32, or fp64 with IS_FP64.

    fp64: a broadcast product and a sum rather than tl.dot: fp64 tl.dot is not available on
    every GPU/triton version, and this form is exact fp64 arithmetic everywhere.
    NATIVE (`launch.native_dot`, tensor cores; `launch.dot_path` names the forms):
      - "half": two 16-bit tiles of one dtype go to tl.dot as they are (products exact in the
        fp32 accumulator).
      - "bf16x3": an fp32 tile (an fp32 intermediate: gain ⊙ h, z, grouped_bilinear's scores)
        against a bf16 tile is split into three bf16 tiles (`_split_bf16x3`) and takes three
        bf16 dots: the split is exact (normal fp32) and so are the products, only the fp32
        accumulation rounds (tf32x3: ~2^-22 per product), in three bf16 passes where tf32x3
        takes three TF32 passes at half the bf16 rate (by the tensor-core rates: 2× faster; not
        yet timed).  fp16 is not split so: fp16 pieces of an fp32 value can overflow (65504) or
        lose its small part to fp16's range.  SPLIT (`launch.dot_split`; 3 by default) keeps
        fewer pieces, trading accuracy for passes:
        2 (hi + mid: up to ~2^-17 relative per product), 1 (hi: the fp32 tile rounded to bf16,
        2^-9, as an eager bf16 model rounds its intermediates).
      - "tf32x3": any other pair (fp32 with fp32 or with fp16, fp16 with bf16): three TF32
        passes that keep ~fp32 accuracy (~2^-22 relative per product); one TF32 pass with
        SPLIT 1 (fp32-only ops under torch's "high"/"medium" float32 matmul precision, as
        cuBLAS then does, or DCEDIT_TRITON_FP32_SPLIT=1).  Not one pass by default for 16-bit
        ops: it rounds the fp32 side to 10 mantissa bits (up to 2^-11 ≈ 5e-4), which the op
        tests' 1e-5 tolerance for 16-bit inputs rejects, and IEEE fp32 runs on the FMA units.
        triton splits tf32x3 itself, x − cvt.rna.tf32(x) for both tiles (its TTGIR, 3.6), so an
        infinite entry (or a finite one that rounds up past fp32's largest) turns the output
        entries it reaches NaN where the reference has ±inf: still non-finite, in the same
        entries, and the CPU tests cannot show it (the interpreter does one fp32 dot).
    Otherwise both tiles are cast to fp32 with input_precision="ieee" (exact products): the
    default TF32 would be off by ~1e-3 from the fp32 reference.
    """
    if IS_FP64:
        acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif NATIVE:
        if a.dtype == b.dtype:
            if a.dtype == tl.float32:
                if SPLIT >= 2:
                    acc = tl.dot(a, b, acc, input_precision="tf32x3")
                else:
                    acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = _dot16(acc, a, b)
        elif a.dtype == tl.float32 and b.dtype == tl.bfloat16:
            hi, mid, lo = _split_bf16x3(a, SPLIT)  # pieces SPLIT leaves out are dead code
            if SPLIT >= 2:
                b_fin = _finite_or_zero(b)
                if SPLIT >= 3:
                    acc = _dot16(acc, lo, b_fin)
                acc = _dot16(acc, mid, b_fin)
            acc = _dot16(acc, hi, b)
        elif a.dtype == tl.bfloat16 and b.dtype == tl.float32:
            hi, mid, lo = _split_bf16x3(b, SPLIT)
            if SPLIT >= 2:
                a_fin = _finite_or_zero(a)
                if SPLIT >= 3:
                    acc = _dot16(acc, a_fin, lo)
                acc = _dot16(acc, a_fin, mid)
            acc = _dot16(acc, a, hi)
        elif SPLIT >= 2:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _group_tile(offsets_ptr, G, BLOCK_M: tl.constexpr):
    """(g, first row, end row) of program pid(0)'s row tile: group g's tiles follow those of the
    groups before it.  A scan of G scalar pairs (G is the editor count, a few dozen at most);
    past the last tile, g = -1 and the row range is empty."""
    pid = tl.program_id(0)
    g = pid * 0 - 1
    row0 = (pid * 0).to(tl.int64)
    row_end = row0
    seen = pid * 0
    for h in range(0, G):
        start = tl.load(offsets_ptr + h).to(tl.int64)
        end = tl.load(offsets_ptr + h + 1).to(tl.int64)
        tiles = ((end - start + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
        hit = (pid >= seen) & (pid < seen + tiles)
        g = tl.where(hit, h, g)
        row0 = tl.where(hit, start + (pid - seen).to(tl.int64) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        seen += tiles
    return g, row0, row_end


@triton.jit
def _segment_matmul_kernel(
    x_ptr, w_ptr, offsets_ptr, gain_ptr, bias_ptr, scale_ptr, shift_ptr, residual_ptr, sel_ptr, y_ptr,
    G, N, K,
    stride_xt, stride_xk, stride_wg, stride_wn, stride_wk, stride_sw, stride_sn, stride_sk,
    HAS_GAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SELECT: tl.constexpr,
    IS_FP64: tl.constexpr, NATIVE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC = y_ptr.dtype.element_ty
    pid_n = tl.program_id(1)
    g, row0, row_end = _group_tile(offsets_ptr, G, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    k_end = tl.where(g >= 0, K, 0)  # no K loop past the last tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_mask = row_ok[:, None] & k_ok[None, :]
        # int64: a column-major x (stride_xk = T) puts ks · T past 2^31 - 1 at real sizes.
        a = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :].to(tl.int64) * stride_xk, mask=a_mask,
                    other=0.0)
        if HAS_GAIN:
            # gain ⊙ h in the accumulation dtype: exact for 16-bit inputs, and `mma` meets the
            # fp32 tile with bf16x3 (bf16 weights) or tf32x3.  Rounding it back to x's 16-bit
            # dtype for a single native pass would be cheaper but puts up to 2^-8 (bf16; fp16
            # 2^-11) of relative error on every product, which the SPEC's fp32 accumulation and
            # tests/test_ops.py's 1e-5 tolerance for 16-bit inputs on CUDA
            # (test_grouped_lowrank_matches_formula with gain) do not allow.
            gain = tl.load(gain_ptr + rows[:, None] * K + ks[None, :], mask=a_mask, other=0.0)
            a = a.to(ACC) * gain.to(ACC)
        b = tl.load(w_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_SELECT:
            # W_g = W where bit g of the entry's selection word is set, else 0: the mask is
            # rebuilt per group from one int32 tile instead of reading a G-deep stack of masked
            # copies.  A select, as the reference: an infinite entry off the selection gives 0,
            # not inf·0 = NaN.
            # The word's offset in int64: word · o·i passes 2^31 - 1 from word 10 on at o·i = 28672·8192.
            word = tl.load(sel_ptr + (g // 32).to(tl.int64) * stride_sw + ks[:, None] * stride_sk
                           + cols[None, :] * stride_sn,
                           mask=k_ok[:, None] & col_ok[None, :], other=0)
            b = tl.where(((word >> (g % 32)) & 1) != 0, b, 0.0)
        acc = mma(acc, a, b, IS_FP64, NATIVE, SPLIT)

    # Epilogue: the group's parameter rows, one (BLOCK_N,) vector each.  A program past the last
    # tile (g = -1) reads group 0's, in bounds, and stores nothing.
    out_mask = row_ok[:, None] & col_ok[None, :]
    param = tl.maximum(g, 0) * N + cols
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + param, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + param, mask=col_ok, other=1.0).to(ACC)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + param, mask=col_ok, other=0.0).to(ACC)[None, :]
    if RELU:
        # where, not tl.maximum: by default (propagate_nan=NONE) that turns a NaN into 0 (seen
        # under the interpreter), while the reference's clamp keeps it.
        acc = tl.where(acc < 0.0, 0.0, acc)
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + rows[:, None] * N + cols[None, :], mask=out_mask, other=0.0).to(ACC)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=out_mask)


def row_tiles(rows: int, G: int, block_m: int) -> int:
    """Programs along rows for `_group_tile`: Σ_g cdiv(n_g, block_m) < cdiv(rows, block_m) + G for
    any n_g summing to `rows` (each group adds at most one partly filled tile), so this bound
    needs no read of the offsets."""
    return triton.cdiv(rows, block_m) + G - 1


def one_group(rows: int, device) -> torch.Tensor:
    """Offsets [0, rows]: every row in one group, built on the device (no host-to-device copy)."""
    return torch.arange(2, device=device, dtype=torch.int64) * rows


def segment_matmul(x, w, offsets, transpose_w=True, gain=None, bias=None, scale=None, shift=None,
                   relu=False, residual=None, precision_from=(), select=None):
    """Y[t] = epilogue((X[t] ⊙ gain[t]) @ W[g(t)]ᵀ) for tokens grouped by `offsets`.

    x (T, k); offsets int (G+1,) (values are not checked here: the op layer does, on the host);
    w (G, n, k) with transpose_w=True, or (G, k, n) with transpose_w=False (Y = X W_g);
    gain (T, k); bias/scale/shift (G, n); residual (T, n); relu clamps at 0 before the residual.
    `select` int32 (ceil(G/32), n, k) (or (…, k, n) with transpose_w=False, laid out like w[g]):
    group g uses W_g ⊙ (bit g % 32 of word g // 32); w is then usually one matrix expanded to G.
    `precision_from`: dtypes of the op inputs that fp32 operands were computed from; a 16-bit one
    lets their dot use tensor cores (bf16x3 or tf32x3, see `mma`) as `launch.native_dot` allows.
    Returns (T, n) fp32 (fp64 when any input is fp64).
    """
    check_tensor(x, "x", 2)
    check_tensor(w, "w", 3)
    T, K = x.shape
    G = launcher_offsets_groups(offsets)
    if w.shape[0] != G:
        raise ValueError(f"w must have G={G} matrices, got shape {tuple(w.shape)}")
    N = w.shape[1] if transpose_w else w.shape[2]
    w_k = w.shape[2] if transpose_w else w.shape[1]
    if w_k != K:
        raise ValueError(f"w's inner dimension must match x's {K} features, got shape {tuple(w.shape)}")
    for name, t, shape in (("gain", gain, (T, K)), ("bias", bias, (G, N)), ("scale", scale, (G, N)),
                           ("shift", shift, (G, N)), ("residual", residual, (T, N))):
        if t is not None:
            check_tensor(t, name, 2)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if select is not None:
        words = (G + 31) // 32
        if not isinstance(select, torch.Tensor) or select.dtype != torch.int32 or select.dim() != 3:
            raise ValueError("select must be a 3-D int32 tensor")
        if select.shape[0] != words or select.shape[1:] != w.shape[1:]:
            raise ValueError(f"select must have shape {(words, *w.shape[1:])}, got {tuple(select.shape)}")
    check_same_device(dict(x=x, w=w, offsets=offsets, gain=gain, bias=bias, scale=scale, shift=shift,
                           residual=residual, select=select))

    acc = compute_dtype(x, w, gain, bias, scale, shift, residual)
    y = torch.empty((T, N), dtype=acc, device=x.device)
    if T == 0 or N == 0:
        return y
    if K == 0:
        # No product terms: only the epilogue.  Rare enough for a torch expression.
        gid = group_ids(offsets, T)
        z = torch.zeros((T, N), dtype=acc, device=x.device)
        if bias is not None:
            z = z + bias.to(acc)[gid]
        if scale is not None:
            z = z * scale.to(acc)[gid]
        if shift is not None:
            z = z + shift.to(acc)[gid]
        if relu:
            z = z.clamp(min=0)
        if residual is not None:
            z = z + residual.to(acc)
        return y.copy_(z)

    # The kernel reads these (and offsets[g], at offsets_ptr + g) as contiguous.
    contiguous = [t.contiguous() if t is not None else None for t in (offsets, gain, bias, scale, shift, residual)]
    offsets, gain, bias, scale, shift, residual = contiguous
    if transpose_w:
        stride_wn, stride_wk = w.stride(1), w.stride(2)
    else:
        stride_wk, stride_wn = w.stride(1), w.stride(2)
    sel_strides = (0, 0, 0)
    if select is not None:
        sw, s1, s2 = select.stride()
        sel_strides = (sw, s1, s2) if transpose_w else (sw, s2, s1)  # (word, n, k)
    fp64 = acc == torch.float64
    native = not fp64 and native_dot(x.dtype, w.dtype, *precision_from)
    a_dtype = acc if gain is not None else x.dtype  # gain ⊙ x reaches `mma` in fp32
    tiles = segment_matmul_tiles(T, G, N, K, dot_path(fp64, native, a_dtype, w.dtype))
    grid = (row_tiles(T, G, tiles["BLOCK_M"]), triton.cdiv(N, tiles["BLOCK_N"]))
    dummy = y  # never read when the matching HAS_* flag is off
    _segment_matmul_kernel[grid](
        x, w, offsets,
        gain if gain is not None else dummy,
        bias if bias is not None else dummy,
        scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        residual if residual is not None else dummy,
        select if select is not None else offsets,
        y,
        G, N, K,
        x.stride(0), x.stride(1), w.stride(0), stride_wn, stride_wk, *sel_strides,
        HAS_GAIN=gain is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, RELU=bool(relu), HAS_RESIDUAL=residual is not None,
        HAS_SELECT=select is not None,
        IS_FP64=fp64, NATIVE=native, SPLIT=dot_split(x.dtype, w.dtype, *precision_from), **tiles,
    )
    return y
