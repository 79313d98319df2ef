"""Compile every kernel for a CUDA target without a GPU: ``python -m dcedit_kernels.triton_kernels.compile_check``.

Each variant is a kernel with the pointer dtypes, constexprs and launch config its launcher
would use at the benchmark shapes (benchmarks/test_bench_ops.py) on an H100: bf16 inputs with
the tensor-core dot on, the bf16x3 and tf32x3 mixes, and the IEEE fp32 and fp64 paths.  The compile goes
through ptxas, so an error a GPU session would meet at its first launch surfaces here.  Prints
one line per variant with ptxas's registers and stack (spill) bytes.  Also fails a bf16x3
variant whose PTX lacks the round-toward-zero conversion of the split's hi piece
(`split_rounding`): the interpreter truncates every fp32 → bf16 conversion, so the CPU tests
cannot tell it from round to nearest.  And one whose PTX divides approximately
(`approximate_division`): the interpreter's numpy division is exact.

Must run with TRITON_INTERPRET unset (tests/test_triton_compile.py starts it in a subprocess).
Exit status: 0 all compiled; 1 a kernel failed to compile; 3 this triton cannot compile for
the target at all (API or toolchain mismatch, checked on a trivial kernel first).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import torch

TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
            torch.int32: "i32", torch.int64: "i64"}


def _api():
    """triton.compile, ASTSource, GPUTarget and the backend's attribute parser (None if absent)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import CUDABackend

        parse_attr = CUDABackend.parse_attr
    except (ImportError, AttributeError):
        parse_attr = None
    return triton.compile, ASTSource, GPUTarget, parse_attr


def compile_kernel(fn, pointers: dict, ints: dict, constexprs: dict, num_warps: int, num_stages: int,
                   arch: int = 90):
    """Compile `fn` for sm_`arch` with `pointers` {arg: torch dtype}, `ints` {arg: value} and
    `constexprs`, specialised as a launch would be: pointers 16-byte aligned (torch allocations
    are), an int equal to 1 folded in as a constant, one divisible by 16 declared so.  Without
    that, ptxas sees no contiguity: no vector loads, no cp.async pipelining, and the register
    figures would describe some other kernel."""
    compile_, ASTSource, GPUTarget, parse_attr = _api()
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + TL_NAMES[pointers[name]]
            if parse_attr is not None:
                attrs[(i,)] = parse_attr("D")
        elif name in ints and ints[name] == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        elif name in ints:
            signature[name] = "i32" if -2**31 <= ints[name] < 2**31 else "i64"
            if ints[name] % 16 == 0 and parse_attr is not None:
                attrs[(i,)] = parse_attr("D")
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            raise ValueError(f"no value for argument {name} of {fn.__name__}")
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return compile_(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def split_rounding(name: str, kernel) -> str:
    """'' or why a variant's PTX is wrong: a bf16x3 dot (all three pieces) truncates the fp32
    tile to its hi piece (`segment_matmul._split_bf16x3`, ``cvt.rz.bf16.f32``); rounded to
    nearest, a finite value above bf16's largest would become inf and its product NaN."""
    ptx = getattr(kernel, "asm", {}).get("ptx", "")
    if "bf16x3" in name and ptx and "cvt.rz.bf16.f32" not in ptx:
        return "bf16x3 split without cvt.rz.bf16.f32 (hi must round toward zero)"
    return ""


def approximate_division(kernel) -> str:
    """'' or the approximate divisions in a variant's PTX: triton compiles an fp32 `/` to
    div.full.f32 (up to 2 ulp off), where torch and the reference round to nearest
    (grouped_outer divides with `tl.math.div_rn`)."""
    ptx = getattr(kernel, "asm", {}).get("ptx", "")
    found = sorted(set(re.findall(r"\b(?:div\.(?:full|approx)|rcp\.approx)\.[a-z0-9.]+", ptx)))
    return f"approximate division in the PTX: {', '.join(found)}" if found else ""


def resource_usage(kernel) -> str:
    """'regs=n stack=n smem=n': ptxas's registers per thread and stack bytes (spills) from
    cuobjdump on the cubin, and triton's dynamic shared memory in bytes."""
    usage = {}
    cubin = getattr(kernel, "asm", {}).get("cubin")
    try:
        import triton.backends.nvidia as nv

        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    except ImportError:
        tool = ""
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if cubin and tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        for word in next((ln for ln in out.splitlines() if "REG:" in ln), "").split():
            key, _, value = word.partition(":")
            if key in ("REG", "STACK"):
                usage["regs" if key == "REG" else "stack"] = value
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    if shared is not None:
        usage["smem"] = shared
    return " ".join(f"{k}={v}" for k, v in usage.items())


def _probe():
    import triton
    import triton.language as tl

    @triton.jit
    def _add(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i * stride, mask=i < n) + 1, mask=i < n)

    # Every way compile_kernel declares an argument: aligned pointer, int divisible by 16, int
    # folded in as 1, constexpr.
    compile_kernel(_add, dict(x_ptr=torch.float32, y_ptr=torch.float32), dict(n=4096, stride=1), dict(BLOCK=128), 4, 1)


def variants():
    """(name, kernel, pointer dtypes, int args, constexprs, num_warps, num_stages) of every path,
    at the benchmark shapes with the launch config the launchers' heuristics pick there."""
    from .grouped_outer import _grouped_outer_kernel
    from .grouped_bilinear import _group_scores_kernel, _grouped_bilinear_kernel
    from .launch import dot_path, group_scores_tiles, grouped_bilinear_tiles, grouped_outer_tiles, segment_matmul_tiles
    from .segment_matmul import _segment_matmul_kernel

    bf, f32, f64, i32, i64 = torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64
    out = []

    def add(name, fn, ptrs, ints, consts, tiles):
        tiles = dict(tiles)
        warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        out.append((name, fn, ptrs, ints, {"SPLIT": 3, **consts, **tiles}, warps, stages))

    # segment_matmul at grouped_lowrank's shapes (T 4096, G 8, d 8000, r 1920), and the dense
    # part of lowrank_delta_linear (one group, N 2048, i 1600 -> o 6400).
    sm_ptrs = ("x_ptr", "w_ptr", "gain_ptr", "bias_ptr", "scale_ptr", "shift_ptr", "residual_ptr")
    full = dict(HAS_GAIN=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, RELU=True, HAS_RESIDUAL=True,
                HAS_SELECT=False)
    bare = {key: False for key in full}
    for name, x_dt, w_dt, fp64, native, T, G, n, k, transpose, flags in (
        ("bf16 x gain bf16x3 d->r", bf, bf, False, True, 4096, 8, 1920, 8000, True, dict(bare, HAS_GAIN=True)),
        ("fp32 x bf16 bf16x3 r->d, epilogue", f32, bf, False, True, 4096, 8, 8000, 1920, True, full),
        ("fp32 tf32x3 untransposed (backward)", f32, f32, False, True, 4096, 8, 8000, 1920, False, bare),
        ("fp32 x bf16 bf16x3 untransposed (backward)", f32, bf, False, True, 4096, 8, 8000, 1920, False, bare),
        ("bf16 native dense", bf, bf, False, True, 2048, 1, 6400, 1600, True, dict(bare, HAS_BIAS=True)),
        ("bf16 native d->r", bf, bf, False, True, 4096, 8, 1920, 8000, True, bare),
        ("fp32 IEEE, epilogue", f32, f32, False, False, 4096, 8, 8000, 1920, True, full),
        ("fp64, epilogue", f64, f64, True, False, 4096, 8, 8000, 1920, True, full),
    ):
        ptrs = {p: x_dt for p in sm_ptrs}
        ptrs.update(w_ptr=w_dt, offsets_ptr=i32, sel_ptr=i32, y_ptr=f64 if fp64 else f32)
        strides = dict(stride_wn=k, stride_wk=1) if transpose else dict(stride_wn=1, stride_wk=n)
        ints = dict(G=G, N=n, K=k, stride_xt=k, stride_xk=1, stride_wg=n * k, stride_sw=0, stride_sn=0, stride_sk=0,
                    **strides)
        add(f"segment_matmul {name}", _segment_matmul_kernel, ptrs, ints, dict(flags, IS_FP64=fp64, NATIVE=native),
            segment_matmul_tiles(T, G, n, k, dot_path(fp64, native, f32 if flags["HAS_GAIN"] else x_dt, w_dt)))
    # grouped_lowrank's second GEMM with fewer bf16 pieces of z (DCEDIT_TRITON_FP32_SPLIT), and an
    # fp32 editor's under torch's "high" float32 matmul precision (one TF32 pass, SPLIT 1).
    ints = dict(G=8, N=8000, K=1920, stride_xt=1920, stride_xk=1, stride_wg=8000 * 1920, stride_wn=1920,
                stride_wk=1, stride_sw=0, stride_sn=0, stride_sk=0)
    for name, w_dt, pieces, path in (("fp32 x bf16 split 2", bf, 2, "bf16x3"), ("fp32 x bf16 split 1", bf, 1, "bf16x3"),
                                     ("fp32 tf32 (precision 'high')", f32, 1, "tf32x3")):
        ptrs = {p: f32 for p in sm_ptrs}
        ptrs.update(w_ptr=w_dt, offsets_ptr=i32, sel_ptr=i32, y_ptr=f32)
        add(f"segment_matmul {name} r->d, epilogue", _segment_matmul_kernel, ptrs, ints,
            dict(full, HAS_GAIN=False, IS_FP64=False, NATIVE=True, SPLIT=pieces),
            segment_matmul_tiles(4096, 8, 8000, 1920, path))
    # grouped_outer's backward (T 4096, G 8, o 6400, i 1600): bf16 mu/eta against the shared fp32
    # gradient, masked by the selection words (w stride 0 over groups).
    for name, n, k, transpose in (("d_eta = mu dS_g^T", 6400, 1600, True), ("d_mu = eta dS_g", 1600, 6400, False)):
        strides = (dict(stride_wn=k, stride_wk=1, stride_sn=k, stride_sk=1) if transpose
                   else dict(stride_wn=1, stride_wk=n, stride_sn=1, stride_sk=n))
        ints = dict(G=8, N=n, K=k, stride_xt=k, stride_xk=1, stride_wg=0, stride_sw=n * k, **strides)
        ptrs = {p: bf for p in sm_ptrs}
        ptrs.update(w_ptr=f32, offsets_ptr=i32, sel_ptr=i32, y_ptr=f32)
        add(f"segment_matmul bf16 x fp32 bf16x3 select ({name})", _segment_matmul_kernel, ptrs, ints,
            dict(bare, HAS_SELECT=True, IS_FP64=False, NATIVE=True),
            segment_matmul_tiles(4096, 8, n, k, dot_path(False, True, bf, f32)))

    # grouped_outer / segmented_fisher at (T 4096, G 8, o 6400, i 1600) and Fisher's 125 edits.
    go_ptrs = dict(eta_ptr=bf, mu_ptr=bf, offsets_ptr=i32, alpha_ptr=f32, out_ptr=f32, sel_ptr=i32)
    plain = dict(SELECT=False, IS_FP64=False, NATIVE=True)
    for mode in range(6):
        T, G = (3000, 125) if mode == 5 else (4096, 8)
        add(f"grouped_outer bf16 native mode {mode}", _grouped_outer_kernel, go_ptrs,
            dict(O=6400, I=1600, G=G, stride_eta_t=6400, stride_eta_o=1, stride_mu_t=1600, stride_mu_i=1),
            dict(plain, MODE=mode), grouped_outer_tiles(T, G, 6400, 1600, "half"))
    for mode in (2, 3):  # the backward's selection pass: max, sss (ssm compiles as sss)
        add(f"grouped_outer bf16 native mode {mode} select", _grouped_outer_kernel, go_ptrs,
            dict(O=6400, I=1600, G=8, stride_eta_t=6400, stride_eta_o=1, stride_mu_t=1600, stride_mu_i=1),
            dict(plain, MODE=mode, SELECT=True), grouped_outer_tiles(4096, 8, 6400, 1600, "half", select=True))
    ints = dict(O=8000, I=1920, G=8, stride_eta_t=8000, stride_eta_o=1, stride_mu_t=1920, stride_mu_i=1)
    add("grouped_outer fp32 tf32x3 mode 0 (backward du)", _grouped_outer_kernel,
        {**go_ptrs, "eta_ptr": f32, "mu_ptr": f32}, ints,
        dict(plain, MODE=0), grouped_outer_tiles(4096, 8, 8000, 1920, "tf32x3"))
    add("grouped_outer fp32 x bf16 bf16x3 mode 0 (backward dv)", _grouped_outer_kernel,
        {**go_ptrs, "eta_ptr": f32}, ints, dict(plain, MODE=0),
        grouped_outer_tiles(4096, 8, 8000, 1920, "bf16x3"))
    add("grouped_outer fp32 IEEE mode 3", _grouped_outer_kernel, {**go_ptrs, "eta_ptr": f32, "mu_ptr": f32}, ints,
        dict(plain, MODE=3, NATIVE=False), grouped_outer_tiles(4096, 8, 8000, 1920, "ieee"))
    add("grouped_outer fp64 mode 0", _grouped_outer_kernel,
        {**go_ptrs, "eta_ptr": f64, "mu_ptr": f64, "alpha_ptr": f64, "out_ptr": f64}, ints,
        dict(plain, MODE=0, IS_FP64=True, NATIVE=False), grouped_outer_tiles(4096, 8, 8000, 1920, "fp64"))

    # grouped_bilinear's two launches at lowrank_delta_linear's shapes (N 2048, G 8 x 512 tokens,
    # o 6400, i 1600): scores C = alpha_g Q·K (NQ x W) and out += C V.
    sc_ptrs = dict(q_ptr=bf, q_index_ptr=i64, q_offsets_ptr=i64, k_ptr=bf, kv_index_ptr=i64, kv_offsets_ptr=i32,
                   alpha_ptr=f32, c_ptr=f32)
    ap_ptrs = dict(c_ptr=f32, q_index_ptr=i64, q_offsets_ptr=i64, v_ptr=bf, kv_index_ptr=i64, kv_offsets_ptr=i32,
                   scale_ptr=f32, out_ptr=f32)
    for name, nq, w, q_index, kv_index, dk, dv in (("forward", 2048, 4096, True, False, 1600, 6400),
                                                   ("backward dx", 2048, 4096, True, False, 6400, 1600),
                                                   ("backward deta", 4096, 2048, False, True, 1600, 6400),
                                                   ("backward dmu", 4096, 2048, False, True, 6400, 1600)):
        flags = dict(HAS_Q_INDEX=q_index, HAS_KV_INDEX=kv_index, IS_FP64=False, NATIVE=True)
        add(f"group_scores bf16 native {name}", _group_scores_kernel, sc_ptrs, dict(DK=dk, W=w, G=8, J0=0), flags,
            group_scores_tiles(nq, 8, w, dk, "half"))
        add(f"grouped_bilinear fp32 C x bf16 V bf16x3 {name}", _grouped_bilinear_kernel, ap_ptrs,
            dict(DV=dv, W=w, G=8), flags, grouped_bilinear_tiles(nq, 8, w, dv, "bf16x3"))
    # As training runs it: a bf16 layer with the editor's fp32 factors (grouped_lowrank returns
    # fp32 mu_t, eta_t): bf16 x against fp32 mu_t (bf16x3), then C against fp32 eta_t (tf32x3).
    mixed = dict(HAS_Q_INDEX=True, HAS_KV_INDEX=False, IS_FP64=False, NATIVE=True)
    add("group_scores bf16 x fp32 bf16x3 forward (fp32 factors)", _group_scores_kernel, {**sc_ptrs, "k_ptr": f32},
        dict(DK=1600, W=4096, G=8, J0=0), mixed, group_scores_tiles(2048, 8, 4096, 1600, "bf16x3"))
    add("grouped_bilinear fp32 C x fp32 V tf32x3 forward (fp32 factors)", _grouped_bilinear_kernel,
        {**ap_ptrs, "v_ptr": f32}, dict(DV=6400, W=4096, G=8), mixed, grouped_bilinear_tiles(2048, 8, 4096, 6400, "tf32x3"))
    ieee = dict(HAS_Q_INDEX=True, HAS_KV_INDEX=False, IS_FP64=False, NATIVE=False)
    add("group_scores fp32 IEEE", _group_scores_kernel, {**sc_ptrs, "q_ptr": f32, "k_ptr": f32},
        dict(DK=1600, W=4096, G=8, J0=0), ieee, group_scores_tiles(2048, 8, 4096, 1600, "ieee"))
    add("grouped_bilinear fp32 IEEE", _grouped_bilinear_kernel, {**ap_ptrs, "v_ptr": f32},
        dict(DV=6400, W=4096, G=8), ieee, grouped_bilinear_tiles(2048, 8, 4096, 6400, "ieee"))
    fp64 = dict(ieee, IS_FP64=True)
    add("group_scores fp64", _group_scores_kernel,
        {**sc_ptrs, "q_ptr": f64, "k_ptr": f64, "alpha_ptr": f64, "c_ptr": f64}, dict(DK=1600, W=4096, G=8, J0=0),
        fp64, group_scores_tiles(2048, 8, 4096, 1600, "fp64"))
    add("grouped_bilinear fp64", _grouped_bilinear_kernel,
        {**ap_ptrs, "c_ptr": f64, "v_ptr": f64, "scale_ptr": f64, "out_ptr": f64}, dict(DV=6400, W=4096, G=8),
        fp64, grouped_bilinear_tiles(2048, 8, 4096, 6400, "fp64"))
    return out


def main(argv=None) -> int:
    # None under `python -OO`, which drops docstrings (splitlines raised AttributeError before any argument).
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    parser.add_argument("--only", default="", help="compile only variants whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1: kernels are interpreted, nothing to compile", file=sys.stderr)
        return 3
    try:
        _probe()
    except Exception as exc:  # any failure on a trivial kernel: this triton/toolchain cannot do it
        print(f"cannot compile for sm_{args.arch} here: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    failed = 0
    for name, fn, ptrs, ints, consts, warps, stages in variants():
        if args.only not in name:
            continue
        cfg = " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK"))
        try:
            kernel = compile_kernel(fn, ptrs, ints, consts, warps, stages, args.arch)
        except Exception:
            failed += 1
            print(f"FAILED {name} [{cfg} warps={warps} stages={stages}]\n{traceback.format_exc()}", flush=True)
            continue
        wrong = split_rounding(name, kernel) or approximate_division(kernel)
        if wrong:
            failed += 1
            print(f"FAILED {name} [{cfg} warps={warps} stages={stages}]: {wrong}", flush=True)
            continue
        print(f"ok {name} [{cfg} warps={warps} stages={stages}] {resource_usage(kernel)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
