"""Timing, peak-memory and roofline helpers for the benchmark suite.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call.
On CPU, the process's resident high-water mark (VmHWM) above its resident size before the call,
after returning freed heap pages to the OS (malloc_trim) and resetting the mark through
/proc/self/clear_refs ("5").  Comparisons where one side runs after the other in the same
process can still flatter the second (memory the allocator kept): cases whose verdict rests on
memory run each side in a fresh subprocess (see `peak_in_subprocess`).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch


def sync(device):
    """Wait for `device`'s queued work (cuda:1's, not the current device's, for "cuda:1")."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fns(fns, device, warmup=1, min_runs=3, min_seconds=0.3, max_runs=50):
    """Median wall time in seconds of each of `fns`, run in rounds under one stopping rule, each
    round starting with the next one in turn: several sides timed so see the same machine state
    (a fused side timed by 3 rounds after a memory measurement read grouped_lowrank at 0.64x of
    eager on CPU where alternating reads 1.24x)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or (time.perf_counter() - start < min_seconds and rounds < max_runs):
        for k in range(len(fns)):
            j = (rounds + k) % len(fns)
            t0 = time.perf_counter()
            fns[j]()
            sync(device)
            times[j].append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(t) for t in times]


def time_fn(fn, device, **kwargs):
    """Median wall time of fn() in seconds (see `time_fns`)."""
    return time_fns([fn], device, **kwargs)[0]


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _malloc_trim():
    """Hand freed heap pages back to the OS so the next call's peak shows in VmHWM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_bytes(fn, device):
    """Peak memory fn() needs above what is held before it (bytes)."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":  # the allocator statistics of `device`, not of the current device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _proc_status_kb("VmRSS")
    out = fn()
    peak = _proc_status_kb("VmHWM") - base
    del out
    return peak * 1024


def measure_device_ceilings(device):
    """(copy bandwidth in bytes/s counting read + write, dense fp32/bf16 matmul FLOP/s)."""
    is_cuda = torch.device(device).type == "cuda"
    # 1 GiB on a GPU: a 256 MiB copy is ~0.12 ms at an H200's 4.3 TB/s, where the launch and the
    # sync's 10-20 µs would understate the bandwidth by 10-15 % (and overstate % of roofline).
    n = (1024 if is_cuda else 32) * 2**20 // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    bw = 2 * n * 4 / t
    m = 8192 if is_cuda else 1024
    dtype = torch.bfloat16 if is_cuda else torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device)
    return bw, 2 * m**3 / t


def describe_device(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _tensors(x):
    """The tensors of a result, in order: a tensor, or lists, tuples, dicts and dataclasses of them."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = [getattr(x, f.name) for f in dataclasses.fields(x)]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def disagreement(a, b) -> float:
    """‖a − b‖ / ‖b‖ over every tensor of two results of the same structure (in float64; None when
    they hold no tensor).  Raises AssertionError when the structures differ."""
    ta, tb = _tensors(a), _tensors(b)
    shapes = [tuple(t.shape) for t in ta], [tuple(t.shape) for t in tb]
    assert shapes[0] == shapes[1], f"fused and eager results differ in structure: {shapes[0]} against {shapes[1]}"
    if not ta:
        return None
    diff = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(ta, tb))
    ref = sum(float(y.double().square().sum()) for y in tb)
    if diff == 0.0:
        return 0.0
    return (diff / ref) ** 0.5 if ref > 0 else float("inf")


def peak_in_subprocess(module: str, func: str, *args) -> float:
    """Peak extra bytes of `module.func(*args)` (which returns them) run in a fresh Python."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import json, {module} as m; print(json.dumps(m.{func}(*{list(args)!r})))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))
