"""Launch choices shared by the launchers: interpreter or GPU, which tl.dot form, which tiles.

`native_dot` decides the NATIVE constexpr of `mma` (tensor cores or the exact fp32 dot).  The
tile functions return the constexpr block sizes plus num_warps/num_stages of one launch: one
fixed small config under the interpreter, a documented heuristic on a GPU.  A heuristic rather
than triton.autotune: no tuning runs inside training steps or tests (a new token count would
retune), no autotune API that moves between triton versions, and the grouped_bilinear kernel
accumulates into its output in place (autotune's trial runs would add into it).  `forced_tiles`
pins a config: the CUDA tests run other candidates through it, and `tune.py` times candidates
on a GPU so that the choices below can be replaced by measured ones.

Register, spill and shared-memory figures in the comments are ptxas's for sm_90a at the
benchmark shapes (triton 3.9 here, `python -m dcedit_kernels.triton_kernels.compile_check`, no
GPU needed; triton 3.6, the GPU machine's, compiles every variant with the same configs and no
spill either).  No timing has been measured on a GPU yet: benchmarks/NOTES.md has the floors
and the predictions to check.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .._checks import HALF_DTYPES as HALF
NATIVE_DOT_ENV = "DCEDIT_TRITON_NATIVE_DOT"
FP32_SPLIT_ENV = "DCEDIT_TRITON_FP32_SPLIT"


def interpreting() -> bool:
    """True when triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _squeeze_interpreter_index() -> None:
    """triton 3.6's interpreter (and 3.0-3.2's) reads a scalar tensor (a loop bound) as int() of a
    1-element array, which numpy >= 2.4 refuses; triton 3.9 squeezes it first: do the same where it
    does not.  triton 3.0-3.4 patch the class itself, `_patch_lang_tensor(tensor)`, without a scope."""
    try:
        import inspect

        from triton.runtime import interpreter

        patch = interpreter._patch_lang_tensor
        if "squeeze" in inspect.getsource(patch):
            return
    except (ImportError, AttributeError, OSError, TypeError):
        return

    def patch_lang_tensor(tensor, *scope):
        patch(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _squeeze_interpreter_index()


def native_dot(*dtypes: torch.dtype) -> bool:
    """Whether a dot over tensors of `dtypes` uses tensor cores (the NATIVE constexpr of `mma`).

    `dtypes`: the operands' tensors and, for fp32 intermediates, the op inputs they were computed
    from (`precision_from`).  True when one of them is float16/bfloat16 and none is float64:
    `mma` then takes the form `dot_path` names ("half", "bf16x3" or "tf32x3", all ~fp32 accurate
    by default, see `fp32_split`).  fp64 keeps its broadcast sum; fp32-only dots keep the IEEE
    fp32 dot unless torch's float32 matmul precision allows TF32 (`fp32_tensor_cores`: then one
    TF32 pass, see `dot_split`).  The same choice under the interpreter, so that the CPU tests
    run the branches a GPU runs (`mma`'s 16-bit dots go through exact fp32 there: the
    interpreter's bf16 tl.dot is wrong).
    DCEDIT_TRITON_NATIVE_DOT=1 or 0 forces it on or off where a dtype is 16-bit (and raises
    ValueError for any other value).
    """
    if torch.float64 in dtypes:
        return False
    if not any(d in HALF for d in dtypes):
        return fp32_tensor_cores()
    flag = os.environ.get(NATIVE_DOT_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{NATIVE_DOT_ENV} must be 0 or 1 (or unset), got {flag!r}")
    return flag != "0"


def fp32_split() -> int:
    """How many pieces an fp32 tile of a 16-bit op takes on tensor cores (`mma`'s SPLIT
    constexpr), from DCEDIT_TRITON_FP32_SPLIT, read at each launch (ValueError for any other
    value): 3 (the default, ~fp32 accurate: bf16x3 against bf16, tf32x3 otherwise), 2 (bf16:
    hi + mid, ~2^-17 relative per product; TF32 pairs stay tf32x3) or 1 (the fp32 tile rounded
    to bf16, 2^-9, as an eager bf16 model rounds its intermediates; TF32 pairs one TF32 pass).
    Fewer pieces, fewer passes: grouped_lowrank's second GEMM (its fp32 hidden z against bf16 u)
    does 3, 2 or 1 passes where the first does 1.  A constexpr, so each setting compiles (and
    caches) its own kernels."""
    flag = os.environ.get(FP32_SPLIT_ENV, "3")
    if flag not in ("1", "2", "3"):
        raise ValueError(f"{FP32_SPLIT_ENV} must be 1, 2 or 3 (or unset), got {flag!r}")
    return int(flag)


def fp32_tensor_cores() -> bool:
    """Whether dots of fp32-only ops may use TF32, as torch's own fp32 CUDA matmuls may: when
    `torch.set_float32_matmul_precision` is "high" or "medium" (not the default "highest"), or,
    from torch 2.9 on, `torch.backends.cuda.matmul.fp32_precision` (or the global
    `torch.backends.fp32_precision` it inherits) is "tf32".  That newer setting reads either API's
    choice; `get_float32_matmul_precision` raises RuntimeError once the newer API has set TF32
    ("mix of the legacy and new APIs", torch 2.11 and 2.13), so it is read only where the newer is absent."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


@contextlib.contextmanager
def fp32_matmul_precision(tf32: bool):
    """TF32 allowed (`tf32`) or not for fp32 matmuls, torch's and these kernels' (`fp32_tensor_cores`),
    inside the block, and the caller's setting back after it.  Through the newer switch,
    `torch.backends.cuda.matmul.fp32_precision`, where torch has it: saving the caller's setting with
    `get_float32_matmul_precision` raised RuntimeError ("mix of the legacy and new APIs") once the
    caller had allowed TF32 through that switch."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def dot_split(*dtypes: torch.dtype) -> int:
    """`mma`'s SPLIT for a dot over `dtypes` (operands and `precision_from`, as `native_dot`
    takes them): fp32-only dots take one TF32 pass (1) when `fp32_tensor_cores` lets them onto
    tensor cores, what cuBLAS does under that setting; a dot with a 16-bit source `fp32_split()`."""
    if not any(d in HALF for d in dtypes):
        return 1
    return fp32_split()


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= n, clamped to [lo, hi] (tl.dot needs every dim >= 16)."""
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


_TILE_KEYS = {
    "segment_matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
    "grouped_outer": ("BLOCK_O", "BLOCK_I", "BLOCK_T", "num_warps", "num_stages"),
    "grouped_outer_select": ("BLOCK_O", "BLOCK_I", "BLOCK_T", "num_warps", "num_stages"),
    "group_scores": ("BLOCK_M", "BLOCK_T", "BLOCK_K", "num_warps", "num_stages"),
    "grouped_bilinear": ("BLOCK_M", "BLOCK_N", "BLOCK_T", "num_warps", "num_stages"),
}

_FORCED: dict[str, dict] = {}


@contextlib.contextmanager
def forced_tiles(kernel: str, **config):
    """Pin the launch config of `kernel` (a key of `_TILE_KEYS`: "segment_matmul",
    "grouped_outer", "grouped_outer_select", "group_scores" or "grouped_bilinear") inside the
    block: the keys its tile function returns, all of them.  Process-wide, not per thread (a
    CUDA backward launches from autograd's own threads): for tuning runs (`tune.py`), one block
    at a time; blocks of two threads that do not nest leave the first one's config pinned."""
    if kernel not in _TILE_KEYS:
        raise ValueError(f"kernel must be one of {tuple(_TILE_KEYS)}, got {kernel!r}")
    missing = set(_TILE_KEYS[kernel]) - set(config)
    if missing or set(config) - set(_TILE_KEYS[kernel]):
        raise ValueError(f"config for {kernel} must give exactly {_TILE_KEYS[kernel]}, got {sorted(config)}")
    previous = _FORCED.get(kernel)
    _FORCED[kernel] = dict(config)
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = previous


_CHOSEN: list[dict] = []  # the open `chosen_tiles` blocks' records, innermost last


@contextlib.contextmanager
def chosen_tiles():
    """{kernel: the first launch config its tile function returned inside the block} (forced or the
    heuristic's): what `tune.py` compares the candidates with.  Candidate 0 of `CANDIDATES` is the
    heuristic's choice at most benchmark shapes, not all (segmented_fisher's short edits take
    BLOCK_T 32, candidate 1), and the sweep labelled candidate 0 "(heuristic)" whatever was chosen."""
    record: dict[str, dict] = {}
    _CHOSEN.append(record)
    try:
        yield record
    finally:
        _CHOSEN.remove(record)


def _chosen(kernel: str, config: dict) -> dict:
    for record in _CHOSEN:
        record.setdefault(kernel, dict(config))
    return config


def _fixed(kernel: str, path: str) -> dict | None:
    """The config `forced_tiles` pins for `kernel`; else 16 everywhere under the interpreter
    (fewer masked lanes to emulate; small tests still get ragged tiles) and for fp64 on a GPU
    (the broadcast product in `mma` holds BLOCK³ values); else None (the heuristic decides)."""
    if kernel in _FORCED:
        return dict(_FORCED[kernel])
    if interpreting() or path == "fp64":
        return {**{k: 16 for k in _TILE_KEYS[kernel] if k.startswith("BLOCK")}, "num_warps": 4, "num_stages": 1}
    return None


def dot_path(fp64: bool, native: bool, a: torch.dtype, b: torch.dtype) -> str:
    """Which form `mma` takes for tiles of dtypes a and b: "fp64", "ieee", "half", "bf16x3" (fp32
    with bf16) or "tf32x3" (any other native pair)."""
    if fp64:
        return "fp64"
    if not native:
        return "ieee"
    if a == b and a in HALF:
        return "half"
    return "bf16x3" if {a, b} == {torch.float32, torch.bfloat16} else "tf32x3"


def _rows_block(rows: int, groups: int) -> int:
    """Row tile of the row-grouped kernels, whose programs each own rows of one group.

    Each group ends in a partly filled tile (cdiv(n_g, BLOCK_M) tiles per group), so the tile
    should not be much taller than a group: 128 rows from 128-row groups on, else 64 (the
    smallest wgmma M).
    """
    return 128 if rows >= 128 * max(groups, 1) else 64


def _gemm_tiles(T: int, G: int, N: int, K: int, path: str) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a row-grouped GEMM on a GPU."""
    bm = _rows_block(T, G)
    if path == "half":
        # sm_90a, T 4096 in 8 groups, d 8000 -> r 1920, bf16: 128×128×64, 8 warps, 3 stages:
        # 158 registers, no spill, 96 KiB shared; 64×128×64 with 4 warps: 202, no spill.
        return bm, _pow2_at_least(N, 16, 128), _pow2_at_least(K, 16, 64), 8 if bm == 128 else 4, 3
    if path in ("tf32x3", "bf16x3"):
        # fp32 tiles take twice the bytes (BLOCK_K 32) and both keep split operands in
        # registers; tf32x3: 128×128×32 spills or sits at 253-255 registers; 128×64×32 with 8 warps
        # fits everything measured: 199 (gain), 191 (untransposed), 240 (full epilogue),
        # and 64×64×32 with 8 warps: 165-172 (4 warps: up to 254).
        return bm, _pow2_at_least(N, 16, 64), _pow2_at_least(K, 16, 32), 8, 3
    # IEEE fp32 runs on the FMA units: the tile only has to fit (64×64×32, 4 warps: 216
    # registers, no spill, with the full epilogue).
    return 64, _pow2_at_least(N, 16, 64), _pow2_at_least(K, 16, 32), 4, 2


def segment_matmul_tiles(T: int, G: int, N: int, K: int, path: str) -> dict:
    """Y (T×N) = X (T×K) W_gᵀ over G groups; `path` from dot_path."""
    fixed = _fixed("segment_matmul", path)
    if fixed is not None:
        return _chosen("segment_matmul", fixed)
    return _chosen("segment_matmul", _cfg("segment_matmul", *_gemm_tiles(T, G, N, K, path)))


def grouped_outer_tiles(T: int, G: int, O: int, I: int, path: str, select: bool = False) -> dict:
    """S (O×I) tiles over G groups of T tokens in all; `path` from dot_path.  `select`: the
    backward's selection pass ("grouped_outer_select"), which carries two more int32 tiles."""
    kernel = "grouped_outer_select" if select else "grouped_outer"
    fixed = _fixed(kernel, path)
    if fixed is not None:
        return _chosen(kernel, fixed)
    bo, bi = _pow2_at_least(O, 16, 128), _pow2_at_least(I, 16, 128)
    if path == "ieee":
        return _chosen(kernel, dict(BLOCK_O=min(bo, 64), BLOCK_I=min(bi, 64), BLOCK_T=32, num_warps=4, num_stages=2))
    # The token chunk is the dot's inner dimension: groups shorter than 64 tokens (Fisher's ~24
    # per edit) waste less of a 32-token chunk, and fp32 tiles take twice the bytes.
    # sm_90a, o 6400, i 1600, bf16: 128×128×64, 8 warps, 3 stages, 96 KiB shared, no spill;
    # 100 registers for "none", 168 add/max, 236 sss/ssm (three tiles: S_g, P, N), 161 Fisher
    # at ×32; 128×256 spills 656 B for sss.  tf32x3 (fp32 da, z) 128×128×32: 198 registers.
    short = T < 64 * max(G, 1)
    bt = 32 if short or path in ("tf32x3", "bf16x3") else 64
    if select:
        # Selection: sss carries P, N, S_g and two int32 bit tiles.  128×128×64 spills 416 B
        # (255 registers), 128×128×32 384 B; 128×64×64 with 8 warps: 236, no spill (max: 126).
        bi = min(bi, 64)
    return _chosen(kernel, dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt, num_warps=8, num_stages=3))


def group_scores_tiles(NQ: int, G: int, W: int, DK: int, path: str) -> dict:
    """C (NQ × each group's K rows) = alpha_g Q Kᵀ of grouped_bilinear's first launch: a
    row-grouped GEMM whose N is a group's length (about W/G of the W K rows); `path` of Q·K."""
    fixed = _fixed("group_scores", path)
    if fixed is not None:
        return _chosen("group_scores", fixed)
    return _chosen("group_scores", _cfg("group_scores", *_gemm_tiles(NQ, G, max(W // max(G, 1), 1), DK, path)))


def grouped_bilinear_tiles(NQ: int, G: int, W: int, DV: int, path: str) -> dict:
    """out (NQ×DV) += C V over each row's group, grouped_bilinear's second launch: a row-grouped
    GEMM whose inner dimension is a group's length (about W/G); `path` of the fp32 C with V."""
    fixed = _fixed("grouped_bilinear", path)
    if fixed is not None:
        return _chosen("grouped_bilinear", fixed)
    return _chosen("grouped_bilinear", _cfg("grouped_bilinear", *_gemm_tiles(NQ, G, DV, max(W // max(G, 1), 1), path)))


def _cfg(keys, *values):
    return dict(zip(_TILE_KEYS[keys], values))


# Per kernel and dot path: the heuristic's choice at the benchmark shapes first (at most of them:
# `chosen_tiles`), then the alternatives `tune.py` times against it on a GPU (the CUDA tests run each for correctness).
# ptxas for sm_90a at the benchmark shapes (triton 3.9): bf16x3 needs fewer registers than
# tf32x3 (segment_matmul 128×64×32 with gain 127 vs 199, grouped_bilinear 169 vs 207), so a
# 128×128×32 tile fits grouped_bilinear (230, no spill) and segment_matmul without the
# epilogue (173-204); with the full epilogue it spills 128 B, kept so that a timing decides.
# All fit the 227 KiB of shared memory.
CANDIDATES = {
    "segment_matmul": {
        "half": [_cfg("segment_matmul", 128, 128, 64, 8, 3), _cfg("segment_matmul", 64, 128, 64, 4, 3),
                 _cfg("segment_matmul", 128, 128, 64, 8, 4), _cfg("segment_matmul", 128, 256, 64, 8, 3)],
        "bf16x3": [_cfg("segment_matmul", 128, 64, 32, 8, 3), _cfg("segment_matmul", 64, 64, 32, 8, 3),
                   _cfg("segment_matmul", 64, 128, 32, 8, 3), _cfg("segment_matmul", 128, 128, 32, 8, 3)],
    },
    "grouped_outer": {
        "half": [_cfg("grouped_outer", 128, 128, 64, 8, 3), _cfg("grouped_outer", 128, 128, 32, 8, 3),
                 _cfg("grouped_outer", 128, 128, 64, 8, 4), _cfg("grouped_outer", 64, 128, 64, 4, 3)],
        "tf32x3": [_cfg("grouped_outer", 128, 128, 32, 8, 3), _cfg("grouped_outer", 64, 128, 32, 4, 3)],
    },
    "grouped_outer_select": {
        "half": [_cfg("grouped_outer_select", 128, 64, 64, 8, 3), _cfg("grouped_outer_select", 64, 128, 64, 8, 3),
                 _cfg("grouped_outer_select", 128, 64, 32, 8, 3), _cfg("grouped_outer_select", 64, 64, 64, 4, 3)],
    },
    "group_scores": {
        "half": [_cfg("group_scores", 128, 128, 64, 8, 3), _cfg("group_scores", 64, 128, 64, 4, 3),
                 _cfg("group_scores", 128, 64, 64, 4, 3), _cfg("group_scores", 128, 128, 64, 8, 4)],
    },
    "grouped_bilinear": {
        "bf16x3": [_cfg("grouped_bilinear", 128, 64, 32, 8, 3), _cfg("grouped_bilinear", 128, 128, 32, 8, 3),
                   _cfg("grouped_bilinear", 64, 64, 32, 8, 3), _cfg("grouped_bilinear", 64, 128, 32, 8, 3)],
    },
}
