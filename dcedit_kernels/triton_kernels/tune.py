"""Time every launch-config candidate on a GPU: ``python -m dcedit_kernels.triton_kernels.tune``.

For each kernel and dot path of `launch.CANDIDATES`, at the benchmark shapes
(benchmarks/test_bench_ops.py, bf16 inputs), runs the op with each candidate pinned by
`launch.forced_tiles` and prints the median time, the rate, and which candidate won.  The
heuristic's choice for the case (`launch.chosen_tiles`, timed too where it is no candidate) is
marked: a faster one is the measured reason to change launch.py.
First, grouped_lowrank with z in 3, 2 or 1 bf16 pieces against a dense bf16 matmul
(`split_choices`), an fp32 editor's grouped_lowrank on Triton and on cuBLAS under each float32
matmul precision (`fp32_choices`), and lowrank_delta_linear's dense part three ways
(`_dense_choices`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import launch
from .grouped_outer import MODE_NONE, launch_grouped_outer
from .lowrank_delta_linear import lowrank_delta_linear
from .segment_matmul import one_group, segment_matmul
from .segmented_fisher import segmented_fisher


def _ragged(T, G, gen, device="cuda"):
    """Offsets of G ragged groups over T tokens (one empty), as the benchmarks build them."""
    cuts = torch.sort(torch.randint(0, T + 1, (G - 1,), generator=gen)).values
    cuts[0] = cuts[1]
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).to(torch.int32).to(device)


def _cases(gen):
    """(kernel, path, label, flops, fn) at the benchmark shapes."""
    bf = torch.bfloat16

    def rnd(*shape, dtype=bf, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(dtype).cuda()

    T, G, d, r = 4096, 8, 8000, 1920
    off = _ragged(T, G, gen)
    h, v, u = rnd(T, d), rnd(G, r, d, scale=0.01), rnd(G, d, r, scale=0.01)
    z, bias = rnd(T, r, dtype=torch.float32), rnd(G, d)
    da = rnd(T, d, dtype=torch.float32)
    o, i = 6400, 1600
    eta, mu = rnd(T, o), rnd(T, i)
    counts = torch.randint(12, 37, (125,), generator=gen)
    f_off = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).cuda()
    Tf = int(counts.sum())
    f_eta, f_mu = rnd(Tf, o), rnd(Tf, i)
    N, per = 2048, 512
    x, weight, lbias = rnd(N, i), rnd(o, i), rnd(o)
    row_group = (torch.arange(N) % G).cuda()
    mu_t, eta_t = rnd(G * per, i), rnd(G * per, o)
    l_off = (torch.arange(G + 1) * per).to(torch.int32).cuda()
    alpha = torch.full((G,), 1e-3, device="cuda")
    return [
        ("segment_matmul", "half", "grouped_lowrank z = h v_g^T", 2.0 * T * d * r,
         lambda: segment_matmul(h, v, off)),
        ("segment_matmul", "bf16x3", "grouped_lowrank z u_g^T + epilogue", 2.0 * T * d * r,
         lambda: segment_matmul(z, u, off, bias=bias, scale=bias, shift=bias, relu=True, residual=h)),
        ("grouped_outer", "half", "grouped_outer sss", 2.0 * T * o * i,
         lambda: launch_grouped_outer(eta, mu, off, 3)),
        ("grouped_outer_select", "half", "grouped_outer sss backward: selection pass", 2.0 * T * o * i,
         lambda: launch_grouped_outer(eta, mu, off, 3, select=True)),
        ("grouped_outer", "half", "segmented_fisher (125 edits)", 2.0 * Tf * o * i,
         lambda: segmented_fisher(f_eta, f_mu, f_off)),
        ("grouped_outer", "tf32x3", "grouped_lowrank backward du (none)", 2.0 * T * d * r,
         lambda: launch_grouped_outer(da, z, off, MODE_NONE, precision_from=(bf,))),
        ("group_scores", "half", "lowrank_delta_linear forward (whole op)", 2.0 * N * (i * o + per * (i + o)),
         lambda: lowrank_delta_linear(x, weight, lbias, row_group, mu_t, eta_t, l_off, alpha)),
        ("grouped_bilinear", "bf16x3", "lowrank_delta_linear forward (whole op)", 2.0 * N * (i * o + per * (i + o)),
         lambda: lowrank_delta_linear(x, weight, lbias, row_group, mu_t, eta_t, l_off, alpha)),
    ]


def _dense_choices(gen, reps: int) -> None:
    """lowrank_delta_linear's dense part x Wᵀ (bf16 in, fp32 out) three ways: the one-group
    segment_matmul it uses, cuBLAS with an fp32 output (`torch.mm(out_dtype=)`, where this torch
    has it) and cuBLAS in bf16 (its output rounded to bf16: the rate ceiling, not an option)."""
    N, o, i = 2048, 6400, 1600
    x = torch.randn(N, i, generator=gen).to(torch.bfloat16).cuda()
    w = torch.randn(o, i, generator=gen).to(torch.bfloat16).cuda()
    offsets = one_group(N, "cuda")  # as lowrank_delta_linear's _dense calls it
    choices = [("segment_matmul, fp32 out", lambda: segment_matmul(x, w[None], offsets)),
               ("torch.mm out_dtype=fp32", lambda: torch.mm(x, w.T, out_dtype=torch.float32)),
               ("torch.mm bf16 out", lambda: torch.mm(x, w.T))]
    for name, fn in choices:
        try:
            ms = _median_ms(fn, reps)
        except Exception as exc:  # out_dtype is missing from older torch builds
            print(f"  dense x W^T: [{name}] failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        print(f"  dense x W^T (2048x1600 -> 6400): [{name}] {ms:.3f} ms, {2.0 * N * o * i / ms / 1e9:.0f} TFLOP/s",
              flush=True)


def _lowrank_args(gen, T, G, d, r, dtype, device):
    """(h, offsets, u, v, bias) of one grouped_lowrank layer, u and v scaled as a trained editor's."""
    h = torch.randn(T, d, generator=gen).to(dtype).to(device)
    u = (torch.randn(G, d, r, generator=gen) * 0.01).to(dtype).to(device)
    v = (torch.randn(G, r, d, generator=gen) * 0.01).to(dtype).to(device)
    bias = torch.randn(G, d, generator=gen).to(dtype).to(device)
    return h, _ragged(T, G, gen, device), u, v, bias


def split_choices(gen, reps: int, T=4096, G=8, d=8000, r=1920, device="cuda") -> list:
    """grouped_lowrank forward (bf16, benchmark shape) with z split into 3, 2 or 1 bf16 pieces
    (DCEDIT_TRITON_FP32_SPLIT), against one bf16 torch.mm of the same FLOPs (h @ a d × 2r
    matrix): issue 5's "60% of dense matmul" reads off the last column.  Returns the printed lines."""
    from .grouped_lowrank import grouped_lowrank

    args = _lowrank_args(gen, T, G, d, r, torch.bfloat16, device)
    h = args[0]
    flops = 4.0 * T * d * r
    dense = torch.randn(d, 2 * r, generator=gen).to(torch.bfloat16).to(device)
    lines = []
    dense_ms = _median_ms(lambda: torch.mm(h, dense), reps)
    lines.append(f"  dense bf16 torch.mm {T}x{d} @ {d}x{2 * r}: {dense_ms:.3f} ms, "
                 f"{flops / dense_ms / 1e9:.0f} TFLOP/s")
    print(lines[-1], flush=True)
    previous = os.environ.get(launch.FP32_SPLIT_ENV)
    try:
        for pieces in (3, 2, 1):
            os.environ[launch.FP32_SPLIT_ENV] = str(pieces)
            ms = _median_ms(lambda: grouped_lowrank(*args), reps)
            lines.append(f"  grouped_lowrank, z in {pieces} bf16 piece(s): {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, "
                         f"{100.0 * dense_ms / ms:.0f}% of dense")
            print(lines[-1], flush=True)
    finally:
        if previous is None:
            os.environ.pop(launch.FP32_SPLIT_ENV, None)
        else:
            os.environ[launch.FP32_SPLIT_ENV] = previous
    return lines


def fp32_choices(gen, reps: int, T=3000, G=8, d=8000, r=1920, device="cuda") -> list:
    """An fp32 editor's MLP layer (grouped_lowrank, fp32 h/u/v, an editor's shape: ~3000 tokens,
    d 8000, r 1920) on Triton and on the reference (a cuBLAS GEMM per group), under torch's
    "highest" and "high" float32 matmul precision: whether Triton's FMA dot (IEEE fp32) or its
    one-pass TF32 dot beats cuBLAS, which decides where fp32 editors should run.  Returns the
    printed lines."""
    from .. import reference
    from .grouped_lowrank import grouped_lowrank

    args = _lowrank_args(gen, T, G, d, r, torch.float32, device)
    flops = 4.0 * T * d * r
    lines = []
    for setting in ("highest", "high"):
        with launch.fp32_matmul_precision(tf32=setting == "high"):  # the caller's setting back after
            for name, fn in (("triton", grouped_lowrank), ("reference", reference.grouped_lowrank)):
                ms = _median_ms(lambda: fn(*args), reps)
                lines.append(f"  fp32 grouped_lowrank ({setting}), {name}: {ms:.3f} ms, "
                             f"{flops / ms / 1e9:.0f} TFLOP/s")
                print(lines[-1], flush=True)
    return lines


def _median_ms(fn, reps: int) -> float:
    fn()  # compile
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    # None under `python -OO`, which drops docstrings (splitlines raised AttributeError before any argument).
    parser = argparse.ArgumentParser(description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--only", default="", help="cases whose label contains this")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--tables", action="store_true", help="only the precision/dense tables")
    part.add_argument("--sweep", action="store_true", help="only the launch-config sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or launch.interpreting():
        print("tune: needs a CUDA device and TRITON_INTERPRET unset", file=sys.stderr)
        return 3
    gen = torch.Generator().manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}; rates count useful flops only", flush=True)
    # The precision/speed choices first (few compiles): the config sweep below may run out of time.
    if not args.sweep:
        if args.only in "split":
            split_choices(gen, args.reps)
        if args.only in "fp32":
            fp32_choices(gen, args.reps)
        if args.only in "dense":
            _dense_choices(gen, args.reps)
    if args.tables:
        return 0
    for kernel, path, label, flops, fn in _cases(gen):
        if args.only not in label:
            continue
        results = []
        with launch.chosen_tiles() as chosen:  # the heuristic's config, from one unforced call
            fn()
        heuristic = chosen.get(kernel)
        candidates = list(launch.CANDIDATES[kernel][path])
        if heuristic is not None and heuristic not in candidates:
            candidates.insert(0, heuristic)
        for n, cfg in enumerate(candidates):
            is_heuristic = cfg == heuristic
            name = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in cfg.items())
            try:
                with launch.forced_tiles(kernel, **cfg):
                    ms = _median_ms(fn, args.reps)
            except Exception as exc:  # a candidate that does not fit this GPU: report, go on
                print(f"  {label}: [{name}] failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            results.append((ms, n, name))
            print(f"  {label}: [{name}]{' (heuristic)' if is_heuristic else ''} {ms:.3f} ms, "
                  f"{flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        if results:
            ms, n, name = min(results)
            mine = [res[0] for res in results if candidates[res[1]] == heuristic]
            versus = ("the heuristic's" if candidates[n] == heuristic else f"heuristic {mine[0]:.3f} ms" if mine
                      else "heuristic failed")
            print(f"best {kernel}/{path} for {label}: [{name}] {ms:.3f} ms ({versus})", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
