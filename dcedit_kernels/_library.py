"""The `dcedit` operator library: schemas, the optional compiled `_C`, and backend discovery.

Schemas live here, in Python, rather than in a C++ ``TORCH_LIBRARY`` block, because the package
must import and work without the compiled extension (reference path).  The C++ sources only
register kernels with ``TORCH_LIBRARY_IMPL(dcedit, CPU|CUDA, m)``; the dispatcher accepts a kernel
registered before its schema, so the import order of `_C` and this module does not matter.
"""

from __future__ import annotations

import functools
import importlib
import operator
import os

import torch
from torch.autograd import forward_ad

NAMESPACE = "dcedit"

# One line per op; argument names and order follow SPEC.md.  `float?`/`Tensor?` mirror the
# SPEC's optional arguments.  fisher_mask returns the kept count as a 0-dim int64 tensor so
# that no op has to synchronise with the host.
SCHEMAS = {
    "grouped_lowrank": (
        "grouped_lowrank(Tensor h, Tensor offsets, Tensor u, Tensor v, Tensor bias, "
        "Tensor? scale=None, Tensor? shift=None, Tensor? gain=None) -> Tensor"
    ),
    "grouped_outer": (
        "grouped_outer(Tensor eta, Tensor mu, Tensor offsets, str fusion=\"add\", "
        "float alpha=1.0) -> Tensor"
    ),
    "segmented_fisher": "segmented_fisher(Tensor eta, Tensor mu, Tensor edit_offsets) -> Tensor",
    "fisher_mask": (
        "fisher_mask(Tensor delta, Tensor fisher, float? keep=None, float? threshold=None) "
        "-> (Tensor, Tensor)"
    ),
    "apply_shift_": (
        "apply_shift_(Tensor(a!) weight, Tensor delta, float alpha=1.0, Tensor? fisher=None, "
        "float? keep=None, float? threshold=None) -> Tensor"
    ),
    "lowrank_delta_linear": (
        "lowrank_delta_linear(Tensor x, Tensor weight, Tensor? bias, Tensor row_group, "
        "Tensor mu_t, Tensor eta_t, Tensor offsets, Tensor alpha) -> Tensor"
    ),
    "noisy_topk_gate": (
        "noisy_topk_gate(Tensor feats, Tensor w_gate, Tensor w_noise, int k=1, "
        "Tensor? noise=None) -> (Tensor, Tensor, Tensor)"
    ),
    "sort_by_group": "sort_by_group(Tensor group_of_row, int G) -> (Tensor, Tensor, Tensor)",
    # Backward ops: autograd formulas call these so that they trace under FakeTensor/AOT too.
    "_grouped_lowrank_backward": (
        "_grouped_lowrank_backward(Tensor grad, Tensor h, Tensor offsets, Tensor u, Tensor v, "
        "Tensor bias, Tensor? scale, Tensor? shift, Tensor? gain) -> Tensor[]"
    ),
    "_grouped_outer_backward": (
        "_grouped_outer_backward(Tensor grad, Tensor eta, Tensor mu, Tensor offsets, str fusion, "
        "float alpha) -> (Tensor, Tensor)"
    ),
    "_lowrank_delta_linear_backward": (
        "_lowrank_delta_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor row_group, "
        "Tensor mu_t, Tensor eta_t, Tensor offsets, Tensor alpha) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

# The ops whose kernels read offsets or group ids on the host to check them (`_checks`; one small
# copy and a device sync per call, for a ValueError instead of an out-of-bounds kernel): a sync
# cannot be captured in a CUDA graph, so they carry torch's cudagraph_unsafe tag, which tells
# inductor (mode="reduce-overhead") to leave them out of its CUDA graphs.  fisher_mask and
# apply_shift_ check only shapes and numbers; noisy_topk_gate is a composite of torch ops.
READS_HOST = ("grouped_lowrank", "grouped_outer", "segmented_fisher", "lowrank_delta_linear", "sort_by_group",
              "_grouped_lowrank_backward", "_grouped_outer_backward", "_lowrank_delta_linear_backward")

# torch 2.4.1 to 2.7.1 have no cudagraph_unsafe tag (their inductor cannot be told; 2.8.0 has it): no tag there.
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_schema, tags=(_CUDAGRAPH_UNSAFE,) if _name in READS_HOST and _CUDAGRAPH_UNSAFE else ())

AUTOCAST_KEYS = ("AutocastCPU", "AutocastCUDA")


def _ignore_autocast(name: str) -> None:
    """Run `dcedit::name` as if autocast were off, on CPU and CUDA tensors.

    The ops set their own precision from the dtypes they are given (16-bit inputs: fp32
    accumulation).  Without this, autocast reached the torch matmuls inside a kernel: the C++
    grouped_lowrank, which writes torch's GEMMs into fp32 buffers, raised; the references of
    lowrank_delta_linear and noisy_topk_gate ran their matmuls in bf16 (gates returned in bf16).
    Like `torch.library.register_autocast`, less its input cast.
    """
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    for key in AUTOCAST_KEYS:
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def run(*args, _excluded=excluded, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return op(*args, **kwargs)

        _LIB.impl(name, run, key)


for _name in SCHEMAS:
    _ignore_autocast(_name)

_AUTOCAST_OFF = functools.reduce(operator.or_, (torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
                                                 for key in AUTOCAST_KEYS))


def ignoring_autocast(backward):
    """`backward` (an op's `register_autograd` formula) run as if autocast were off, as the ops
    themselves run (`_ignore_autocast`).  A backward run inside an autocast block (torch advises
    against it, and it is allowed) computed the formulas' own torch matmuls in bf16:
    lowrank_delta_linear's weight gradient was off by up to 3.7e-3 against the same call without
    autocast, and a double backward (create_graph, through the references' backwards) differed."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_OFF):
            return backward(ctx, *grads)

    return run


# The differentiable ops whose gradients are `torch.library.register_autograd` formulas: backward
# (reverse mode) only, as torch.library has no way to register a forward-mode (JVP) formula.  Nor do
# they run under torch.func.grad/vjp/jacrev (torch 2.13): register_autograd wraps a formula in an
# autograd.Function without a setup_context staticmethod, which functorch refuses with a RuntimeError
# ("... it must override the setup_context staticmethod"), torch.library.custom_op's ops too
# (pytorch/pytorch#168393, #179652).  README "Forward-mode AD"; ops.reference_mode() runs them.
DIFFERENTIABLE = ("grouped_lowrank", "grouped_outer", "lowrank_delta_linear", "fisher_mask")


def refuse_tangents(name: str, args) -> None:
    """NotImplementedError when a tensor of `args` carries a forward-mode AD tangent.

    register_autograd's kernel passes a call whose inputs do not require grad straight to the
    kernel, so a dual input's tangent was dropped without a word: the output had no tangent
    (torch.autograd.forward_ad), torch.func.jvp gave a zero tangent and jacfwd an all-zero
    Jacobian.  Outside a dual level unpack_dual returns at once.
    """
    for a in args:
        if isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None:
            raise NotImplementedError(
                f"dcedit::{name} has no forward-mode AD formula (torch.func.jvp, jacfwd, "
                "torch.autograd.forward_ad): only reverse mode (backward, torch.autograd.grad)")


def _refuse_forward_ad(name: str) -> None:
    """`refuse_tangents` for every call of `dcedit::name` under torch.autograd.forward_ad, raw ones
    included: in the ADInplaceOrView kernel, which a call of non-inference tensors passes after
    the autograd one.  Under torch.func.jvp the tangents are no longer visible there (functorch
    has unwrapped them): the `dcedit_kernels.ops` wrappers check them before the call
    (`ops._dispatch.opcall`)."""
    op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def run(*args, **kwargs):
        refuse_tangents(name, (*args, *kwargs.values()))
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op(*args, **kwargs)

    _LIB.impl(name, run, "ADInplaceOrView")


for _name in DIFFERENTIABLE:
    _refuse_forward_ad(_name)


def _load_compiled():
    if os.environ.get("DCEDIT_DISABLE_C", "0") == "1":
        return None
    try:
        return importlib.import_module("dcedit_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name != "dcedit_kernels._C":  # _C is there, but something it imports is not
            _warn_not_loaded(exc)
        return None  # not built: the references serve, as designed
    except (ImportError, OSError) as exc:
        # Built, but it does not load: most often compiled against another torch (an undefined
        # symbol after a torch upgrade).  The references serve all the same; say so, since the
        # C++ kernels going missing without a word only showed as slower (and other-bits) ops.
        _warn_not_loaded(exc)
        return None


def _warn_not_loaded(exc: BaseException) -> None:
    from ._warn import warn

    warn(f"dcedit_kernels: the compiled kernels (dcedit_kernels._C) failed to load ({exc}); the ops run "
         f"their PyTorch references. Rebuild the package against this torch ({torch.__version__}): "
         "pip install --no-build-isolation --force-reinstall --no-deps <checkout or sdist>, or set "
         "DCEDIT_DISABLE_C=1 to use the references without this warning", RuntimeWarning)


_C = _load_compiled()


def has_kernel(op: str, key: str) -> bool:
    """True when a kernel for `dcedit::op` is registered for dispatch key `key` (CPU, CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)


def _triton_available() -> bool:
    """triton imports, and no deferred import of the Triton kernels has failed (op_backends then
    says "reference" for their ops, see `ops._dispatch.triton_import_failed`)."""
    try:
        import triton  # noqa: F401
    # Not only ImportError: a triton built for another torch or Python can fail its import with
    # AttributeError or RuntimeError (the ops then run their references, see ops._dispatch).
    except Exception:  # noqa: BLE001
        return False
    from .ops._dispatch import triton_import_failed

    return not triton_import_failed()


def cuda_built() -> bool:
    """True when `_C` was compiled with the CUDA sources."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def backends() -> dict:
    """Which backends are live in this process.

    ``reference`` is always live; ``cpu_cpp`` needs the compiled `_C`; ``triton`` needs a triton that
    imports (and Triton kernels whose deferred import has not failed) and a CUDA device (or
    ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors), of any compute capability (below
    8.0 the references serve those ops, see `ops._dispatch.triton_runs_on`);
    ``cuda_cpp`` needs `_C` built with the CUDA sources and a CUDA device.
    """
    cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return {
        "reference": True,
        "cpu_cpp": _C is not None,
        "triton": _triton_available() and (cuda or interpret),
        "cuda_cpp": cuda_built() and cuda,
    }
