"""Input validation shared by every op: bad input raises ValueError naming the argument.

Checks run before any output is allocated or any tensor is written, so an op that raises leaves
everything as it was.  Checking offsets reads them on the host (one small copy); that is the
price of a clear error instead of an out-of-bounds kernel.  While torch.compile traces a call the
value checks are skipped and the kernel runs them when the graph runs (`tracing`).
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import numpy as np
except ImportError:  # not a dependency of the package (torch imports it where it is installed)
    np = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)
# The most rows int32 offsets count (the ops' CSR form, SPEC): past it a cumulative sum cast to int32
# wraps to negative offsets.
MAX_INT32_ROWS = 2**31 - 1


def check_tensor(t, name: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_items(items, name: str, item_type: type, item_label: str) -> list:
    """A non-empty sequence (not a lone item) whose elements are all `item_type`; returns a list.

    Shared by the request and text validators so both say the same thing for the same mistake.
    """
    if isinstance(items, item_type):
        raise ValueError(f"{name} must be a sequence of {item_label}, got a single {item_label}")
    try:
        out = list(items)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {item_label}, got {type(items).__name__}") from None
    if not out:
        raise ValueError(f"{name} must not be empty")
    for i, item in enumerate(out):
        if not isinstance(item, item_type):
            article = "an" if item_label[0] in "AEIOUaeiou" else "a"
            raise ValueError(f"{name}[{i}] must be {article} {item_label}, got {type(item).__name__}")
    return out


def lone_surrogate(text: str) -> str | None:
    """Where `text` is not valid Unicode, e.g. "'\\ud83c' at index 6", else None.  JSON's "\\ud83c"
    escape (half an emoji pair, as a truncated string keeps it) loads as such a str, which the
    tokenizers refuse with a TypeError that names no text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{text[e.start]!r} at index {e.start}"
    return None


def check_text(text: str, name: str) -> None:
    """ValueError naming `name` for a str the tokenizers cannot take as a prompt or target: blank,
    or not valid Unicode (`lone_surrogate`; the tokenizer would raise a TypeError naming no text)."""
    if not text.strip():
        raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    bad = lone_surrogate(text)
    if bad:
        raise ValueError(f"{name} is not valid Unicode (a lone surrogate {bad})")


def is_int(x) -> bool:
    """A Python int, not a bool (True would pass isinstance(x, int) as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed and torch.Generator.manual_seed take


def is_torch_seed(x) -> bool:
    """An int (not a bool) torch can seed with: one outside SEED_RANGE raised a bare "Overflow when
    unpacking long long" from manual_seed, naming no argument."""
    return is_int(x) and SEED_RANGE[0] <= x <= SEED_RANGE[1]


def check_seed(value, name: str = "seed", none_ok: bool = False) -> None:
    """ValueError naming `name` unless `value` is a seed torch takes (`is_torch_seed`), or None when
    `none_ok`."""
    if not (is_torch_seed(value) or (value is None and none_ok)):
        raise ValueError(f"{name} must be an int in [-2**63, 2**64 - 1]{' or None' if none_ok else ''}, got {value!r}")


def check_bool(value, name: str) -> None:
    """ValueError naming `name` unless `value` is a bool: a flag read for its truth took "False" as
    true (and None as false) without a word."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def is_number(x) -> bool:
    """A Python int or float, not a bool (settings that configs and checkpoints store as JSON)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_finite_number(x) -> bool:
    """`is_number` and neither inf nor NaN.  An int beyond float's range (10**400) is not one:
    math.isfinite raised OverflowError for it, from every check that asks this."""
    if not is_number(x):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _finite_flag(t: torch.Tensor) -> torch.Tensor | None:
    """A 0-dim bool tensor on t's device, True when every entry of t is finite; None when t holds
    nothing that can be non-finite (an integer or empty tensor).  Its min and max are finite exactly
    when every entry is (a NaN propagates through both): one read of t and no temporary of its size,
    where isfinite is four passes (==, abs, !=, and) with three t-sized temporaries (0.6-0.7 ms
    against 0.10-0.14 ms on a 1024 × 256 fp32 weight, CPU, 2 threads)."""
    if t.is_complex():
        return torch.isfinite(t).all()
    if not t.is_floating_point() or t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def all_finite(t: torch.Tensor) -> bool:
    """`bool(torch.isfinite(t).all())`, in one read of t (`_finite_flag`) and one device sync; an
    edit checks it twice per weight."""
    flag = _finite_flag(t)
    return True if flag is None else bool(flag)


def all_finite_many(tensors) -> bool:
    """`all(all_finite(t) for t in tensors)` (None entries skipped) with one device sync per
    device, not one per tensor: each tensor's answer stays on its device until they are all
    combined.  A training step checks every editor gradient, an edit every layer's shift: on a GPU,
    a sync per tensor stalled the host once per parameter (per layer) per step."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        flag = None if t is None else _finite_flag(t)
        if flag is not None:
            flags.setdefault(t.device, []).append(flag)
    return all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())


def first_non_finite(named) -> str | None:
    """The first name of `named` ({name: tensors}) whose tensors are not all finite, or None when
    all are: one device sync per device for all of them (`all_finite_many`), the names read one by
    one only when one is not, to name it.  The checks of every layer's factors, shift or weight."""
    if all_finite_many(t for tensors in named.values() for t in tensors):
        return None
    return next(name for name, tensors in named.items() if not all_finite_many(tensors))


def check_path(value, name: str, none_ok: bool = False) -> None:
    """ValueError naming `name` unless `value` is a path: a non-empty str or os.PathLike of a str (or
    None when `none_ok`).  pathlib's TypeError ("expected str, bytes or os.PathLike object, not
    int") named no argument, bytes paths are not ones pathlib takes, and "" is Path("."), the
    current folder; nor one holding a NUL character, which no file system takes."""
    if value is None and none_ok:
        return
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str) or not os.fspath(value):
        shown = repr(value) if isinstance(value, (str, bytes)) else type(value).__name__
        raise ValueError(f"{name} must be a path{' or None' if none_ok else ''} (a non-empty str or "
                         f"os.PathLike), got {shown}")
    if "\0" in os.fspath(value):  # no file can have it: open() said "embedded null byte", naming nothing,
        # and the existence checks said "not found" (os.path.exists is False for it)
        raise ValueError(f"{name} must be a path without a NUL character, got {os.fspath(value)!r}")


def is_real_number(x) -> bool:
    """A real scalar that float() takes as the op's number: Python's or NumPy's, not a bool, and
    not a Python int beyond float's range (float() raises OverflowError for 10**400)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    if isinstance(x, int):  # only ints can overflow float(); a SymFloat is not read here
        try:
            float(x)
        except OverflowError:
            return False
    return True


def check_real_number(x, name: str, what: str = "a real number") -> None:
    """ValueError naming `name` unless `x` is a real number (`is_real_number`) within float64's
    range (`check_float64_range`; inf and NaN are left to the caller).  An int beyond it (10**400)
    said "must be a real number, got int", which it is, and a Fraction beyond it passed to float()'s
    bare OverflowError (fisher_mask's keep and threshold).  A Python float is within it already, and
    so is an int that is_real_number takes (it tried float() on it)."""
    if is_real_number(x):
        if not isinstance(x, (float, int)):
            check_float64_range(x, name)
        return
    if is_int(x):
        check_float64_range(x, name)  # raises: is_real_number refuses an int only when float() overflows
    refuse_traced_numpy(x, name)
    raise ValueError(f"{name} must be {what}, got {type(x).__name__}")


def refuse_traced_numpy(x, name: str) -> None:
    """While torch.compile traces, a ValueError for a NumPy scalar `x` (np.float32(0.5), which eager
    calls take): dynamo traces one as a 0-d ndarray backed by a tensor, whose value is a graph input
    that no check can read while tracing.  Refused, the call breaks the graph and runs eagerly, all
    checked, without fullgraph; under fullgraph=True dynamo's Unsupported carries this message (it
    was "must be a real number, got ndarray", a type the caller never passed).  Taken as it is, the
    value went unchecked: check_finite_alpha, compiled as a frame of its own after the graph break,
    let np.float64('inf') through to grouped_outer's output once it had run with np.float64(0.3)."""
    if tracing() and np is not None and isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a Python number under torch.compile(fullgraph=True): dynamo traces a NumPy "
                         f"scalar as a 0-d array, whose value cannot be checked while tracing; pass float({name})")


def check_float64_range(x, name: str) -> None:
    """ValueError naming `name` when a finite number `x` of a wider type is beyond float64's range:
    float() raised a bare OverflowError for Fraction(10**400) ("integer division result too large
    for a float") and rounded np.longdouble("1e400") (x86's 80-bit long double) to inf, which
    check_finite_alpha then called not finite.  An inf or NaN `x` is left to the caller."""
    try:
        a = float(x)
    except OverflowError:
        a = None
    if a is None or (math.isinf(a) and x != a):
        # Not repr() of an overflowing one: repr(Fraction(10**5000)) raises ValueError on Python >= 3.11
        # (int to str beyond 4300 digits).
        kind = type(x).__name__
        shown = repr(x) if a is not None else f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind} too large for a float"
        raise ValueError(f"{name} must be within float64's range, got {shown}")


def check_finite_alpha(alpha) -> None:
    """ValueError unless a number `alpha` (the op wrappers' scale, already `check_real_number`'s, which
    refuses one beyond float64's range) is finite:
    apply_shift_ with alpha NaN wrote NaN into every kept entry of the weight, and inf wrote inf (NaN
    where delta is 0); grouped_outer and lowrank_delta_linear gave NaN/inf shifts or outputs.  The
    wrappers' check only: the raw torch.ops.dcedit ops and a tensor alpha are left as they are (a
    tensor's value would need a host read, a sync on CUDA)."""
    # a - a is 0 for a finite a, NaN for inf and NaN: math.isfinite's answer, in arithmetic that
    # dynamo traces.  An alpha that changes between torch.compile calls is traced as a dynamic float,
    # where math.isfinite raised dynamo's Unsupported under fullgraph=True for every alpha, and a - a
    # simplifies to 0 (no guard); a NaN or inf alpha is traced as a constant, and refused there (the
    # ValueError; under fullgraph=True dynamo's Unsupported "Observed exception").
    refuse_traced_numpy(alpha, "alpha")  # its value is not a number here: a - a below is 0 for inf too
    a = float(alpha)
    if a - a != 0:
        raise ValueError(f"alpha must be finite, got {alpha!r}: it scales every entry of the shift")


def check_alpha_within(alpha, acc: torch.dtype) -> None:
    """ValueError unless a finite number `alpha` (`check_finite_alpha`'s) is within the range of the
    op's arithmetic dtype `acc`: finite as a Python float, it was infinite there.  lowrank_delta_linear's
    torch.full raised a RuntimeError naming nothing ("value cannot be converted to type float without
    overflow"), and apply_shift_ wrote inf and NaN into an fp32 weight (alpha 1e39); grouped_outer takes
    such an alpha in its arithmetic (its shift, not a weight)."""
    if abs(float(alpha)) > torch.finfo(acc).max:
        raise ValueError(f"alpha must be within {acc}'s range (the op's arithmetic dtype), got {alpha!r}")


def check_fisher_keep(fisher_keep) -> None:
    """ValueError unless `fisher_keep` (an editor's, or a GroupedEdit's, Fisher-mask keep fraction) is
    None or a number in (0, 1]."""
    if fisher_keep is not None and not (is_number(fisher_keep) and 0 < fisher_keep <= 1):
        raise ValueError(f"fisher_keep must be a number in (0, 1] or None, got {fisher_keep!r}")


def check_shape(t, name: str, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_grad(grad, shape: tuple, like, like_name: str) -> None:
    """A backward op's output gradient: a float tensor of `shape` on the device of `like`."""
    check_tensor(grad, "grad")
    check_shape(grad, "grad", shape)
    check_same_device({"grad": grad, like_name: like})


def check_same_device(named: dict) -> None:
    present = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device: {where}")


def tracing() -> bool:
    """True while torch.compile traces a call.  A check must not read tensor values then (the
    trace would have to guard on data, and fullgraph=True fails); the op's kernel runs the whole
    check when the compiled graph runs (`ops._dispatch.opcall`)."""
    return torch.compiler.is_compiling()


def no_values(t: torch.Tensor) -> bool:
    """True for a tensor without values to read on the host: a meta tensor, or a fake one
    (FakeTensorMode, make_fx's "fake" and "symbolic" tracing), whose shapes the fake kernels
    propagate.  Reading a fake one's values raised torch's DataDependentOutputException (make_fx:
    GuardOnDataDependentSymNode) from the wrapper's check, before the op's fake kernel ran."""
    return t.is_meta or is_fake(t)


def launcher_offsets_groups(offsets) -> int:
    """G of the Triton launchers' `offsets`, from its shape only (its values are the op layer's
    `check_offsets`, on the host): ValueError unless an int32/int64 1-D tensor of G+1 >= 2 entries."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in INT_DTYPES:
        raise ValueError("offsets must be an int32 or int64 tensor")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D with G+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    return offsets.shape[0] - 1


def check_offsets(offsets, name: str, total: int) -> int:
    """Validate a CSR offsets vector over `total` rows; returns the number of groups G (its
    values are checked when the call runs, not while torch.compile traces it: `tracing`)."""
    if not isinstance(offsets, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"{name} must be 1-D with G+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    if offsets.dtype == torch.int32 and total > MAX_INT32_ROWS:
        # From shapes, so also on meta and fake tensors and while torch.compile traces, where the value
        # checks below are skipped (a meta call past 2**31 - 1 rows went through); with values, the
        # last offset could only fail to equal the row count, which did not say why.
        raise ValueError(f"{name} is int32, which counts at most {MAX_INT32_ROWS} rows, but there are {total} "
                         f"rows: pass int64 {name}")
    # A meta or fake tensor has no values to read (the device check that follows names a meta one
    # when the other tensors are elsewhere; such a call computes shapes only, as the fake kernels
    # do; a graph traced from fake tensors checks the real values when it runs, as under compile).
    if tracing() or no_values(offsets):
        return offsets.numel() - 1
    host = offsets.detach().cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(host[0])}")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of rows ({total}), got {int(host[-1])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    return offsets.numel() - 1


def check_ids(ids: torch.Tensor, name: str, low: int, high: int, note: str = "") -> None:
    """Every entry of the int tensor `ids` (group or edit indices) in [low, high]: read on the host
    as offsets are, and not while torch.compile traces (`tracing`)."""
    if not ids_readable(ids):
        return
    # Both ends in one copy to the host: int() of min() and of max() was two device syncs per call.
    lo, hi = torch.stack(torch.aminmax(ids)).cpu()
    check_id_range(int(lo), int(hi), name, low, high, note)


def ids_readable(ids: torch.Tensor) -> bool:
    """Whether `check_ids` reads `ids`: not while torch.compile traces, and only ids with values to
    read (none when empty, meta or fake; see check_offsets)."""
    return not (tracing() or not ids.numel() or no_values(ids))


def check_id_range(lo: int, hi: int, name: str, low: int, high: int, note: str = "") -> None:
    """`check_ids`' test, on the smallest and largest id (`lo`, `hi`), read by a caller that reads
    them in one host read with other values (`lowrank_layers._check_rows`)."""
    if lo < low or hi > high:
        raise ValueError(f"{name} entries must be in [{low}, {high}]{note}")


def check_fraction_or_threshold(keep, threshold, values_when_tracing: bool = False) -> None:
    # values_when_tracing: where no kernel will check them when the graph runs (ops.reference_mode,
    # whose references dynamo traces inline: skipped, keep=1.5 went through and apply_shift_ wrote).
    # While torch.compile traces, the numbers' values are left to the kernel, which raises
    # ValueError when the graph runs, as for offsets (fisher_mask's and apply_shift_'s C++ CPU and
    # CUDA kernels check them with the same messages; the references run this check behind
    # `ops._dispatch.checked`): raised during the trace, the ValueError became dynamo's Unsupported
    # "Observed exception" under fullgraph=True.  Their types are checked either way: a str cannot
    # reach the op's `float?` arguments.
    values_now = values_when_tracing or not tracing()
    if values_now and (keep is None) == (threshold is None):
        raise ValueError("give exactly one of keep or threshold")
    for name, value in (("keep", keep), ("threshold", threshold)):
        # A number as alpha is (`is_real_number`): float() would take a str ("0.5"), a bool or a
        # 0-dim tensor (a host sync on CUDA) without a word.
        if value is not None:
            check_real_number(value, name)
    if not values_now:
        return
    if keep is not None and not (0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    # fisher > NaN is False everywhere: a NaN threshold would silently drop every entry.  ±inf is
    # a real request (keep all, keep none), so the requirement is "not NaN", not "finite".  NaN is
    # the one value unequal to itself (math.isnan raises OverflowError on an int too large for a float).
    if threshold is not None and threshold != threshold:
        raise ValueError("threshold must not be NaN")


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), else float32 (fp32 accumulation)."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_delta_linear_shapes(x, weight, bias, row_group, mu_t, eta_t) -> None:
    """Shapes and dtypes of lowrank_delta_linear's tensors (values are checked by the op layer)."""
    check_tensor(x, "x", 2)
    check_tensor(weight, "weight", 2)
    o, i = weight.shape
    if x.shape[1] != i:
        raise ValueError(f"x must have {i} features to match weight {tuple(weight.shape)}, got {x.shape[1]}")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        if bias.shape[0] != o:
            raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    if not isinstance(row_group, torch.Tensor) or row_group.dtype not in INT_DTYPES:
        raise ValueError("row_group must be an int32 or int64 tensor")
    if tuple(row_group.shape) != (x.shape[0],):
        raise ValueError(f"row_group must have shape ({x.shape[0]},), got {tuple(row_group.shape)}")
    check_tensor(mu_t, "mu_t", 2)
    check_tensor(eta_t, "eta_t", 2)
    if mu_t.shape[1] != i or eta_t.shape[1] != o or mu_t.shape[0] != eta_t.shape[0]:
        raise ValueError(
            f"mu_t must be (Tm, {i}) and eta_t (Tm, {o}), got {tuple(mu_t.shape)} and {tuple(eta_t.shape)}"
        )


def check_autograd(what: str, uses: str = "its capture", model: torch.nn.Module | None = None) -> None:
    """RuntimeError, before anything changes, naming `what` and what it `uses` autograd for, under
    torch.inference_mode (autograd's own error was the bare "element 0 of tensors does not require
    grad"); and when a parameter of `model`, if given, is an inference tensor (the model was built or
    loaded under inference_mode): autograd cannot run through it, and the capture's and FT's own
    errors from torch named the tensor's kind but not the model's load."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} needs autograd for {uses}: call it outside torch.inference_mode()")
    if model is None:
        return
    for name, p in model.named_parameters():
        if p.is_inference():
            raise RuntimeError(f"{what}: the model's parameters are inference tensors (built or loaded under "
                               f"torch.inference_mode()), first {name!r}; autograd cannot run through them. Load "
                               "the model outside inference_mode (torch.no_grad() is fine)")
