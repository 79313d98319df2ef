"""Where things live when a model is split across devices (accelerate's `device_map`, or blocks
moved by hand): the placement rules ModelEditor, the trainer and the metrics share.

Everything here only reads devices; nothing copies a tensor.  On a model that sits on one device
every rule answers that device, so single-device code paths stay as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

META = torch.device("meta")


def default_device() -> torch.device:
    """torch.get_default_device(), also where it raises: torch 2.5.1 to 2.9.1 (2.5.1, 2.6.0, 2.7.1,
    2.8.0 and 2.9.1 seen) raise "AttributeError: 'NoneType' object has no attribute 'device'" once
    torch.set_default_device(None) has reset the default (it leaves a None context that
    get_default_device reads; 2.10 does not), and the model builds, batches and training steps that
    read it failed.  The default is then the CPU again, which is what those versions give before
    any set_default_device."""
    try:
        return torch.get_default_device()
    except AttributeError:
        return torch.device("cpu")


def host_scalars_on_cpu():
    """The CPU as the default device for an optimiser's steps under a "meta" default device: torch
    2.11's Adam (the GPU machine's) makes each parameter's step count, a CPU scalar by design, on the
    default device, so under torch.set_default_device("meta") (left on after building a model
    skeleton) its first step raised "Tensor.item() cannot be called on meta tensors" (torch 2.13's
    Adam names the CPU).  Around every optimiser step the package takes: fit's and the FT baselines'.
    Only there: under a GPU default device that count works where it lands, and no optimiser step
    has been run with its own tensors moved to another default device; with no device mode the
    plain hot path is unchanged (a mode routes every op of the step through Python)."""
    return torch.device("cpu") if default_device().type == "meta" else contextlib.nullcontext()


def _execution_device(hook):
    """An accelerate hook's execution device, or None.  Hooks added with `append=True` (layerwise
    casting, a second dispatch) are chained into a SequentialHook, which has none of its own: the
    first of its hooks that has one."""
    execution = getattr(hook, "execution_device", None)
    if execution is None:
        for inner in getattr(hook, "hooks", None) or ():
            execution = _execution_device(inner)
            if execution is not None:
                break
    return execution


def _accelerator_index(index: int) -> torch.device:
    """The device an accelerate hook means by an int execution device: that index of this machine's
    accelerator (accelerate's `normalize_device`: "xpu:1" on an Intel GPU, "npu:1" on Ascend), CUDA
    where torch names none (torch < 2.6 has no `torch.accelerator`; a CPU-only build has none)."""
    try:
        current = torch.accelerator.current_accelerator()
    except (AttributeError, RuntimeError):  # torch < 2.6; 2.6 raises on a CPU-only build
        current = None
    return torch.device(current.type if current is not None else "cuda", index)


def module_device(module: nn.Module) -> torch.device | None:
    """The device `module` computes on: the execution device of an accelerate hook when it has one
    (an offloaded module keeps its weights on "meta" and computes there; of a SequentialHook, its
    first hook's that has one; an int is an index of this machine's accelerator, as accelerate reads
    it), else the device of its first parameter or buffer; None for a module with neither."""
    execution = _execution_device(getattr(module, "_hf_hook", None))
    if execution is not None:
        # An int was read as "cuda:N" on every machine: on an XPU or NPU the inputs went to a CUDA
        # device that is not there ("Torch not compiled with CUDA enabled").
        return _accelerator_index(execution) if isinstance(execution, int) else torch.device(execution)
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def input_embeddings(model: nn.Module):
    """What `model.get_input_embeddings()` returns, or None where the model has no such method or
    it raises NotImplementedError (PreTrainedModel's default for models without one) or
    AttributeError."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (input_ids, masks, labels) go: the input embedding's device.

    With `device_map` the embedding may sit on another device than the edited layers; accelerate's
    hooks (or the caller's) move hidden states between blocks, but the ids must start where the
    embedding is.  Models without `get_input_embeddings` (or whose embedding is on "meta" without a
    hook) fall back to their first resident parameter's device, then to the CPU."""
    embedding = input_embeddings(model)
    device = module_device(embedding) if isinstance(embedding, nn.Module) else None
    if device is None or device == META:
        device = next((p.device for p in model.parameters() if p.device != META), None)
    return device or torch.device("cpu")


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices holding `model`'s parameters and buffers ("meta" left out), in order
    of first appearance."""
    seen: dict[torch.device, None] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.device != META:
            seen.setdefault(t.device, None)
    return list(seen)


def as_device(value, name: str) -> torch.device | None:
    """`value` (None, a str like "cuda:1", an int CUDA index, or a torch.device) as a torch.device;
    ValueError naming `name` for anything else, for "meta" (nothing can compute there), for a
    CUDA, MPS, XPU or MTIA device this machine does not have, and for a device of another type
    this build cannot make a tensor on."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise ValueError(f"{name} must be None, a str, an int or a torch.device, got {type(value).__name__}")
    try:
        device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except RuntimeError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if device.type == "meta":  # by type: "meta:0" is not torch.device("meta"), and was taken
        raise ValueError(f"{name} must be a device that computes, got {str(device)!r}")
    # CUDA, and the other backends torch has a module for (mps, xpu, mtia): present, with that index.
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    available, count = getattr(backend, "is_available", None), getattr(backend, "device_count", None)
    if callable(available) and callable(count):
        if not available() or (device.index or 0) >= count():
            raise ValueError(f"{name}: {device} is not available here ({count()} {device.type.upper()} devices)")
    elif device.type != "cpu":
        # A type torch parses but has no availability check for (hip, vulkan, lazy, xla, an out-of-tree
        # backend): an empty tensor there tells whether this build can use it ("hip" passed here and
        # failed in the editors' .to() with "PyTorch is not linked with support for hip devices").
        try:
            torch.empty(0, device=device)
        except Exception as exc:  # RuntimeError, NotImplementedError, ModuleNotFoundError by backend
            first = str(exc).strip().split(". ")[0]  # torch's dispatcher lists every backend after it
            raise ValueError(f"{name}: {device} is not available here ({type(exc).__name__}: {first})") from None
    return device


def place_editor(layer_devices: Iterable[torch.device], override: torch.device | None = None) -> torch.device:
    """Where the editor shared by weights of one shape lives: `override` when given, else the
    device of the first of those weights (in `layers` order), so that with every layer on one
    device the editor sits beside them (as before multi-device support) and with a split model
    the factors of that first layer need no copy."""
    if override is not None:
        return override
    for device in layer_devices:
        return device
    raise ValueError("layer_devices must not be empty")


def check_resident(weights: dict[str, torch.Tensor], arg: str = "layers") -> None:
    """ValueError naming the first edited layer whose weight is on "meta" (and `arg`, the argument
    that named it): accelerate offloads a module that `device_map` puts on "cpu" or "disk" while a
    GPU is in the map, keeping only a placeholder in the model, so an in-place edit of it would
    change nothing (and a forward patched by `lowrank_edited` would compute on the placeholder)."""
    for name, weight in weights.items():
        if weight.device == META:
            raise ValueError(
                f"{arg}: {name!r} has its weight on the 'meta' device (offloaded by accelerate, or not "
                "loaded): edited layers must be resident on a device; give them GPU or CPU memory in "
                "device_map/max_memory, or move their blocks there by hand")


def cuda_indices(devices: Iterable[torch.device]) -> list[int]:
    """Sorted distinct CUDA device indices among `devices` ("cuda" alone is the current device)."""
    out = set()
    for device in devices:
        if device.type == "cuda":
            out.add(device.index if device.index is not None else torch.cuda.current_device())
    return sorted(out)


def seed_generators(seed: int, devices: Iterable[torch.device] = ()) -> None:
    """torch.manual_seed(seed) for torch's CPU generator and those of `devices` only: each CUDA
    device among them, and the generators of any other accelerator type among them (MPS, XPU), as
    torch.manual_seed seeds them.  torch.manual_seed seeds every CUDA device's generator (queued
    until CUDA starts, where it has not started yet), which a `fork_rng(devices=cuda_indices(devices))`
    around the call leaves changed: a seeded `tiny_model` build, or `fit` on a CPU model, replaced
    the seed a caller had given its GPUs with the library's (the CUDA draws after CUDA started, or
    on a GPU the model does not use, came from the library's seed)."""
    torch.default_generator.manual_seed(seed)
    devices = [torch.device(d) for d in devices]
    for index in cuda_indices(devices):
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
    for kind in dict.fromkeys(d.type for d in devices if d.type not in ("cpu", "cuda", "meta")):
        module = torch.get_device_module(kind)
        seed_all = getattr(module, "manual_seed_all", None) or module.manual_seed  # MPS has one device
        seed_all(seed)
