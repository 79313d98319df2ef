"""One benchmark case: the fused op and the eager reference timed in the same run, alternately
(`measure.time_fns`: the ratio and the reported times), their peak memory and the share of the
device roofline, in extra_info; pytest-benchmark's own table times the fused op again."""

import math

from measure import peak_extra_bytes, time_fn, time_fns


def compare(benchmark, device, ceilings, fused, eager, *, flops=0.0, bytes_moved=0.0,
            output_bytes=None, target_speedup=None, rounds=None):
    if eager is not None:
        fused_s, eager_s = time_fns([fused, eager], device, min_runs=5, min_seconds=0.6)
    else:
        fused_s, eager_s = time_fn(fused, device), math.nan
    fused_peak = peak_extra_bytes(fused, device)
    eager_peak = peak_extra_bytes(eager, device) if eager is not None else math.nan
    on_gpu = device.startswith("cuda")
    benchmark.pedantic(fused, rounds=rounds or (20 if on_gpu else 3), iterations=1, warmup_rounds=1)
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
    }
    if output_bytes:
        info["fused_peak_over_output"] = fused_peak / output_bytes
    if target_speedup is not None:
        info["target_speedup"] = target_speedup
        info["target_met"] = bool(on_gpu and info["speedup"] >= target_speedup)
    benchmark.extra_info.update(info)
    return info
