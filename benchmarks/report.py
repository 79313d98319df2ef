"""One benchmark case: the fused op and the eager reference timed in the same run, alternately
(`measure.time_fns`: the ratio and the reported times), their peak memory and the share of the
device roofline, in extra_info; pytest-benchmark's own table times the fused op again (each round
synchronised, as `time_fns` does).

Before any timing the two sides' results are compared (`measure.disagreement`: ‖fused − eager‖ /
‖eager‖ over every tensor they return) and the case fails above `agree_tol`: a fast result that
is not the eager one is no speedup.  `check`: None compares fused() with eager(); a pair of
callables (fused, eager) compares their results instead (for sides whose return value is not what
they compute, such as an edit that undoes itself); False compares nothing."""

import math

from measure import disagreement, peak_extra_bytes, sync, time_fn, time_fns


def compare(benchmark, device, ceilings, fused, eager, *, flops=0.0, bytes_moved=0.0,
            output_bytes=None, target_speedup=None, rounds=None, check=None, agree_tol=1e-2):
    err = None
    if check is not False and eager is not None:
        check_fused, check_eager = (fused, eager) if check is None else check
        err = disagreement(check_fused(), check_eager())
        if err is not None:
            assert err <= agree_tol, (f"fused and eager results differ: ‖fused − eager‖ / ‖eager‖ = {err:.3g} > "
                                      f"{agree_tol:g}")
    if eager is not None:
        # The check above ran both sides once (Triton compiled and tuned): no second warm-up round,
        # which on the GPU's one timed call would repeat the costliest cases' runs.
        warm = 0 if check is None else 1
        fused_s, eager_s = time_fns([fused, eager], device, warmup=warm, min_runs=5, min_seconds=0.6)
    else:
        fused_s, eager_s = time_fn(fused, device), math.nan
    fused_peak = peak_extra_bytes(fused, device)
    eager_peak = peak_extra_bytes(eager, device) if eager is not None else math.nan
    on_gpu = device.startswith("cuda")

    def fused_synced():  # CUDA runs asynchronously: without the sync the round times the launch
        out = fused()
        sync(device)
        return out

    benchmark.pedantic(fused_synced, rounds=rounds or (20 if on_gpu else 3), iterations=1, warmup_rounds=1)
    floor_s = max(bytes_moved / (ceilings["copy_GBps"] * 1e9), flops / (ceilings["matmul_TFLOPs"] * 1e12))
    info = {
        "device": ceilings["device"],
        "fused_ms": fused_s * 1e3,
        "eager_ms": eager_s * 1e3,
        "speedup": eager_s / fused_s,
        "fused_peak_MiB": fused_peak / 2**20,
        "eager_peak_MiB": eager_peak / 2**20,
        # A case without a counted floor (a whole pipeline) reports n/a, not 0.
        "achieved_GBps": bytes_moved / fused_s / 1e9 if bytes_moved else math.nan,
        "achieved_TFLOPs": flops / fused_s / 1e12 if flops else math.nan,
        "pct_of_roofline": 100.0 * floor_s / fused_s if floor_s else math.nan,
        "copy_GBps_ceiling": ceilings["copy_GBps"],
        "matmul_TFLOPs_ceiling": ceilings["matmul_TFLOPs"],
        # ‖fused − eager‖ / ‖eager‖ of their results (nan: not compared)
        "fused_vs_eager_rel_err": math.nan if err is None else err,
    }
    if output_bytes:
        info["fused_peak_over_output"] = fused_peak / output_bytes
    if target_speedup is not None:
        info["target_speedup"] = target_speedup
        info["target_met"] = bool(on_gpu and info["speedup"] >= target_speedup)
    benchmark.extra_info.update(info)
    return info
