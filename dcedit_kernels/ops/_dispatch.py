"""Kernel registration for the `dcedit` ops: which implementation serves which device.

CPU: the C++ kernel when `_C` registered one (it does so at import with TORCH_LIBRARY_IMPL),
else the plain PyTorch reference.  CUDA: the CUDA C++ kernel when built, else the Triton
launcher when triton is installed (on a GPU Triton supports, see `triton_runs_on`; imported on
the first call that needs it, see `triton_launcher`), else the reference (which runs on any device).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import threading

import torch

from .._checks import check_bool, tracing
from .._library import _LIB, DIFFERENTIABLE, has_kernel, refuse_tangents
from .._warn import warn


def triton_installed() -> bool:
    """Whether triton can be found, without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a __spec__
        return False


def _import_triton_kernels():
    return importlib.import_module("dcedit_kernels.triton_kernels")


# Imported on the first call of a Triton launcher, not at `import dcedit_kernels`: triton serves
# only CUDA tensors, yet importing it at registration was most of the package's own import time
# (python -X importtime, medians of 7 runs on a loaded 2-core CPU machine: dcedit_kernels.ops took
# 0.54 s, triton 0.40 s of it; deferred, 0.06 s; torch itself ~2.8-3.0 s either way).
@functools.lru_cache(maxsize=None)
def _triton_module():
    """dcedit_kernels.triton_kernels, imported once; None (after one warning) when the import fails."""
    try:
        return _import_triton_kernels()
    # Found by triton_installed, yet broken: the references serve CUDA.  Not only ImportError: a
    # triton built for another torch or Python can fail its import with AttributeError or RuntimeError.
    except Exception as e:  # noqa: BLE001
        warn(f"triton did not import ({type(e).__name__}: {e}); the reference kernels serve CUDA tensors instead",
             RuntimeWarning)
        return None


def cuda_device_of(args, kwargs) -> torch.device | None:
    """The device of the first CUDA tensor argument (None when there is none)."""
    return next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_cuda), None)


# Triton supports NVIDIA GPUs of compute capability 8.0 and up (its README): the kernels' bf16
# tl.dot, which also carries the bf16 pieces of fp32 tiles, does not compile below that (a T4 is
# 7.5, a V100 7.0).  ROCm devices report their gfx version (9.x and up) and pass.
TRITON_MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def triton_runs_on(index: int) -> bool:
    """Whether the Triton launchers serve CUDA device `index` (else the references do)."""
    return torch.cuda.get_device_capability(index) >= TRITON_MIN_CAPABILITY


def on_supported_gpu(triton_fn, reference_fn):
    """`triton_fn` on a GPU Triton supports, `reference_fn` on an older one (per call, by the
    device of the first CUDA tensor argument; the answer is cached per device) or when the
    deferred import of the Triton kernels failed (see `_triton_module`)."""
    @functools.wraps(triton_fn)
    def run(*args, **kwargs):
        device = cuda_device_of(args, kwargs)
        if device is not None and not triton_runs_on(device.index):  # a CUDA tensor's device has its index
            return reference_fn(*args, **kwargs)
        if _triton_module() is None:
            return reference_fn(*args, **kwargs)
        return triton_fn(*args, **kwargs)

    return run


def on_tensors_device(fn):
    """Run `fn` with the CUDA device of its first CUDA tensor argument made current.

    Triton launches a kernel on the current CUDA device, not on its tensors' device, so a model
    split over GPUs (tensors on cuda:1 while cuda:0 is current) would launch on the wrong one;
    the C++ CUDA kernels hold a c10::DeviceGuard for the same reason.
    """
    @functools.wraps(fn)
    def launch(*args, **kwargs):
        device = cuda_device_of(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return launch


def triton_launcher(name: str | None):
    """The Triton launcher `name` of dcedit_kernels.triton_kernels, on its tensors' device (None
    when triton is not installed).  Its first call imports the Triton kernels (see `_triton_module`)."""
    if not name or not triton_installed():
        return None

    def launch(*args, **kwargs):
        mod = _triton_module()
        if mod is None:
            raise ImportError(f"the Triton launcher {name!r} needs dcedit_kernels.triton_kernels, which did not import")
        return getattr(mod, name)(*args, **kwargs)

    launch.__name__ = launch.__qualname__ = name
    return on_tensors_device(launch)


# op name -> {"CPU": "cpp"|"python"|"reference", "CUDA": "cuda_cpp"|"triton"|"reference"}; "triton" serves
# GPUs of compute capability 8.0 and up, the reference older ones.
REGISTRY: dict[str, dict[str, str]] = {}


def checked(fn, check):
    """`fn` that first runs `check` on the same arguments (the dispatcher passes every schema
    argument positionally).  The C++ kernels check their own inputs; this gives the Python-served
    ones (references, Triton launchers) the same ValueError when `torch.ops.dcedit.<op>` is called
    directly, without the `dcedit_kernels.ops` wrapper (SPEC: every op checks its inputs)."""
    if fn is None or check is None:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        # A call from a dcedit_kernels.ops wrapper (opcall) has run these checks already: on CUDA
        # each offsets check is a device sync, so it is not repeated.
        if not _PRECHECKED.__dict__.pop("on", False):
            check(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


# Set by opcall for the one kernel call it makes, consumed by the first `checked` kernel that
# runs (a C++ kernel consumes nothing: opcall clears the flag after the call either way).
_PRECHECKED = threading.local()


def register(op: str, reference_fn, triton_fn=None, check=None, cpu_fn=None) -> None:
    """Register `reference_fn` (and `triton_fn` for CUDA) where no C++ kernel exists, each behind
    `check` (see `checked`).  `cpu_fn`, when given, serves CPU in the reference's place (a Python
    kernel bit-identical to the reference, "python" in op_backends)."""
    reference_fn, triton_fn = checked(reference_fn, check), checked(triton_fn, check)
    chosen = {}
    if has_kernel(op, "CPU"):
        chosen["CPU"] = "cpp"
    elif cpu_fn is not None:
        _LIB.impl(op, checked(cpu_fn, check), "CPU")
        chosen["CPU"] = "python"
    else:
        _LIB.impl(op, reference_fn, "CPU")
        chosen["CPU"] = "reference"
    if has_kernel(op, "CUDA"):
        chosen["CUDA"] = "cuda_cpp"
    elif triton_fn is not None:
        _LIB.impl(op, on_supported_gpu(triton_fn, reference_fn), "CUDA")
        chosen["CUDA"] = "triton"
    else:
        _LIB.impl(op, reference_fn, "CUDA")
        chosen["CUDA"] = "reference"
    REGISTRY[op] = chosen


def op_backends() -> dict[str, dict[str, str]]:
    """Which implementation serves each op on CPU and on CUDA in this process (outside
    `reference_mode`, where the wrappers call the references whatever this says).  "triton" is
    what is registered while triton is not yet imported (the first CUDA call imports it); once
    that import failed, those ops say "reference", which then serves them (`on_supported_gpu`).
    Per process, not per device: on a GPU of compute capability below 8.0 (`triton_runs_on`) the
    references serve the ops that say "triton" here."""
    failed = triton_import_failed()
    return {op: {key: "reference" if failed and name == "triton" else name for key, name in v.items()}
            for op, v in REGISTRY.items()}


def triton_import_failed() -> bool:
    """Whether the deferred import of the Triton kernels was tried and failed (tries none itself)."""
    return _triton_module.cache_info().currsize > 0 and _triton_module() is None


# Per thread, as torch's own modes (grad mode, autocast): one thread's reference_mode neither
# reaches another's calls nor, when blocks of two threads interleave, outlives its own block.
_REFERENCE_MODE = threading.local()


def in_reference_mode() -> bool:
    return getattr(_REFERENCE_MODE, "on", False)


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    """Run the public op wrappers on the plain PyTorch references (the eager baseline).

    Autograd then flows through the references' own torch ops; useful to compare the fused path
    with eager PyTorch end to end (benchmarks) and to debug a kernel.  Per thread, as grad mode.
    `enabled=False` runs the kernels inside the block (also within an enclosing reference_mode);
    the previous setting comes back on exit.  `enabled` must be a bool (ValueError otherwise).
    """
    # Read for its truth, "no" (or 1, np.True_, a 0-dim tensor) turned the references on without a
    # word, and in_reference_mode() returned it.  A bool, as torch.set_grad_enabled takes.
    check_bool(enabled, "enabled")
    previous = in_reference_mode()
    _REFERENCE_MODE.on = enabled
    try:
        yield
    finally:
        _REFERENCE_MODE.on = previous


def backward_op(name: str, *tensors):
    """The backward of op `name`: its kernel (`_<name>_backward`), or, when autograd is to
    differentiate the backward itself (create_graph=True, a double backward, gradgradcheck) and
    one of `tensors` requires grad, the reference's `<name>_backward`.

    The backward kernels have no autograd of their own: differentiated, the C++ ones failed deep
    inside ("mm(): functions with out=... arguments don't support automatic differentiation") or,
    for fusion "add", ran under torch's deprecated not-implemented fallback.  The references are
    plain torch ops, so autograd differentiates them.  A backward runs with grad mode on only
    under create_graph=True, so ordinary training keeps the kernels.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        from .. import reference

        return getattr(reference, f"{name}_backward")
    return opcall(f"_{name}_backward")


def opcall(name: str):
    """The op `name` as the wrappers call it, after running its checks themselves: the reference
    in `reference_mode`, else the dispatcher's op, told not to check again (see `checked`)."""
    if in_reference_mode() and not name.startswith("_"):
        from .. import reference

        return getattr(reference, name)
    op = getattr(torch.ops.dcedit, name).default
    # torch.func.jvp's tangents are visible here, not in the op's own check (`_library.refuse_tangents`).
    forward_ad_checked = name in DIFFERENTIABLE

    def call(*args, **kwargs):
        if tracing():  # the trace skipped the value checks: the kernel runs them when the graph runs
            return op(*args, **kwargs)
        if forward_ad_checked:
            refuse_tangents(name, (*args, *kwargs.values()))
        try:  # (set inside: a Ctrl-C between the set and the try left it on for the thread's next call)
            _PRECHECKED.on = True
            return op(*args, **kwargs)
        finally:
            _PRECHECKED.__dict__.pop("on", None)

    return call
