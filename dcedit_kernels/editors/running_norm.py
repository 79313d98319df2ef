"""MEND's running mean/std of the gradient factors, updated a batch at a time.

MEND updates its statistics token by token in a Python loop (Welford); this merges a whole batch
in one step with Chan et al.'s parallel formula, which gives the same mean and sum of squares.
Buffer names follow MEND (u = layer input μ, v = output gradient η) so checkpoints map 1:1.
"""

from __future__ import annotations

import torch
from torch import nn


def _eagerly(fn, *args):
    """fn(*args), run eagerly under torch.compile (a graph break at the call).  torch.compiler.disable
    is applied here, not as a decorator: it imports torch._dynamo, and with it triton, which `import
    dcedit_kernels` and CPU calls leave unimported (tests/test_packaging.py); while compiling, dynamo
    is imported already."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(fn)(*args)
    return fn(*args)


class RunningStatistics(nn.Module):
    """Running mean, sum of squared deviations and std of the columns of one or more kinds of row
    (`STATS`: their buffer names, one triple per kind, with the row count `k`: what
    `distributed.merge_running_norms` merges across processes), merged a batch at a time."""

    STATS: tuple = ()

    def __init__(self, *widths: int):
        super().__init__()
        for (mean, s, std), dim in zip(self.STATS, widths):
            self.register_buffer(mean, torch.zeros(dim))
            self.register_buffer(s, torch.zeros(dim))
            self.register_buffer(std, torch.ones(dim))
        self.register_buffer("k", torch.zeros(()))

    def _apply(self, fn, recurse=True):
        """Moves and casts as any module, except that the statistics stay at least fp32: they are
        running sums over every token seen, and in 16 bits the count stops growing (bf16's at 4096:
        4096 + 10 rounds back to 4096) while the sums go on, so the std drifts (bf16) or overflows to
        inf/NaN past 65504 tokens (fp16).  An editor moved to bf16 or fp16 keeps fp32 statistics
        (forward computes the normalisation in fp32 anyway)."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return self

    def _seen(self, name: str) -> str:
        """", name=<rows merged so far>" for extra_repr; nothing for statistics on "meta", which
        hold no values: int() of the count raised there, and with it print() of an editor moved
        to (or built on) the meta device."""
        return "" if self.k.is_meta else f", {name}={int(self.k)}"

    def _check_updatable(self) -> None:
        """RuntimeError naming the first inference-tensor statistic, outside inference mode (an editor
        built or loaded under torch.inference_mode): the merge's first in-place update moved a mean,
        then torch refused the next, which left the statistics half-merged."""
        if torch.is_inference_mode_enabled():
            return
        for name, buf in self.named_buffers():
            if buf.is_inference():
                raise RuntimeError(
                    f"{type(self).__name__}: the running statistics are inference tensors (the editor was built or "
                    f"loaded under torch.inference_mode()), first {name!r}; a training-mode forward cannot update "
                    "them outside it. Build the editor outside torch.inference_mode(), or call .eval() on it")

    def _merge(self, *rows: torch.Tensor) -> None:
        """Chan et al.'s batch merge of each kind's rows (as many of each) into its statistics;
        then k += the batch's row count.  Eager under torch.compile (`_merge_rows`)."""
        _eagerly(RunningStatistics._merge_rows, self, *rows)

    def _fewer_than_two_seen(self) -> bool:
        """float(self.k) < 2 (the norms are the identity until then), read eagerly under
        torch.compile: torch 2.6 traced it for a float64 k and raised AssertionError "SpeculationLog
        diverged" (the tensorify restart of _merge_rows' comment below) when a compiled float64
        editor trained; the read broke the graph anyway."""
        return _eagerly(RunningStatistics._read_fewer_than_two, self)

    def _read_fewer_than_two(self) -> bool:
        return float(self.k) < 2

    # Run eagerly under torch.compile (a graph break at the call; the merge broke the graph at
    # float(self.k) anyway).  Compiled, torch 2.13 got the statistics wrong:
    # - float64 statistics (a float64 editor), aot_eager and inductor: k never moved from 0, so
    #   each merge weighed its batch as the first (the means were the last batch's).  A 0-d CPU
    #   float64 graph input gets a symbolic .item() (FakeTensor item_memo); the tensorify pass
    #   specialises that float and restarts dynamo, and OutputGraph's
    #   remove_tensorify_specialized_graphargs then deletes each node whose value carries the memo
    #   and whose users are all .item() calls: `k.fill_(total)` (its value is k; no user) is gone.
    #   add_ and copy_ on k too; an fp32 or 1-d k is not affected.
    # - fp32 statistics under inductor, from the dynamic recompile on (the second batch size, where
    #   k and n_b become symbolic numbers that also scale the means): the compiled graph went on
    #   using the k of that compile, with no recompile.  In a copy of this merge k went 6, 18, then
    #   16, 14 for batches of 6, 12, 10, 8 rows (eager: 28, 36), and the means with it.
    # Eager, the merge is the same code and arithmetic as without compile: equal bit for bit.
    #
    # The merged values are formed first and written only if all are finite: a finite factor entry
    # beyond ~1.8e19 (fp32's max is 3.4e38) squares to inf, and the std went inf without an error;
    # from then on that column normalised to 0 in every edit, so the editor's shifts no longer
    # depended on it, while apply_ went on "succeeding" (found in session 68).  A NaN row, too, now
    # raises here rather than at the shift.  FloatingPointError: what the edit and training paths
    # already take as a non-finite batch (apply_ restores, fit skips it).
    @torch.no_grad()
    def _merge_rows(self, *rows: torch.Tensor) -> None:
        n_b = rows[0].shape[0]
        if n_b == 0:
            return
        self._check_updatable()
        k = float(self.k)
        total = k + n_b
        merged = []
        for (mean_name, s_name, std_name), x in zip(self.STATS, rows):
            mean, s = getattr(self, mean_name), getattr(self, s_name)
            # Rounded to fp32 as forward does, then summed in the buffers' dtype if wider (float64).
            x = x.to(torch.float32).to(torch.promote_types(torch.float32, mean.dtype))
            mean_b = x.mean(0)
            m2_b = (x - mean_b).square().sum(0)
            delta = mean_b - mean
            new_s = s + (m2_b + delta.square() * (k * n_b / total))
            merged.append((mean_name, mean + delta * (n_b / total)))
            merged.append((s_name, new_s))
            if total >= 2:
                merged.append((std_name, (new_s / (total - 1)).sqrt()))
        finite = torch.stack([value.isfinite().all() for _, value in merged])
        if not bool(finite.all()):  # one device sync for all of them
            name = merged[int(finite.logical_not().nonzero()[0])][0]
            raise FloatingPointError(
                f"{type(self).__name__}: the running statistic {name!r} is not finite with this batch merged (a "
                "non-finite input, or an entry beyond ~1.8e19 whose square overflows fp32); the statistics "
                "were not changed")
        for name, value in merged:
            getattr(self, name).copy_(value)
        self.k.fill_(total)


class RunningNorm(RunningStatistics):
    STATS = (("u_mean", "u_s", "u_std"), ("v_mean", "v_s", "v_std"))

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.u_mean.numel()}, out_features={self.v_mean.numel()}{self._seen('tokens_seen')}"

    def update(self, mu: torch.Tensor, eta: torch.Tensor) -> None:
        self._merge(mu, eta)

    def forward(self, mu: torch.Tensor, eta: torch.Tensor):
        """Normalised (μ, η), as views of `joint(mu, eta)`."""
        h = self.joint(mu, eta)
        return h[:, : mu.shape[1]], h[:, mu.shape[1]:]

    def joint(self, mu: torch.Tensor, eta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[(μ − u_mean) / (u_std + 1e-7); (η − v_mean) / (v_std + 1e-7)], rows gathered by `rows`
        (an index; None: all), in the one tensor it returns (see `joint_rows`; normalised there in
        place); the identity until at least two tokens have been seen.  μ, η are rounded to fp32
        first, as MEND does (then computed in the buffers' dtype if wider).

        MEND's GradientTransform (algs/mend.py) is the same formula: Welford per token, std =
        sqrt(s / (k − 1)), 1e-7 added to the std.  Checked (session 60) against a transcription of
        its loop on 2 to 50 tokens merged in random batches: the means, stds and normalised inputs
        agree to fp32 rounding (closer to float64 than MEND's own fp32 loop: std 1.6e-4 against
        1.1e-3 relative at a spread of 1e-3 around a mean of 1).  Where they differ: with fewer than
        two tokens MEND raises in training ("Can't perform normalization with only 1 samples so far")
        and a fresh MEND editor in eval reads its NaN buffers (NaN out); here the identity.  Statistics
        of a handful of tokens are MEND's too: a column that barely varied in them has a std near 0,
        and a new token's entry there is divided by it (a spread of 1e-5 between two tokens: 7e-6,
        and 0.1 off the mean becomes 1.4e4; with no spread, 1e6), which is what makes an editor
        fitted on very little data edit with huge shifts."""
        h = joint_rows(mu, eta, rows)
        if self._fewer_than_two_seen():
            return h
        mean = torch.cat([self.u_mean, self.v_mean])
        std = torch.cat([self.u_std, self.v_std]) + 1e-7
        return h.to(mean.dtype).sub_(mean).div_(std)


def joint_rows(mu: torch.Tensor, eta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.cat([mu, eta], 1)[rows]` rounded to fp32, as a new tensor the caller may write in
    place.  The editor's input [μ; η] in its group order: the concatenation, the gather and the
    normalisation were four (T, in + out) allocations and passes before (sub, div, cat, then the
    gather with advanced indexing, 3× slower than index_select on CPU), two now."""
    h = torch.cat([mu, eta], 1)
    if rows is not None:
        h = h.index_select(0, rows)
    return h if h.dtype == torch.float32 else h.to(torch.float32)


class FeatureNorm(RunningStatistics):
    """A running mean/std of one kind of row (MoEditor's edit features, one row per edit),
    updated as RunningNorm's (in training, a batch at a time), frozen in eval, saved in the state
    dict (`mean`, `s`, `std`, `k`).

    MoEditor's gate reads the mean of the LM head's input over each edit's prompt: in a trained LM
    those features share a large common part (a few dimensions of huge magnitude), so the gate's
    logits f W_g were nearly the same for every edit and, without the training noise, every edit
    went to one editor (RESULTS.md).  Standardised features (f - mean) / (std + 1e-7), as
    RunningNorm's, make the logits depend on what tells the edits apart."""

    STATS = (("mean", "s", "std"),)

    def __init__(self, features: int):
        super().__init__(features)

    def extra_repr(self) -> str:
        return f"features={self.mean.numel()}{self._seen('rows_seen')}"

    def update(self, x: torch.Tensor) -> None:
        self._merge(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x standardised (in fp32, or the buffers' dtype if wider); x as fp32 until at least two
        rows have been seen."""
        x = x.to(torch.promote_types(torch.float32, self.mean.dtype))
        if self._fewer_than_two_seen():
            return x
        return (x - self.mean) / (self.std + 1e-7)
