"""Every Triton kernel compiles for sm_90 (H100/H200) without a GPU, through ptxas.

`python -m dcedit_kernels.triton_kernels.compile_check` runs in a subprocess with
TRITON_INTERPRET unset (this process interprets: its kernels cannot be compiled here).  It
compiles each kernel with the dtypes, constexprs (the tensor-core dot on for bf16) and launch
configs its launcher uses at the benchmark shapes, so a compile error surfaces before a GPU
session.  Skips where this triton cannot compile for that target at all (API or toolchain:
the script checks on a trivial kernel first); fails on an error in one of our kernels.
About 15 s on 2 cores with an empty triton cache, ~3 s with a warm one.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; 1 is its default
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "dcedit_kernels.triton_kernels.compile_check", "--arch", "90"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"this triton cannot compile for sm_90 here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert lines, proc.stdout
    print("\n".join(lines))  # registers / stack (spill) bytes / shared memory per kernel, with -s


# What both scripts below start with: grouped_outer's module as `go`, compile_check as `cc`, and
# exit 3 where this triton cannot compile for sm_90 (`_sm90_script_output` skips then).
SM90_PREAMBLE = textwrap.dedent("""
    import importlib, re, sys, torch
    from dcedit_kernels.triton_kernels import compile_check as cc
    go = importlib.import_module("dcedit_kernels.triton_kernels.grouped_outer")  # the package exports a function of that name
    try:
        cc._probe()
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(3)
""")
# Run in a subprocess with TRITON_INTERPRET unset (this process interprets): compiles
# grouped_outer's kernel for sm_90 in the modes that divide (ssm: the sss result / G; Fisher:
# Σ S_e² / E), fp32 and fp64 accumulation, and prints the PTX's division instructions per mode.
DIVISIONS_SCRIPT = textwrap.dedent("""
    for acc in (torch.float32, torch.float64):
        for mode in (go.MODE_SSM, go.MODE_FISHER):
            for groups in (125, 1):  # 1: triton folds an int argument equal to 1 into a constexpr
                ptrs = dict(eta_ptr=acc, mu_ptr=acc, offsets_ptr=torch.int32, alpha_ptr=acc, out_ptr=acc, sel_ptr=acc)
                ints = dict(O=6400, I=1600, G=groups, stride_eta_t=6400, stride_eta_o=1, stride_mu_t=1600, stride_mu_i=1)
                consts = dict(MODE=mode, SELECT=False, IS_FP64=acc == torch.float64, NATIVE=False, SPLIT=1,
                              BLOCK_O=16, BLOCK_I=16, BLOCK_T=16)
                kernel = cc.compile_kernel(go._grouped_outer_kernel, ptrs, ints, consts, 4, 1)
                found = sorted(set(re.findall(r"\\b(?:div|rcp)\\.[a-z0-9.]+", kernel.asm["ptx"])))
                print(str(acc).split(".")[-1], mode, groups, *found, flush=True)
""")


def test_divisions_round_to_nearest_on_sm90():
    """ssm (the sss result / G) and segmented_fisher (Σ_e S_e² / E) divide in the kernel.  Triton
    lowers an fp32 `/` to PTX div.full.f32, an approximation up to 2 ulp off, where torch, the
    reference and the interpreter (numpy) round the quotient to nearest: the CPU tests cannot see
    the difference, only the PTX can.  Every division must be div.rn (fp32 and fp64), without .ftz,
    also with G folded into a constexpr 1."""
    stdout = _sm90_script_output(DIVISIONS_SCRIPT)
    lines = [line.split() for line in stdout.splitlines() if re.match(r"float(32|64) ", line)]
    assert len(lines) == 8, stdout
    for dtype, mode, groups, *found in lines:
        where = f"{dtype} mode {mode} G={groups}: {found}"
        assert all(op.startswith("div.rn.") for op in found), where
        # .ftz flushed a subnormal quotient to 0 (libdevice's div_rn under triton 3.4 and 3.5).
        assert not any(".ftz" in op for op in found), where
        if groups != "1":  # a division by a constexpr 1 may be folded away
            assert f"div.rn.f{dtype[-2:]}" in found, where


# Run in a subprocess with TRITON_INTERPRET unset: compiles grouped_outer's kernel for sm_90 with
# int32 and with int64 offsets and prints the integer type of its token loop (`for t0 in
# range(start, end, BLOCK_T)`, the one loop stepping by BLOCK_T = 32 here) from the TTIR.
TOKEN_LOOP_SCRIPT = textwrap.dedent("""
    for offsets in (torch.int32, torch.int64):
        ptrs = dict(eta_ptr=torch.bfloat16, mu_ptr=torch.bfloat16, offsets_ptr=offsets, alpha_ptr=torch.float32,
                    out_ptr=torch.float32, sel_ptr=torch.int32)
        ints = dict(O=6400, I=1600, G=8, stride_eta_t=6400, stride_eta_o=1, stride_mu_t=1600, stride_mu_i=1)
        consts = dict(MODE=go.MODE_ADD, SELECT=False, IS_FP64=False, NATIVE=True, SPLIT=3,
                      BLOCK_O=128, BLOCK_I=128, BLOCK_T=32)
        ttir = cc.compile_kernel(go._grouped_outer_kernel, ptrs, ints, consts, 8, 3).asm["ttir"]
        loops = re.findall(r"scf\\.for %[\\w.]+ = %[\\w.]+ to %[\\w.]+ step %c32_(i\\d+)\\b.*: (i\\d+) \\{", ttir)
        print("offsets", str(offsets).split(".")[-1], *(t for _, t in loops), flush=True)
""")


def test_grouped_outer_token_loop_counts_in_int64_on_sm90():
    """grouped_outer's token loop, `for t0 in range(start, end, BLOCK_T)`, takes its counter's type
    from the offsets it loaded: with int32 offsets an int32 counter, which the compiled loop steps
    with a wrapping add (LLVM `add i32`, no nsw) and tests with `t0 < end`.  For a group ending
    within BLOCK_T of 2^31 - 1 the step after its last chunk wraps negative, passes that test, and
    the loop runs on over ~2^32 / BLOCK_T chunks of negative rows, which also pass the `rt < end`
    mask (an illegal address on a GPU; the interpreter's Python range does not wrap, so
    test_grouped_outer_token_index_past_int32's int32 case passed here only).  Both offsets dtypes
    must give an int64 counter."""
    stdout = _sm90_script_output(TOKEN_LOOP_SCRIPT)
    lines = [line.split() for line in stdout.splitlines() if line.startswith("offsets ")]
    assert [line[1] for line in lines] == ["int32", "int64"], stdout
    for _, dtype, *loops in lines:
        assert loops == ["i64"], f"{dtype} offsets: token loop counter {loops}"


def _sm90_script_output(script: str) -> str:
    """The stdout of `script` (after SM90_PREAMBLE) run in a subprocess with TRITON_INTERPRET unset (it compiles for sm_90
    without a GPU); skips where this triton cannot compile for sm_90 (the script exits 3)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SM90_PREAMBLE + script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"this triton cannot compile for sm_90 here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("tool", ["compile_check", "tune"])
def test_tool_help_under_python_OO(tool):
    """`python -OO` (or PYTHONOPTIMIZE=2) drops docstrings: the two tools built their argparse
    description from `__doc__.splitlines()[0]` and raised AttributeError ('NoneType' object has no
    attribute 'splitlines') before parsing any argument, `--help` included."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-OO", "-m", f"dcedit_kernels.triton_kernels.{tool}", "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout
