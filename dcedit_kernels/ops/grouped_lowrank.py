"""dcedit::grouped_lowrank: MEND's residual low-rank layer for all N_g editors in one launch."""

import torch

from .. import reference
from .._checks import check_grad, check_offsets, check_same_device, check_shape, check_tensor, compute_dtype
from .._library import _LIB, ignoring_autocast
from ..reference.grouped_lowrank import _backward_grads, _mm_into, _zero_weight_grads
from ..reference.segments import segment_bounds
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


# Tokens per chunk of the CPU backward's elementwise passes (see _cpu_backward).
_CHUNK_ROWS = 256


def _cpu_backward(grad, h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    """reference.grouped_lowrank_backward, bit for bit, with bounded temporaries.

    The reference makes every step of a group a new n_g × d tensor (z u_gᵀ, + bias, ⊙ scale,
    + shift, the mask, dpre, dpre ⊙ a, da, dz v_g, then dout + dx) and keeps four of them until it
    returns: at one group of T tokens (MEND) 4-6 T × d tensors at once beside dx.  Here the same
    torch calls on the same operands (every GEMM and every sum over tokens is the reference's own,
    on fresh contiguous tensors of the reference's shapes), but the elementwise steps write into
    the GEMM's output or one n_g × d buffer, chunk by chunk of _CHUNK_ROWS tokens, and dh is written
    into dx.  Elementwise arithmetic is exact per element, so the values do not change.  Measured
    (session 68, 1 thread, T=3000, d=1280, r=64, bias alone, forward + backward of y.square().sum(),
    peak RSS growth): one group 166.9 -> 105.5 MiB, 8 groups 120.1 -> 91.7 MiB.  The weight
    gradients' sums over tokens stay whole (chunked, their summation order, and bits, would change)."""
    acc = compute_dtype(h, u, v, bias, scale, shift, gain, grad)
    with torch.no_grad():
        hh, dout = h.to(acc), grad.to(acc)
        x = hh if gain is None else hh * gain.to(acc)
        T, d = hh.shape
        du, dv, db, ds, dc = weight_grads = _zero_weight_grads(u, v, bias, scale, shift, acc)
        zero = torch.zeros((), dtype=acc, device=hh.device)  # where's `other` with out=: the reference's 0.0
        bounds = [(g, s, e) for g, (s, e) in enumerate(segment_bounds(offsets)) if s < e]
        # One group holding every token (MEND): its dz v_g is dx itself, no T × d zeros beside it.
        dx = None if [(s, e) for _, s, e in bounds] == [(0, T)] else torch.zeros((T, d), dtype=acc, device=hh.device)
        for g, s, e in bounds:
            ug, vg = u[g].to(acc), v[g].to(acc)
            sg = None if scale is None else scale[g].to(acc)
            cg = None if shift is None else shift[g].to(acc)
            z = x[s:e] @ vg.T
            a = z @ ug.T
            a.add_(bias[g].to(acc))  # a = z u_gᵀ + bias_g
            # dpre = where(pre >= 0, dout, 0); into a itself unless ds still needs a.
            dpre = a if sg is None else torch.empty_like(a)
            for c0 in range(0, e - s, _CHUNK_ROWS):
                c1 = min(c0 + _CHUNK_ROWS, e - s)
                pre = a[c0:c1] if sg is None else a[c0:c1] * sg
                if cg is not None:
                    pre = pre + cg
                torch.where(pre >= 0, dout[s + c0:s + c1], zero, out=dpre[c0:c1])
                del pre
            if dc is not None:
                dc[g] = dpre.sum(0)
            if sg is not None:
                ds[g] = torch.mul(dpre, a, out=a).sum(0)  # (dpre ⊙ a).sum(0)
                da = torch.mul(dpre, sg, out=dpre)
            else:
                da = dpre
            del a, dpre
            db[g] = da.sum(0)
            _mm_into(du[g], da.T, z)
            dz = da @ ug
            del da
            _mm_into(dv[g], dz.T, x[s:e])
            if dx is None:
                dx = dz @ vg
            else:
                dx[s:e] = dz @ vg
        if dx is None:  # no tokens
            dx = torch.zeros((T, d), dtype=acc, device=hh.device)
        dgain = None
        if gain is not None:
            dgain = (dx * hh).to(gain.dtype).contiguous()
            torch.mul(dx, gain.to(acc), out=dx)
        dh = torch.add(dout, dx, out=dx)  # dout + dx (⊙ gain)
        return _backward_grads(dh, h, weight_grads, (u, v, bias, scale, shift), dgain)


register("grouped_lowrank", reference.grouped_lowrank, _fwd, check=check_grouped_lowrank)
register("_grouped_lowrank_backward", reference.grouped_lowrank_backward, _bwd and _triton_backward,
         check=check_grouped_lowrank_backward, cpu_fn=_cpu_backward)


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
