"""How much a GroupedEditor would hold, checked before it is built (`check_editor_fits`).

The constructor builds `n_layers` layers of (G, d, r) factors in a Python loop.  Sizes no machine
can hold did not fail: `GroupedEditor(4, 4, n_layers=10**23)` looped, its resident memory growing
about 110 MB/s, until the process ran out of memory (std::bad_alloc under a 4 GB ulimit after 30 s;
without one, the kernel's OOM killer), and `n_editors`, `rank`, `feat_dim` or `generator_hidden`
large enough that each tensor fits but not all of them filled the machine the same way (torch
refuses a single CPU tensor larger than RAM + swap at once, not a sum of them).  The check refuses
only what cannot be built on this machine: more bytes than the device has, so it bounds nothing a
bigger machine (or GPU) can run.
"""

from __future__ import annotations

import math
import os

import torch

# Python objects of one layer (its LowRankLayer, five Parameters and their tensors), on whatever
# device its tensors are: measured 5.4 KB a layer on "meta" and 5.9 KB on "cpu" (the growth of the
# resident memory over a 50,000-layer editor of one feature; Python 3.11, torch 2.13).  Taken lower,
# so that no count that fits is refused: within 1.5x of the memory a count can still fill it.
LAYER_HOST_BYTES = 4096


def editor_numel(in_features: int, out_features: int, n_editors: int, rank: int, n_layers: int, n_modes: int,
                 norm: bool, feat_dim: int | None, gate_norm: bool, generator_hidden: int | None) -> int:
    """The elements of every parameter and buffer of the GroupedEditor these (checked) settings build:
    feat_dim None where there is no gate, generator_hidden None where there is no ψ.  Exact (a test
    compares it with built editors), as a Python int, so that no size overflows."""
    d = in_features + out_features
    r = min(rank, d)
    G = n_editors
    # u (G, d, r), v (G, r, d), bias (G, d), mode_scale and mode_shift (G, n_modes, d); alpha (n_modes,)
    total = n_layers * G * d * (2 * r + 1 + 2 * n_modes) + n_modes
    if norm:  # RunningNorm: mean, s and std of μ and of η, and the count k
        total += 3 * d + 1
    if feat_dim is not None:  # w_gate and w_noise (feat_dim, G), and gate_norm's FeatureNorm
        total += 2 * feat_dim * G + ((3 * feat_dim + 1) if gate_norm else 0)
    if generator_hidden is not None:  # ψ: fc1 (hidden, d) + bias, fc2 (d, hidden) + bias
        total += 2 * d * generator_hidden + generator_hidden + d
    return total


def device_memory(device: torch.device) -> int | None:
    """The bytes `device` can hold at most, None where that is not known (meta, and devices other
    than the CPU and CUDA).  The CPU: `cpu_memory()`; CUDA: the GPU's total memory."""
    if device.type == "cpu":
        return cpu_memory()[0]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def cpu_memory() -> tuple[int | None, str]:
    """The bytes the CPU can give this process at most, and what they are: physical memory plus
    swap (what Linux's default overcommit heuristic measures a request against), or, where this
    process's cgroup has a lower memory limit (a container's), that limit plus swap: past it the
    kernel's OOM killer ends the process.  (None, "") where the platform does not tell its memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None, ""
    limit = _cgroup_limit()
    if limit is not None and limit < ram:
        return limit + _swap_bytes(), "its cgroup's memory limit + swap"
    return ram + _swap_bytes(), "RAM + swap"


# This process's cgroup memory limit, v2 then v1, read where a container's own cgroup is mounted as
# the root (Docker, Kubernetes; a process in a nested cgroup of a host is not bounded by it here).
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _cgroup_limit() -> int | None:
    """The first of CGROUP_LIMIT_FILES that reads as a limit, in bytes; None where none does, or
    where it is "max" (v2) or v1's unlimited (2**63 − 1 rounded down to a page: 9223372036854771712
    on this machine)."""
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < 2**62 else None
    return None


def _swap_bytes() -> int:
    """Linux's SwapTotal, 0 where /proc/meminfo does not tell it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class EditorTooLargeError(ValueError):
    """An editor this machine cannot hold (`check_editor_fits`): a ValueError, told apart from the
    others so that a command line can print it as a usage error (python/report.py --n-editors)."""


def check_editor_fits(numel: int, n_layers: int, sizes: dict) -> None:
    """EditorTooLargeError (a ValueError), naming `sizes` (the settings that size the editor, name: int), when the editor
    cannot be built here: its `numel` elements, of the default dtype on the default device (where
    the constructor builds them), more than that device holds, or its layers' Python objects more
    than the CPU's memory."""
    settings = ", ".join(f"{name}={value if value < 10**30 else _sci(value)}" for name, value in sizes.items())
    cpu = torch.device("cpu")
    host, host_memory = n_layers * LAYER_HOST_BYTES, device_memory(cpu)
    if host_memory is not None and host > host_memory:  # on any device, "meta" too
        layers = f"{_sci(n_layers)} layer{'s' if n_layers > 1 else ''}"
        raise EditorTooLargeError(f"{settings}: the editor's {layers} would need at least {_bytes(host)} of "
                         f"Python objects, more than the CPU's {_bytes(host_memory)} ({_cpu_what()}); lower n_layers")
    probe = torch.empty(0)  # its device, not torch.get_default_device(): that ignores `with torch.device` before 2.8
    nbytes = numel * probe.element_size()
    memory = device_memory(probe.device)
    if memory is not None and nbytes > memory:
        has = f"the CPU's {_bytes(memory)} ({_cpu_what()})" if probe.device == cpu else f"{probe.device}'s {_bytes(memory)}"
        raise EditorTooLargeError(f"{settings}: the editor would hold {_sci(numel)} parameters and buffers, {_bytes(nbytes)} in "
                         f"{probe.dtype} on {probe.device}, more than {has}; lower these sizes")


def _cpu_what() -> str:
    """What the CPU's memory in a refusal is (`cpu_memory`), read only when refusing: it reads the
    cgroup files and /proc/meminfo again."""
    return cpu_memory()[1] or "RAM + swap"


def _sci(n: int) -> str:
    """A non-negative int of any size as 1.23e+45 (as f"{n:.3g}", which float() overflows past
    1e308 and Python refuses to print past 4,300 digits); as it is below a million."""
    if n < 10**6:
        return str(n)
    exponent = math.floor(math.log10(n))  # math.log10 takes ints of any size
    mantissa = f"{10 ** (math.log10(n) - exponent):.3g}"
    if mantissa == "10":  # rounded up to the next power of ten
        mantissa, exponent = "1", exponent + 1
    return f"{mantissa}e+{exponent}"


def _bytes(nbytes: int) -> str:
    """nbytes in bytes, KiB, ..., EiB, the largest unit that leaves at least 1."""
    for power, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "bytes")):
        if nbytes >= 2**power or power == 0:
            whole = nbytes >> power
            return f"{nbytes / 2**power:.4g} {unit}" if whole < 10**6 else f"{_sci(whole)} {unit}"
