import torch

from .._checks import compute_dtype
from .segments import segment_bounds

FUSIONS = ("none", "add", "max", "sss", "ssm")


def _group_shifts(eta, mu, offsets, acc):
    """Yield S_g = Σ_{t∈g} η_t μ_tᵀ (o×i), one group at a time."""
    for s, e in segment_bounds(offsets):
        yield eta[s:e].to(acc).T @ mu[s:e].to(acc)


def _beats(mag, best):
    """Where |S_g| takes the running max from an earlier group: strictly larger (the first group
    keeps ties), or NaN over a number (the first NaN wins), as the oracle's argmax ranks them."""
    return (mag > best) | (mag.isnan() & ~best.isnan())


def grouped_outer(eta, mu, offsets, fusion="add", alpha=1.0):
    """Per-group shifts fused elementwise (SPEC: none/add/max/sss/ssm), times alpha.

    The oracle: holds the whole (G, o, i) stack, which is exactly what the kernels avoid.
    """
    acc = compute_dtype(eta, mu)
    G = offsets.numel() - 1
    stack = torch.stack(list(_group_shifts(eta, mu, offsets, acc)), 0)
    if fusion == "none":
        out = stack
    elif fusion == "add":
        out = stack.sum(0)
    elif fusion == "max":
        # argmax returns the first maximal index, which is the SPEC's tie rule, and ranks NaN
        # above every number (the first NaN wins): a NaN S_g entry reaches the output.
        winner = stack.abs().argmax(0, keepdim=True)
        out = stack.gather(0, winner).squeeze(0)
    elif fusion in ("sss", "ssm"):
        # The values of clamp(min=0) / clamp(max=0), NaN included, but autograd selects strictly as
        # grouped_outer_backward does: clamp's gradient at exactly 0 is 1, which made
        # `reference_mode` pass gradient to S_g entries that are exactly 0 (a feature a group never
        # sees), where every kernel's backward gives none.
        pos = torch.where(stack > 0, stack, stack.detach().clamp(min=0)).sum(0)
        neg = torch.where(stack < 0, stack, stack.detach().clamp(max=0)).sum(0)
        out = torch.where(pos >= -neg, pos, neg)
        if fusion == "ssm":
            out = out / G
    else:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return out * alpha


def grouped_outer_streaming(eta, mu, offsets, fusion="add", alpha=1.0):
    """`grouped_outer` folding one S_g at a time into running sums (add; P and N) or a running
    winner (max): the op's kernel where no compiled one serves (no `_C`; a GPU Triton does not
    support), as the SPEC keeps the fused forms from holding G o×i matrices (G = 64, o = i = 512:
    the oracle's peak RSS grew 202 MiB for a 1 MiB result).  Its own tensors peak at 3 ("add"), 5
    ("sss", "ssm") or 6.25 ("max") fp32 o×i matrices whatever G (the allocator's events, G = 2 to
    64; the loop variable keeps the last S_g while the next is formed): an RSS reading of 2.6 MiB
    was once given here, fresh processes read 6.5-19 MiB, MKL's buffers included.  The oracle's rules:
    the first group keeps |S| ties, the first NaN wins, P where P ≥ −N.  No autograd: the op's
    backward is `grouped_outer_backward`."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "none":
        return grouped_outer(eta, mu, offsets, fusion, alpha)
    acc = compute_dtype(eta, mu)
    out = best = pos = neg = None
    for s_g in _group_shifts(eta, mu, offsets, acc):
        if fusion == "add":
            out = s_g if out is None else out.add_(s_g)
        elif fusion == "max":
            mag = s_g.abs()
            if out is None:
                out, best = s_g, mag
            else:
                better = _beats(mag, best)
                out, best = torch.where(better, s_g, out), torch.where(better, mag, best)
        else:
            pos = s_g.clamp(min=0) if pos is None else pos.add_(s_g.clamp(min=0))
            neg = s_g.clamp(max=0) if neg is None else neg.add_(s_g.clamp(max=0))
    if fusion in ("sss", "ssm"):
        out = torch.where(pos >= -neg, pos, neg)
        if fusion == "ssm":
            out = out / (offsets.numel() - 1)
    return out * alpha


def _selection(fusion, s_g, g, pos, neg, winner):
    """Where S_g's entries reach the fused output (the gradient mask of group g)."""
    if fusion == "max":
        return winner == g
    take_pos = pos >= -neg
    return torch.where(take_pos, s_g > 0, s_g < 0)


def grouped_outer_backward(grad, eta, mu, offsets, fusion, alpha):
    """(d_eta, d_mu) of grouped_outer, recomputing one S_g at a time: besides d_eta and d_mu it holds
    at most 1 ("add"), about 7 ("sss", "ssm": the scaled gradient, P, N, S_g and the next one, the
    selection's temporaries, dS_g) or 10 ("max", whose int64 winner map counts twice) fp32 o×i
    matrices at once, whatever G (the allocator's events, G = 2 to 64)."""
    acc = compute_dtype(eta, mu, grad)
    g_out = grad.to(acc) * alpha
    G = offsets.numel() - 1
    if fusion == "ssm":
        g_out = g_out / G
    bounds = segment_bounds(offsets)
    if fusion == "add":
        d_eta = mu.to(acc) @ g_out.T
        d_mu = eta.to(acc) @ g_out
        return d_eta.to(eta.dtype), d_mu.to(mu.dtype)
    d_eta = torch.zeros(eta.shape, dtype=acc, device=eta.device)
    d_mu = torch.zeros(mu.shape, dtype=acc, device=mu.device)
    pos = neg = winner = None
    if fusion == "max":
        best = None
        for g, s_g in enumerate(_group_shifts(eta, mu, offsets, acc)):
            mag = s_g.abs()
            if best is None:
                best, winner = mag, torch.zeros(mag.shape, dtype=torch.int64, device=mag.device)
            else:
                better = _beats(mag, best)
                best = torch.where(better, mag, best)
                winner = torch.where(better, torch.full_like(winner, g), winner)
    elif fusion in ("sss", "ssm"):
        pos = torch.zeros(eta.shape[1], mu.shape[1], dtype=acc, device=eta.device)
        neg = torch.zeros_like(pos)
        for s_g in _group_shifts(eta, mu, offsets, acc):
            pos += s_g.clamp(min=0)
            neg += s_g.clamp(max=0)
    shifts = _group_shifts(eta, mu, offsets, acc) if fusion != "none" else iter(lambda: None, 0)
    for g, ((s, e), s_g) in enumerate(zip(bounds, shifts)):
        if s == e:
            continue
        if fusion == "none":
            d_s = g_out[g]
        else:
            # A select, as torch's clamp and gather backwards: an infinite gradient off the
            # selection gives 0, not inf·0 = NaN.  (Unlike clamp's, the selection is strict: an
            # S_g entry exactly 0 adds nothing to P or N and gets no gradient.)
            d_s = torch.where(_selection(fusion, s_g, g, pos, neg, winner), g_out, 0.0)
        d_eta[s:e] = mu[s:e].to(acc) @ d_s.T
        d_mu[s:e] = eta[s:e].to(acc) @ d_s
    return d_eta.to(eta.dtype), d_mu.to(mu.dtype)
