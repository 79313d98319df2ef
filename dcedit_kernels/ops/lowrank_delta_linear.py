"""dcedit::lowrank_delta_linear: a linear layer seen through group g's shift, never formed."""

import torch

from .. import reference
from .._checks import (
    HALF_DTYPES, check_alpha_within, check_delta_linear_shapes, check_finite_alpha, check_grad, check_ids,
    check_offsets, check_real_number, check_same_device, check_tensor, compute_dtype,
)
from .._library import ignoring_autocast
from ._dispatch import backward_op, opcall, register, triton_launcher


def _out_dtype(x, weight, mu_t, eta_t, alpha):
    return compute_dtype(x, weight, mu_t, eta_t, alpha) if x.dtype == torch.float64 else x.dtype


@torch.library.register_fake("dcedit::lowrank_delta_linear")
def _(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=_out_dtype(x, weight, mu_t, eta_t, alpha))


@torch.library.register_fake("dcedit::_lowrank_delta_linear_backward")
def _(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha):
    # Contiguous whatever the inputs' layout, as every kernel returns them (see grouped_outer's).
    return x.new_empty(x.shape), mu_t.new_empty(mu_t.shape), eta_t.new_empty(eta_t.shape), alpha.new_empty(alpha.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, row_group, mu_t, eta_t, offsets, alpha = inputs
    ctx.save_for_backward(x, weight, row_group, mu_t, eta_t, offsets, alpha)
    ctx.bias_dtype = None if bias is None else bias.dtype
    # The forward's accumulation dtype (float64 when any float input is, bias included: SPEC).
    ctx.acc = compute_dtype(x, weight, bias, mu_t, eta_t, alpha)


def _backward(ctx, grad):
    x, weight, row_group, mu_t, eta_t, offsets, alpha = ctx.saved_tensors
    dx, dmu, deta, dalpha = backward_op("lowrank_delta_linear", grad, x, weight, mu_t, eta_t, alpha)(
        grad, x, weight, row_group, mu_t, eta_t, offsets, alpha
    )
    # The layer's own weight and bias (an nn.Linear's require grad): the shift does not depend on
    # them, so theirs are the plain linear layer's gradients, in the forward's accumulation dtype
    # (fp32, float64 when any input is: a float64 weight or bias with fp32 x got fp32 sums before,
    # where reference_mode's autograd gives the float64 ones).
    dweight = dbias = None
    acc = ctx.acc if grad.dtype != torch.float64 else torch.float64
    if ctx.needs_input_grad[1]:
        dweight = (grad.to(acc).T @ x.to(acc)).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        dbias = grad.to(acc).sum(0).to(ctx.bias_dtype)
    return dx, dweight, dbias, None, dmu, deta, None, dalpha


torch.library.register_autograd("dcedit::lowrank_delta_linear", ignoring_autocast(_backward),
                                setup_context=_setup_context)


def lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha) -> torch.Tensor:
    """``y_n = x_n Wᵀ + b + alpha_g (x_n mu_tᵍᵀ) eta_tᵍ`` with g = row_group[n] (−1: unedited).

    x (N, i); weight (o, i); bias (o,) or None; row_group int (N,); mu_t (Tm, i), eta_t (Tm, o)
    grouped by offsets (G+1,); alpha a number or a (G,) tensor.  Differentiable in x, weight,
    bias, mu_t, eta_t and alpha.  Returns x's dtype (a drop-in for the layer), fp32 arithmetic
    (float64 when x, weight, bias, mu_t, eta_t or a tensor alpha is float64: an fp32 x through a
    float64 layer is computed in float64, then rounded to fp32).  A number alpha must be finite
    (ValueError); a tensor alpha is not read on the host (a GPU sync), so a NaN there is taken.
    """
    G = check_lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha)
    if not isinstance(alpha, torch.Tensor):
        # In the op's arithmetic dtype: float64 when x, weight or bias is (SPEC), not only mu_t/eta_t
        # (a float64 layer with fp16 factors rounded a number alpha to fp32, ~1e-8 relative).
        acc = compute_dtype(x, weight, bias, mu_t, eta_t)
        check_finite_alpha(alpha)
        check_alpha_within(alpha, acc)
        alpha = torch.full((G,), float(alpha), dtype=acc, device=x.device)
    alpha = alpha.reshape(-1)
    if alpha.numel() == 1 and G != 1 and alpha.dtype in HALF_DTYPES:
        # The G per-group gradients of a shared alpha are summed by autograd in the expanded
        # tensor's dtype: in fp32, then rounded once to alpha's dtype (expanded in bf16, each
        # group's share was rounded before the sum, errors of several ulps).
        alpha = alpha.float()
    alpha = alpha.expand(G).contiguous()  # differentiable: a shared alpha sums its grads
    return opcall("lowrank_delta_linear")(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha)


def check_lowrank_delta_linear(x, weight, bias, row_group, mu_t, eta_t, offsets, alpha, raw=False) -> int:
    """The op's checks (alpha: a number, or a tensor of 1 or G entries; exactly G for the raw
    `torch.ops.dcedit` op, `raw`); returns G."""
    check_delta_linear_shapes(x, weight, bias, row_group, mu_t, eta_t)
    G = check_offsets(offsets, "offsets", mu_t.shape[0])
    check_ids(row_group, "row_group", -1, G - 1)
    if isinstance(alpha, torch.Tensor):
        check_tensor(alpha, "alpha")
        if alpha.numel() not in ((G,) if raw else (1, G)):
            what = f"have G={G} entries" if raw else f"be a number or have G={G} entries"
            raise ValueError(f"alpha must {what}, got shape {tuple(alpha.shape)}")
    elif raw:
        raise ValueError(f"alpha must be a tensor of G={G} entries, got {type(alpha).__name__}")
    else:
        check_real_number(alpha, "alpha", "a number or a tensor")
    check_same_device(dict(x=x, weight=weight, bias=bias, row_group=row_group, mu_t=mu_t, eta_t=eta_t,
                           offsets=offsets, alpha=alpha))
    return G


def check_lowrank_delta_linear_backward(grad, x, weight, row_group, mu_t, eta_t, offsets, alpha):
    """The forward's checks plus grad's (raw calls only: autograd's go through opcall)."""
    check_lowrank_delta_linear(x, weight, None, row_group, mu_t, eta_t, offsets, alpha, raw=True)
    check_grad(grad, (x.shape[0], weight.shape[0]), x, "x")


register("lowrank_delta_linear", reference.lowrank_delta_linear, triton_launcher("lowrank_delta_linear"),
         check=lambda *a, **kw: check_lowrank_delta_linear(*a, **kw, raw=True))
register("_lowrank_delta_linear_backward", reference.lowrank_delta_linear_backward,
         triton_launcher("lowrank_delta_linear_backward"), check=check_lowrank_delta_linear_backward)
