"""Per-group shifts ``S_g = Σ_{t∈g} η_t μ_tᵀ`` fused across groups in registers.

One program per (BLOCK_O × BLOCK_I) output tile loops over the groups and, inside, over the
group's tokens in masked chunks, so S_g's tile lives in registers only; the fusion (add, max,
sss/ssm) folds it into running tiles and the result is written once.  A fused mode therefore
never holds G o×i matrices, not even one.  "none" gives each group its own program (third grid
axis) and writes S_g's tile to out[g].

`segmented_fisher` shares this kernel through MODE_FISHER (Σ_e S_e², then / E): the loop is the
same, only the fold differs.  So does the backward of max/sss/ssm (grouped_outer_backward.py):
with SELECT the kernel writes, instead of the fused tile, which groups' entries reach the output,
as bits of int32 words (bit g % 32 of word g // 32; third grid axis: the word).
"""

# No `from __future__ import annotations` in a module of @triton.jit kernels: triton 3.0's
# interpreter (torch 2.4) reads the string annotation "tl.constexpr" as no constexpr (tl.arange fails).
import torch
import triton
import triton.language as tl

from .._checks import check_real_number, check_same_device, check_tensor, compute_dtype, launcher_offsets_groups
from .launch import dot_path, dot_split, grouped_outer_tiles, interpreting, native_dot
from .segment_matmul import mma

MODE_NONE, MODE_ADD, MODE_MAX, MODE_SSS, MODE_SSM, MODE_FISHER = range(6)
# CUDA's limit on a grid's second and third axes: "none" (one group per program along the third)
# launches at most this many groups at a time.
GRID_YZ_MAX = 65535
FUSION_MODES = {"none": MODE_NONE, "add": MODE_ADD, "max": MODE_MAX, "sss": MODE_SSS, "ssm": MODE_SSM}


def _triton_version() -> tuple:
    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2] if p.isdigit())


# Triton before 3.6 sets nvvm-reflect-ftz for all of libdevice, so `tl.math.div_rn` compiled to
# div.rn.ftz.f32 (seen with triton 3.4.0 and 3.5.1, the tritons of torch 2.8 and 2.9; 3.6.0 and 3.9
# give div.rn.f32): a subnormal quotient became 0.  There the kernel writes the PTX division itself
# (tests/test_triton_compile.py reads it).  Not under the interpreter, which runs no PTX and
# divides exactly, nor on ROCm (a torch built for HIP: its triton compiles for AMD GPUs, which
# `_dispatch.triton_runs_on` lets through): there the PTX aborted the compile, LLVM's "couldn't
# allocate output register for constraint 'f'" (triton 3.5.1 for gfx942, where div_rn compiled to
# the v_div_scale/v_div_fmas/v_div_fixup sequence).
_PTX_DIV = tl.constexpr(not interpreting() and torch.version.hip is None and _triton_version() < (3, 6))


@triton.jit
def _div_rn(a, b):
    """a / b for fp32 tensors, rounded to nearest, subnormals kept (IEEE; torch's `/`)."""
    if _PTX_DIV:
        q = tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def _grouped_outer_kernel(
    eta_ptr, mu_ptr, offsets_ptr, alpha_ptr, out_ptr, sel_ptr,
    O, I, G,
    stride_eta_t, stride_eta_o, stride_mu_t, stride_mu_i,
    MODE: tl.constexpr, SELECT: tl.constexpr, IS_FP64: tl.constexpr, NATIVE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    ACC = out_ptr.dtype.element_ty
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = ro < O
    i_ok = ri < I
    # Feature offsets in int64: a column-major eta or mu (stride(1) = T) puts ro · T past 2^31 - 1
    # at real sizes (o 28672 × T 75k tokens), and an int32 product wraps to a wild address.
    # Contiguous inputs pass stride 1 (folded in as a constant): only a sign extension.
    eta_cols = ro.to(tl.int64) * stride_eta_o
    mu_cols = ri.to(tl.int64) * stride_mu_i
    if MODE == 0:  # MODE_NONE: one group per program
        g_begin = tl.program_id(2)
        g_end = g_begin + 1
    else:
        g_begin = 0
        g_end = G

    # res: the running fused tile (add: Σ S, max: the winner so far, sss/ssm: P, fisher: Σ S²).
    res = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
    neg = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)  # sss/ssm: N = Σ min(S, 0)
    # SELECT only (dead code otherwise): this program's word covers groups [lo, lo + 32).
    lo = tl.program_id(2) * 32
    one = tl.full((BLOCK_O, BLOCK_I), 1, tl.int32)
    winner = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.int32)  # max: the group res came from
    pos_bits = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.int32)  # sss/ssm: groups with S_g > 0
    neg_bits = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.int32)  # and with S_g < 0
    for g in range(g_begin, g_end):
        # int64 bounds, so an int64 token loop counter: with int32 offsets the compiled loop
        # counted in int32 and its step past a group ending within BLOCK_T of 2^31 - 1 wrapped
        # negative and passed `t0 < end` (tests/test_triton_compile.py reads the counter's type).
        start = tl.load(offsets_ptr + g).to(tl.int64)
        end = tl.load(offsets_ptr + g + 1).to(tl.int64)
        s_g = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
        for t0 in range(start, end, BLOCK_T):
            # int64 before the add: t0 + an int32 arange wraps past 2^31 - 1 (the interpreter's
            # loop variable is int32 for either offsets dtype).
            rt = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            t_ok = rt < end
            eta_tile = tl.load(eta_ptr + rt[None, :] * stride_eta_t + eta_cols[:, None],
                               mask=t_ok[None, :] & o_ok[:, None], other=0.0)  # (O, T): ηᵀ
            mu_tile = tl.load(mu_ptr + rt[:, None] * stride_mu_t + mu_cols[None, :],
                              mask=t_ok[:, None] & i_ok[None, :], other=0.0)  # (T, I)
            s_g = mma(s_g, eta_tile, mu_tile, IS_FP64, NATIVE, SPLIT)
        if MODE == 0:
            res = s_g
        elif MODE == 1:
            res += s_g
        elif MODE == 2:
            # Strictly greater replaces: the first group keeps ties.  Starting from 0 is the
            # same as starting from group 0 (a zero only loses to a nonzero magnitude or NaN).
            # NaN beats every number and the first NaN stays, as torch's argmax in the
            # reference (without the second term a NaN S_g never won: `NaN > x` is false).
            better = (tl.abs(s_g) > tl.abs(res)) | ((s_g != s_g) & (res == res))
            res = tl.where(better, s_g, res)
            if SELECT:
                winner = tl.where(better, g, winner)
        elif MODE == 3 or MODE == 4:
            # where, not tl.maximum/minimum: by default (propagate_nan=NONE) those drop a NaN
            # (seen under the interpreter: maximum(NaN, 0) gave 0); the reference's clamp keeps it.
            res += tl.where(s_g < 0.0, 0.0, s_g)
            neg += tl.where(s_g > 0.0, 0.0, s_g)
            if SELECT:
                bit = tl.where((g >= lo) & (g < lo + 32), one << tl.minimum(tl.maximum(g - lo, 0), 31), 0)
                pos_bits |= tl.where(s_g > 0, bit, 0)
                neg_bits |= tl.where(s_g < 0, bit, 0)
        else:
            res += s_g * s_g

    out_mask = o_ok[:, None] & i_ok[None, :]
    if SELECT:
        # The entries of S_g that the fused output took (SPEC: the gradient reaches only those):
        # max, the winner's; sss/ssm, group g's positive entries where P won, its negative ones
        # where N won (an entry with S_g = 0 reaches neither).
        if MODE == 2:
            shift = tl.minimum(tl.maximum(winner - lo, 0), 31)
            bits = tl.where((winner >= lo) & (winner < lo + 32), one << shift, 0)
        else:
            bits = tl.where(res >= -neg, pos_bits, neg_bits)
        sel_base = sel_ptr + tl.program_id(2).to(tl.int64) * O * I
        tl.store(sel_base + ro[:, None].to(tl.int64) * I + ri[None, :], bits, mask=out_mask)
    else:
        if MODE == 3 or MODE == 4:
            res = tl.where(res >= -neg, res, neg)
        if MODE == 4 or MODE == 5:
            # Rounded to nearest, as torch's `/`: triton compiles an fp32 `/` to div.full.f32 on a GPU,
            # up to 2 ulp off (the interpreter divides exactly: tests/test_triton_compile.py reads the
            # PTX; `_div_rn` for triton's FTZ before 3.6).  div_rn takes fp32 only; fp64's `/` is
            # div.rn.f64 already.
            if IS_FP64:
                res = res / G
            else:
                res = _div_rn(res, tl.zeros_like(res) + G)
        res = res * tl.load(alpha_ptr).to(ACC)
        out_base = out_ptr
        if MODE == 0:
            out_base = out_ptr + g_begin.to(tl.int64) * O * I
        tl.store(out_base + ro[:, None].to(tl.int64) * I + ri[None, :], res, mask=out_mask)


def check_outer_inputs(eta, mu, offsets, **others) -> None:
    """The shape, dtype and device checks of grouped_outer's launchers (forward, selection pass,
    backward); `others` (name=tensor) are checked for the device too."""
    check_tensor(eta, "eta", 2)
    check_tensor(mu, "mu", 2)
    if eta.shape[0] != mu.shape[0]:
        raise ValueError(f"eta and mu must have the same number of tokens, got {eta.shape[0]} and {mu.shape[0]}")
    launcher_offsets_groups(offsets)
    check_same_device(dict(others, eta=eta, mu=mu, offsets=offsets))


def check_alpha(alpha) -> None:
    """alpha of grouped_outer's launchers: a real number, or a one-entry float tensor (forward)."""
    if isinstance(alpha, torch.Tensor):
        check_tensor(alpha, "alpha")
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a number or a one-entry tensor, got shape {tuple(alpha.shape)}")
    else:
        check_real_number(alpha, "alpha")


def launch_grouped_outer(eta, mu, offsets, mode: int, alpha=1.0, precision_from=(), select=False):
    """Shared launcher of grouped_outer, segmented_fisher and the selection pass of
    grouped_outer_backward (checks shapes, not offset values).

    `precision_from`: as in segment_matmul (dtypes the fp32 operands were computed from).
    `select` (MODE_MAX, MODE_SSS or MODE_SSM): return the int32 (ceil(G/32), o, i) selection
    words instead of the fused output (alpha is then not used).
    """
    check_outer_inputs(eta, mu, offsets)
    check_alpha(alpha)
    G = offsets.shape[0] - 1
    O, I = eta.shape[1], mu.shape[1]
    offsets = offsets.contiguous()  # the kernel reads offsets[g] at offsets_ptr + g
    acc = compute_dtype(eta, mu)
    if select and mode not in (MODE_MAX, MODE_SSS, MODE_SSM):
        raise ValueError(f"select needs the max, sss or ssm mode, got mode {mode}")
    words = triton.cdiv(G, 32)
    if select and words > GRID_YZ_MAX:  # one program per word along the grid's third axis
        raise ValueError(f"offsets must have at most {32 * GRID_YZ_MAX} groups for this fusion's backward, got {G}")
    if select:
        sel = torch.empty((words, O, I), dtype=torch.int32, device=eta.device)
        out = torch.empty((1,), dtype=acc, device=eta.device)  # never written; gives the kernel its dtype
    else:
        out = torch.empty((G, O, I) if mode == MODE_NONE else (O, I), dtype=acc, device=eta.device)
        sel = out  # never written without SELECT
    result = sel if select else out
    if O == 0 or I == 0:
        return result
    # alpha goes in as a device scalar of the accumulation dtype: a Python float argument would
    # be passed to the kernel as fp32 and round fp64 results.
    if isinstance(alpha, torch.Tensor):
        alpha_t = alpha.detach().to(device=eta.device, dtype=acc).reshape(1)
    else:
        alpha_t = torch.full((1,), float(alpha), dtype=acc, device=eta.device)
    fp64 = acc == torch.float64
    native = not fp64 and native_dot(eta.dtype, mu.dtype, *precision_from)
    tiles = grouped_outer_tiles(eta.shape[0], G, O, I, dot_path(fp64, native, eta.dtype, mu.dtype), select)
    grid_oi = (triton.cdiv(O, tiles["BLOCK_O"]), triton.cdiv(I, tiles["BLOCK_I"]))
    # "none": groups [g0, g0 + n) per launch (offsets and out from g0), within the grid's limit.
    per_group = mode == MODE_NONE  # select needs max, sss or ssm
    chunks = [(g0, min(GRID_YZ_MAX, G - g0)) for g0 in range(0, G, GRID_YZ_MAX)] if per_group else [(0, G)]
    for g0, n in chunks:
        part = out[g0:g0 + n] if per_group else out
        _grouped_outer_kernel[(*grid_oi, words if select else n if per_group else 1)](
            eta, mu, offsets[g0:g0 + n + 1], alpha_t, part, sel if select else part,
            O, I, n,
            eta.stride(0), eta.stride(1), mu.stride(0), mu.stride(1),
            MODE=mode, SELECT=bool(select), IS_FP64=fp64, NATIVE=native,
            SPLIT=dot_split(eta.dtype, mu.dtype, *precision_from), **tiles,
        )
    return result


def grouped_outer(eta, mu, offsets, fusion="add", alpha=1.0):
    """SPEC grouped_outer: per-group Σ η μᵀ fused by `fusion` (none/add/max/sss/ssm), × alpha.

    eta (T, o), mu (T, i), offsets int (G+1,).  Returns (o, i), or (G, o, i) for "none", in
    fp32 (fp64 when an input is fp64).
    """
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {tuple(FUSION_MODES)}, got {fusion!r}")
    return launch_grouped_outer(eta, mu, offsets, FUSION_MODES[fusion], alpha)
