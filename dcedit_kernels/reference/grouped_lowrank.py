import torch

from .._checks import compute_dtype
from .segments import segment_bounds


def _clamp_min_0(pre):
    """clamp(pre, min=0), values and NaN included, with the gradient [pre >= 0] on every torch.
    Autograd through `pre.clamp(min=0)` gives 1 at exactly 0 up to torch 2.13 but 0 on torch 2.15
    (relu's), and MEND's initialisation (u = 0) puts every pre-activation at exactly 0."""
    return torch.where(pre >= 0, pre, pre.clamp(min=0))


def grouped_lowrank(h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    """out_t = h_t + clamp((((gain_t ⊙ h_t) v_gᵀ) u_gᵀ + bias_g) ⊙ scale_g + shift_g, min=0)."""
    acc = compute_dtype(h, u, v, bias, scale, shift, gain)
    hh = h.to(acc)
    x = hh if gain is None else hh * gain.to(acc)
    pieces = []
    for g, (s, e) in enumerate(segment_bounds(offsets)):
        if s == e:
            continue
        pre = (x[s:e] @ v[g].to(acc).T) @ u[g].to(acc).T + bias[g].to(acc)
        if scale is not None:
            pre = pre * scale[g].to(acc)
        if shift is not None:
            pre = pre + shift[g].to(acc)
        pieces.append(hh[s:e] + _clamp_min_0(pre))
    if not pieces:
        return hh.new_empty((0, h.shape[1])) + 0 * hh.sum()
    return torch.cat(pieces, 0)


def _mm_into(out, a, b):
    """out ← a @ b, written into out.  `du[g] = da.T @ z` made each group's d × r product a new tensor
    and copied it in: in training the backward's largest temporary, at the step's peak (SmolLM2 fp32,
    MoEditor on down_proj 27-29, 32 CounterFact edits, 1 thread, the profiler's allocation events:
    411.1 MiB, of which one (2112, 1920) product, 15.5 MiB).  The same values: torch's mm into a
    slice and into a new tensor were equal bit for bit (fp32 and fp64, 80 random shapes and
    2112 × 1920 from 80 tokens).  Under autograd (a double backward) as an assignment, since mm's
    out= has no derivative."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or out.requires_grad):
        out.copy_(a @ b)
    else:
        torch.mm(a, b, out=out)


def _zero_weight_grads(u, v, bias, scale, shift, acc) -> list:
    """[du, dv, db, ds, dc]: zeros in `acc` of the weights' shapes (ds, dc None without scale, shift)."""
    return [None if w is None else torch.zeros(w.shape, dtype=acc, device=w.device) for w in (u, v, bias, scale, shift)]


def _backward_grads(dh, h, weight_grads, weights, dgain) -> list:
    """The backward op's list: dh in h's dtype (contiguous), each present weight's gradient in that
    weight's dtype (u, v, bias[, scale][, shift]), then dgain when gain was given."""
    grads = [dh.to(h.dtype).contiguous()]
    grads += [g.to(w.dtype) for g, w in zip(weight_grads, weights) if w is not None]
    return grads if dgain is None else grads + [dgain]


def grouped_lowrank_backward(grad, h, offsets, u, v, bias, scale=None, shift=None, gain=None):
    """Gradients of grouped_lowrank for (h, u, v, bias[, scale][, shift][, gain]).

    dpre = dout where pre >= 0, else 0 (clamp's gradient at exactly 0 is 1, which MEND relies on:
    u = 0 at initialisation makes every pre-activation 0).  A select, as clamp's backward: an inf
    or NaN of dout where the clamp cut pre off gives 0 there, not NaN in every gradient of the group.
    Returns a list in argument order, omitting the optional arguments that are None; each gradient
    in its input's dtype.
    """
    acc = compute_dtype(h, u, v, bias, scale, shift, gain, grad)
    hh, dout = h.to(acc), grad.to(acc)
    x = hh if gain is None else hh * gain.to(acc)
    dx = torch.zeros_like(hh)
    du, dv, db, ds, dc = weight_grads = _zero_weight_grads(u, v, bias, scale, shift, acc)
    for g, (s, e) in enumerate(segment_bounds(offsets)):
        if s == e:
            continue
        ug, vg = u[g].to(acc), v[g].to(acc)
        z = x[s:e] @ vg.T
        a = z @ ug.T + bias[g].to(acc)
        pre = a if scale is None else a * scale[g].to(acc)
        if shift is not None:
            pre = pre + shift[g].to(acc)
        dpre = torch.where(pre >= 0, dout[s:e], 0.0)
        if dc is not None:
            dc[g] = dpre.sum(0)
        if ds is not None:
            ds[g] = (dpre * a).sum(0)
        da = dpre if scale is None else dpre * scale[g].to(acc)
        db[g] = da.sum(0)
        _mm_into(du[g], da.T, z)
        dz = da @ ug
        _mm_into(dv[g], dz.T, x[s:e])
        dx[s:e] = dz @ vg
    dh = dout + (dx if gain is None else dx * gain.to(acc))
    # Contiguous, as the fake kernel says (dout, dx and hh keep grad's and h's layouts).
    dgain = None if gain is None else (dx * hh).to(gain.dtype).contiguous()
    return _backward_grads(dh, h, weight_grads, (u, v, bias, scale, shift), dgain)
