"""MEND's residual low-rank layer for every group, forward and backward.

Forward, two segment_matmul launches:
    z = (gain ⊙ h) v_gᵀ                                   (T × r)
    out = h + clamp((z u_gᵀ + bias_g) ⊙ scale_g + shift_g, min=0)   (fused epilogue)

Backward (a = z u_gᵀ + bias_g, pre = a ⊙ scale + shift, x = gain ⊙ h):
    dpre = dout where pre >= 0, else 0   (clamp's gradient at exactly 0 is 1, as torch gave it up to 2.13
                                (2.15 gives 0): at MEND's initialisation u = 0 and every
                                pre-activation is 0)
    dshift_g = Σ_{t∈g} dpre_t,  dscale_g = Σ dpre_t ⊙ a_t,  da = dpre ⊙ scale_g,
    dbias_g = Σ da_t,  du_g = Σ da_tᵀ z_t,  dz = da u_g,  dv_g = Σ dz_tᵀ x_t,  dx = dz v_g,
    dh = dout + dx ⊙ gain,  dgain = dx ⊙ h.
The four GEMM-shaped terms run in Triton (z and a recomputed by segment_matmul, dz and dx by
segment_matmul with W untransposed, du and dv by grouped_outer "none"); the elementwise terms
and the per-group vector sums (index_add over device-side group ids) are plain torch.

Precision: every GEMM gets `precision_from` = the op's input dtypes, so with 16-bit inputs the
fp32 intermediates (z, da, dz, gain ⊙ h) meet tensor cores as bf16x3 against bf16 tiles and
tf32x3 otherwise (~fp32 accuracy, see `mma`) instead of the IEEE fp32 dot, which runs on the
FMA units.
"""

from __future__ import annotations

import torch

from .._checks import check_same_device, check_tensor, compute_dtype, launcher_offsets_groups
from ..reference.segments import group_ids
from .grouped_outer import MODE_NONE, launch_grouped_outer
from .segment_matmul import segment_matmul


def _check(h, offsets, u, v, bias, scale, shift, gain):
    """Shapes and devices (offset values are checked by the op layer, on the host)."""
    check_tensor(h, "h", 2)
    T, d = h.shape
    G = launcher_offsets_groups(offsets)
    check_tensor(u, "u", 3)
    if u.shape[0] != G or u.shape[1] != d:
        raise ValueError(f"u must have shape (G={G}, d={d}, r), got {tuple(u.shape)}")
    r = u.shape[2]
    check_tensor(v, "v", 3)
    if tuple(v.shape) != (G, r, d):
        raise ValueError(f"v must have shape {(G, r, d)}, got {tuple(v.shape)}")
    for name, t, shape in (("bias", bias, (G, d)), ("scale", scale, (G, d)), ("shift", shift, (G, d)),
                           ("gain", gain, (T, d))):
        if t is None and name != "bias":
            continue
        check_tensor(t, name, 2)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    check_same_device(dict(h=h, offsets=offsets, u=u, v=v, bias=bias, scale=scale, shift=shift, gain=gain))


def grouped_lowrank(h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    """out_t = h_t + clamp((((gain_t ⊙ h_t) v_gᵀ) u_gᵀ + bias_g) ⊙ scale_g + shift_g, min=0).

    h (T, d); offsets int (G+1,); u (G, d, r); v (G, r, d); bias (G, d); scale/shift (G, d) or
    None; gain (T, d) or None.  Returns (T, d) fp32 (fp64 when an input is fp64).
    """
    _check(h, offsets, u, v, bias, scale, shift, gain)
    src = _dtypes(h, u, v, gain)
    # SPEC: float64 anywhere means float64 throughout.  segment_matmul accumulates in the dtype of
    # its own operands, so a float64 u, bias, scale or shift (h, v and gain not) would leave the
    # first GEMM, z = (gain ⊙ h) v_gᵀ, in fp32: h goes in as float64 then.
    x = h.to(torch.float64) if compute_dtype(h, u, v, bias, scale, shift, gain) == torch.float64 else h
    z = segment_matmul(x, v, offsets, gain=gain, precision_from=src)
    return segment_matmul(z, u, offsets, bias=bias, scale=scale, shift=shift, relu=True, residual=h,
                          precision_from=src)


def _dtypes(*tensors):
    return tuple(t.dtype for t in tensors if t is not None)


def _group_sum(rows, gid, G):
    """(G, d) per-group sums of (T, d) rows, without reading group bounds on the host."""
    return torch.zeros((G, rows.shape[1]), dtype=rows.dtype, device=rows.device).index_add_(0, gid, rows)


def grouped_lowrank_backward(grad_out, h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    """Gradients of grouped_lowrank w.r.t. (h, u, v, bias, scale, shift, gain).

    Each gradient has its input's dtype; None where the input is None.
    """
    _check(h, offsets, u, v, bias, scale, shift, gain)
    check_tensor(grad_out, "grad_out", 2)
    if grad_out.shape != h.shape:
        raise ValueError(f"grad_out must have shape {tuple(h.shape)}, got {tuple(grad_out.shape)}")
    check_same_device(dict(grad_out=grad_out, h=h))
    T, G = h.shape[0], offsets.shape[0] - 1
    acc = compute_dtype(grad_out, h, u, v, bias, scale, shift, gain)
    gid = group_ids(offsets, T)
    hh = h.to(acc)
    x = hh if gain is None else hh * gain.to(acc)
    dout = grad_out.to(acc)

    src = _dtypes(grad_out, h, u, v, gain)
    z = segment_matmul(x, v, offsets, precision_from=src)
    a = segment_matmul(z, u, offsets, bias=bias, precision_from=src)
    pre = a
    if scale is not None:
        pre = pre * scale.to(acc)[gid]
    if shift is not None:
        pre = pre + shift.to(acc)[gid]
    # A select, as torch's clamp backward: an infinite (or NaN) dout where the clamp cut pre off
    # gives 0, not inf·0 = NaN in every gradient of the group.
    dpre = torch.where(pre >= 0, dout, 0.0)
    da = dpre if scale is None else dpre * scale.to(acc)[gid]

    d_shift = _group_sum(dpre, gid, G) if shift is not None else None
    d_scale = _group_sum(dpre * a, gid, G) if scale is not None else None
    d_bias = _group_sum(da, gid, G)
    d_u = launch_grouped_outer(da, z, offsets, MODE_NONE, precision_from=src)  # (G, d, r)
    dz = segment_matmul(da, u, offsets, transpose_w=False, precision_from=src)  # da u_g
    d_v = launch_grouped_outer(dz, x, offsets, MODE_NONE, precision_from=src)  # (G, r, d)
    dx = segment_matmul(dz, v, offsets, transpose_w=False, precision_from=src)  # dz v_g
    if gain is None:
        d_h, d_gain = dout + dx, None
    else:
        d_h, d_gain = dout + dx * gain.to(acc), (dx * hh).to(gain.dtype).contiguous()
    return (
        d_h.to(h.dtype).contiguous(),  # contiguous, as the fake kernel says, whatever grad's layout
        d_u.to(u.dtype),
        d_v.to(v.dtype),
        d_bias.to(bias.dtype),
        d_scale.to(scale.dtype) if d_scale is not None else None,
        d_shift.to(shift.dtype) if d_shift is not None else None,
        d_gain,
    )
