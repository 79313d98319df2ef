"""dcedit::grouped_lowrank: MEND's residual low-rank layer for all N_g editors in one launch."""

import torch

from .. import reference
from .._checks import check_grad, check_offsets, check_same_device, check_shape, check_tensor, compute_dtype
from .._library import _LIB, ignoring_autocast
from ._dispatch import backward_op, opcall, register, triton_launcher

_fwd = triton_launcher("grouped_lowrank")
_bwd = triton_launcher("grouped_lowrank_backward")


def _triton_backward(grad, h, offsets, u, v, bias, scale, shift, gain):
    grads = _bwd(grad, h, offsets, u, v, bias, scale, shift, gain)
    return [g for g in grads[:4]] + [g for g in grads[4:] if g is not None]


@torch.library.register_fake("dcedit::grouped_lowrank")
def _(h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    return h.new_empty(h.shape, dtype=compute_dtype(h, u, v, bias, scale, shift, gain))


@torch.library.register_fake("dcedit::_grouped_lowrank_backward")
def _(grad, h, offsets, u, v, bias, scale, shift, gain):
    # Contiguous whatever the inputs' layout, as every kernel returns them (not empty_like, which
    # keeps a transposed h's strides): inductor asserts that the real outputs have the fake's strides.
    return [t.new_empty(t.shape) for t in (h, u, v, bias, scale, shift, gain) if t is not None]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.present = [t is not None for t in inputs[5:]]


def _backward(ctx, grad):
    h, offsets, u, v, bias, scale, shift, gain = ctx.saved_tensors
    kernel = backward_op("grouped_lowrank", grad, h, u, v, bias, scale, shift, gain)
    grads = iter(kernel(grad, h, offsets, u, v, bias, scale, shift, gain))
    dh, du, dv, db = (next(grads) for _ in range(4))
    rest = [next(grads) if present else None for present in ctx.present]
    return (dh, None, du, dv, db, *rest)


torch.library.register_autograd("dcedit::grouped_lowrank", ignoring_autocast(_backward),
                                setup_context=_setup_context)


def check_grouped_lowrank(h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    check_tensor(h, "h", 2)
    T, d = h.shape
    G = check_offsets(offsets, "offsets", T)
    check_tensor(u, "u", 3)
    if u.shape[0] != G or u.shape[1] != d:
        raise ValueError(f"u must have shape (G={G}, d={d}, r), got {tuple(u.shape)}")
    r = u.shape[2]
    check_tensor(v, "v", 3)
    check_shape(v, "v", (G, r, d))
    check_tensor(bias, "bias", 2)
    check_shape(bias, "bias", (G, d))
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(t, name, 2)
            check_shape(t, name, (G, d))
    if gain is not None:
        check_tensor(gain, "gain", 2)
        check_shape(gain, "gain", (T, d))
    check_same_device(dict(h=h, offsets=offsets, u=u, v=v, bias=bias, scale=scale, shift=shift, gain=gain))


def check_grouped_lowrank_backward(grad, h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    """The forward's checks plus grad's (raw calls only: autograd's go through opcall)."""
    check_grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
    check_grad(grad, tuple(h.shape), h, "h")


register("grouped_lowrank", reference.grouped_lowrank, _fwd, check=check_grouped_lowrank)
register("_grouped_lowrank_backward", reference.grouped_lowrank_backward, _bwd and _triton_backward,
         check=check_grouped_lowrank_backward)


# Batching rules of the backward op.  vmap's fallback (one call per slice, stacked) serves the
# other ops, but refuses an op that returns Tensor[], as this one returns the present arguments'
# gradients: "Batching rule not implemented for dcedit::_grouped_lowrank_backward. We could not
# generate a fallback" under torch.vmap (FuncTorchBatched) and under the legacy vmap that
# autograd.grad(is_grads_batched=True), jacobian(vectorize=True) and gradcheck's
# check_batched_grad use (Batched).  Both rules run the same loop.
def _backward_per_slice(slices: list, batch_size: int, args: tuple) -> list:
    """The backward op on each slice (`slices[k]`: the k-th argument's slices, or None where it is
    not batched), stacked along a new dim 0."""
    if batch_size == 0:  # no slice to call: each gradient has its argument's per-slice shape
        return [a.new_empty((0, *(a.shape if sl is None else sl.shape[1:])))
                for k, (a, sl) in enumerate(zip(args, slices))
                if k not in (0, 2) and a is not None]  # grad (0) and offsets (2) get none
    grads = [torch.ops.dcedit._grouped_lowrank_backward.default(
        *[a if sl is None else sl[b] for a, sl in zip(args, slices)]) for b in range(batch_size)]
    return [torch.stack(col) for col in zip(*grads)]


def _backward_vmap(info, in_dims, *args):
    slices = [None if d is None else t.movedim(d, 0) for t, d in zip(args, in_dims)]
    out = _backward_per_slice(slices, info.batch_size, args)
    return out, [0] * len(out)


def _backward_legacy_batched(*args):
    # The innermost legacy vmap level is the current nesting: autograd batches grad there.
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    legacy = torch._C._functorch.is_legacy_batchedtensor
    grad = args[0]
    if not legacy(grad):
        raise NotImplementedError(
            "dcedit::_grouped_lowrank_backward under the legacy vmap batches grad only")
    batch_size = torch._remove_batch_dim(grad, level, 0, 0).shape[0]
    slices = [torch._remove_batch_dim(t, level, batch_size, 0) if t is not None and legacy(t)
              else None for t in args]
    out = _backward_per_slice(slices, batch_size, args)
    return [torch._add_batch_dim(t, 0, level) for t in out]


torch.library.register_vmap("dcedit::_grouped_lowrank_backward", _backward_vmap)  # torch 2.5 on, the declared minimum
_LIB.impl("_grouped_lowrank_backward", _backward_legacy_batched, "Batched")


def grouped_lowrank(h, offsets, u, v, bias, scale=None, shift=None, gain=None) -> torch.Tensor:
    """One residual low-rank layer per group, all groups in one call.

    For token t of group g: ``out_t = h_t + clamp((((gain_t ⊙ h_t) v_gᵀ) u_gᵀ + bias_g) ⊙
    scale_g + shift_g, min=0)``.  h (T, d); offsets int (G+1,); u (G, d, r); v (G, r, d);
    bias/scale/shift (G, d) (None: 1 and 0); gain (T, d) or None.  Returns fp32 (fp64 for fp64).
    """
    check_grouped_lowrank(h, offsets, u, v, bias, scale, shift, gain)
    return opcall("grouped_lowrank")(h, offsets, u, v, bias, scale, shift, gain)
