"""GroupedEditor: N_g MEND-style editors of one weight shape, run together by the fused ops."""

from __future__ import annotations

import json
import math
import os
import torch
from torch import nn

from .. import ops
from .._checks import (
    check_bool, check_fisher_keep, check_path, check_same_device, check_seed, check_tensor, is_finite_number, is_int, no_values,
    tracing,
)
from ..devices import as_device
from ..edit_handle import deferred_interrupt
from ..reference.grouped_outer import FUSIONS
from ..reference.segments import group_ids, kept_offsets
from ..safetensors_file import check_state, json_metadata, read_safetensors
from .editor_size import check_editor_fits, editor_numel
from .grouped_edit import GroupedEdit, apply_finite_shift_, check_weight
from .parameter_generator import ParameterGenerator, seeded_draw_
from .running_norm import FeatureNorm, RunningNorm, joint_rows

ROUTINGS = ("gate", "random", "single")
GENERATOR_HIDDEN_DEFAULT = 64  # ψ's hidden width where none is given
# gate_norm's default (editor_cache resolves it into the cache key of a MoEditor that leaves it out).
GATE_NORM_DEFAULT = True


class LowRankLayer(nn.Module):
    """One of an editor's residual low-rank layers, for all its editors (`ops.grouped_lowrank`'s u
    (G, d, r), v (G, r, d), bias (G, d) and the per-weight mode embeddings (G, n_modes, d), set by
    GroupedEditor).  A class of its own for its repr: as a plain nn.Module, print(editor) showed
    "2 x Module()", and the rank in use, min(rank, in + out), nowhere."""

    def extra_repr(self) -> str:
        G, d, r = self.u.shape
        return f"n_editors={G}, features={d}, rank={r}, n_modes={self.mode_scale.shape[1]}"


class GroupedEditor(nn.Module):
    """MEND's gradient transform, N_g times over, with routing, fusion and an optional ψ.

    in_features, out_features: the edited weight's sizes (it is out × in, as nn.Linear's).
    Maps each token's gradient factors [μ; η] (in + out features) through `n_layers` residual
    low-rank layers (rank min(`rank`, in + out features), MEND's identity init: u = 0) per editor,
    with per-weight "modes" (scale/shift embeddings; `n_modes` weights of this shape share the
    editor, as in MEND).

    routing: "single" (one editor: MEND), "random" (edits split into n_editors random groups:
    RaEditor), "gate" (noisy top-k gate on the edit features: MoEditor).  fusion combines the
    group shifts (see `ops.grouped_outer`); with n_editors=1 there is one, which every fusion gives
    bit for bit, and any fusion is taken all the same (the default "sss" too): n_editors is a size
    here, and 1 the end point of a sweep over it (RaEditor/MoEditor(n_editors=1, fusion=...)), where
    refusing a fusion would make the sweep's one call fail.  MEND and ProEditor, one editor by
    definition, refuse another fusion than "add" (`presets._refuse_fusion`).  generator: None, "token" or "sentence" (ProEditor's
    ψ generating per-token or per-edit gains for the low-rank branch input of the first layer, ψ
    reading the normalised [μ; η]; "sentence": each edit's mean over its non-zero tokens;
    `generator_hidden`: ψ's hidden width); fisher_keep: keep
    only that fraction of the shift's entries, by Fisher information (ProEditor).  seed: draws the
    initial v, ψ's first layer and, under "random" routing, the groups, from a generator of the
    editor's own that each call advances (so one editor splits the same edits differently call
    after call, and a loaded editor starts its draws afresh from the seed); None: torch's global
    generator.  The random groups are drawn over the edits' positions in the batch, so the same
    edits in another order are split otherwise (a fresh seeded RaEditor: a 33 % different shift).
    The input [μ; η] is rounded to fp32 whatever the editor's dtype, as MEND's GradientTransform
    does (`compat.mend` reproduces float64 MEND checkpoints with it): a float64 editor computes in
    float64 from there.

    `alpha` holds the learned per-weight step α (W ← W + α Δ), initialised to −edit_lr so that an
    identity editor without normalisation takes a gradient-descent step of size edit_lr with one
    editor or "add" fusion.  (MEND itself starts its edit_lrs at +edit_lr, an ascent step for its
    identity editor, and draws v from N(0, 1) where this draws it xavier-uniform: training from
    scratch starts elsewhere than MEND's, while a loaded MEND checkpoint, `compat.mend`, edits as
    MEND.)  With several editors the fusion reshapes it ("sss" keeps the larger sign sum per
    entry, so entries can exceed the gradient's), and a gate at top_k = 2 scales each edit by its
    weight, 1/2 while the logits are equal (MoEditor at initialisation).

    top_k: the gate keeps its top_k logits (see `MoEditor`); under another routing nothing reads it,
    so only 1 is taken there.  feat_dim (routing="gate" only): the width of forward's edit_feats,
    the gate's input (None: in_features); without a gate only None is taken.  generator_hidden: only
    None or 64 without a generator.

    gate_norm (routing="gate" only; under another routing only its default, True, is taken): the
    gate reads the edit features standardised by their running mean/std (`gate_norm`, a FeatureNorm: updated in training,
    frozen in eval, saved in the state dict), as `norm` standardises the factors.  Without it the
    features' common part (a trained LM's last hidden states share a few huge dimensions) makes
    f W_g nearly the same for every edit: the balance loss is met by the training noise, and in
    eval, without noise, every edit goes to one editor.  A checkpoint from before this option
    loads with gate_norm=False, as it was trained.

    Sizes this machine cannot hold are a ValueError naming them, before anything is built: the
    parameters and buffers, in the default dtype, past the memory of the default device they are
    built on (the CPU's RAM + swap, a GPU's total memory; "meta" takes none), or the layers' Python
    objects past the CPU's (`editor_size`).  They looped or filled the machine before.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_editors: int = 1,
        rank: int = 1920,
        n_layers: int = 2,
        n_modes: int = 1,
        routing: str = "gate",
        fusion: str = "sss",
        generator: str | None = None,
        fisher_keep: float | None = None,
        norm: bool = True,
        edit_lr: float = 1e-4,
        feat_dim: int | None = None,
        top_k: int = 1,
        generator_hidden: int = GENERATOR_HIDDEN_DEFAULT,
        seed: int | None = None,
        gate_norm: bool = GATE_NORM_DEFAULT,
    ):
        """The arguments are the class docstring's; each is checked (ValueError naming it)."""
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("n_editors", n_editors), ("rank", rank), ("n_layers", n_layers),
                            ("n_modes", n_modes), ("top_k", top_k)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            # Tensor sizes, int64 in torch: 2**63 and up raised zeros()'s TypeError "failed to unpack ...
            # Overflow when unpacking long long", C++ frames and all (`dcedit --n-editors 10**23` printed them).
            # (rank is clamped to in + out features by the editors, so a larger one is taken as before.)
            if name in ("in_features", "out_features", "n_editors", "n_modes") and value >= 2**63:
                raise ValueError(f"{name} must be a positive int below 2**63, got {value!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if generator not in (None, "token", "sentence"):  # before any draw; "" is not None
            raise ValueError(f"generator must be None, 'token' or 'sentence', got {generator!r}")
        if routing == "single" and n_editors != 1:
            raise ValueError("routing='single' needs n_editors=1")
        if fusion not in FUSIONS or fusion == "none":
            raise ValueError(f"fusion must be one of add, max, sss, ssm, got {fusion!r}")
        check_fisher_keep(fisher_keep)
        if not is_finite_number(edit_lr) or abs(edit_lr) > torch.finfo(torch.float32).max:  # α is fp32
            raise ValueError(f"edit_lr must be a finite number within float32's range, got {edit_lr!r}")
        for name, value in (("norm", norm), ("gate_norm", gate_norm)):
            check_bool(value, name)
        check_seed(seed, none_ok=True)
        if top_k != 1 and routing != "gate":
            # Only the gate reads it: RaEditor(top_k=2) was taken, kept in the config (hidden from the
            # repr) and routed each edit to one random editor all the same.  Before the n_editors
            # bound, which told MEND(top_k=2) "cannot exceed n_editors (1)", not that MEND has no gate.
            raise ValueError(f"top_k is the gate's (routing='gate', MoEditor): routing={routing!r} has no gate, "
                             f"so top_k={top_k} would be ignored; leave it at 1")
        if top_k > n_editors:
            raise ValueError(f"top_k ({top_k}) cannot exceed n_editors ({n_editors})")
        if gate_norm != GATE_NORM_DEFAULT and routing != "gate":
            # The same for gate_norm: RaEditor(gate_norm=False) and MEND's were taken and standardised
            # nothing (no gate, no features); the default is taken, as top_k's 1 is.
            raise ValueError(f"gate_norm is the gate's (routing='gate', MoEditor): routing={routing!r} has no gate, "
                             f"so gate_norm={gate_norm} would be ignored; leave it at {GATE_NORM_DEFAULT}")
        if routing == "gate" and feat_dim is None:
            feat_dim = in_features  # SPEC's constructor has no feat_dim; the MoEditor preset's default
        # Unused (no gate, no generator), None is taken too; anything else given is checked all the
        # same: it is kept in the config, where -4 or 2.5 was saved as given and a set made save()
        # raise a bare TypeError from json.  Then, unused, only None (and generator_hidden's default)
        # is taken, as top_k's 1 and gate_norm's True: RaEditor(feat_dim=20) and MEND(generator_hidden=
        # 128) were kept in the config and read by nothing (`without_ignored_sizes` loads such configs).
        for name, value, used, owner, unused_ok in (
                ("feat_dim", feat_dim, routing == "gate", f"the gate's (routing='gate', MoEditor): routing={routing!r} "
                 "has no gate", (None,)),
                ("generator_hidden", generator_hidden, generator is not None, "ψ's (generator 'token' or 'sentence', "
                 "ProEditor): generator=None has no ψ", (None, GENERATOR_HIDDEN_DEFAULT))):
            if (used or value is not None) and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int{'' if used else ' or None'}, got {value!r}")
            if not used and value not in unused_ok:
                raise ValueError(f"{name} is {owner}, so {name}={value} would be ignored; leave it at "
                                 f"{unused_ok[-1]}")
        # Before anything is built: sizes past this machine's memory looped or filled it (`editor_size`).
        sizes = dict(in_features=in_features, out_features=out_features, n_editors=n_editors, rank=rank,
                     n_layers=n_layers, n_modes=n_modes, feat_dim=feat_dim if routing == "gate" else None,
                     generator_hidden=generator_hidden if generator is not None else None)
        check_editor_fits(editor_numel(**sizes, norm=norm, gate_norm=gate_norm), n_layers,
                          {k: v for k, v in sizes.items() if v is not None})
        self.config = dict(
            in_features=in_features, out_features=out_features, n_editors=n_editors, rank=rank,
            n_layers=n_layers, n_modes=n_modes, routing=routing, fusion=fusion, generator=generator,
            fisher_keep=fisher_keep, norm=norm, edit_lr=edit_lr, feat_dim=feat_dim, top_k=top_k,
            generator_hidden=generator_hidden,
        )
        if routing == "gate":  # only gate editors record it: the configs of the others are unchanged
            self.config["gate_norm"] = gate_norm
        self.in_features, self.out_features = in_features, out_features
        self.n_editors, self.n_modes, self.routing, self.fusion = n_editors, n_modes, routing, fusion
        self.fisher_keep, self.top_k, self.generator = fisher_keep, top_k, generator
        d = in_features + out_features
        r = min(rank, d)
        G = n_editors
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            layer = LowRankLayer()
            layer.u = nn.Parameter(torch.zeros(G, d, r))  # MEND's "id" init: the layer starts as identity
            bound = math.sqrt(6.0 / (r + d))  # xavier_uniform on each (r, d) v
            layer.v = nn.Parameter(seeded_draw_(torch.empty(G, r, d),
                                                lambda t, g, bound=bound: t.uniform_(-bound, bound, generator=g), gen))
            layer.bias = nn.Parameter(torch.zeros(G, d))
            layer.mode_scale = nn.Parameter(torch.ones(G, n_modes, d))
            layer.mode_shift = nn.Parameter(torch.zeros(G, n_modes, d))
            self.layers.append(layer)
        self.alpha = nn.Parameter(torch.full((n_modes,), -float(edit_lr)))
        self.norm = RunningNorm(in_features, out_features) if norm else None
        # `is not None`: a falsy generator ("", 0) is refused above, never taken as None.
        self.psi = ParameterGenerator(d, generator_hidden, generator, gen) if generator is not None else None
        if routing == "gate":  # feat_dim is set (in_features by default) and checked above
            self.w_gate = nn.Parameter(torch.zeros(feat_dim, G))
            self.w_noise = nn.Parameter(torch.zeros(feat_dim, G))
        self.gate_norm = FeatureNorm(feat_dim) if routing == "gate" and gate_norm else None
        self._route_gen = gen
        self.seed = seed  # saved by `save` beside `config` (which ModelEditor checkpoints compare)

    def extra_repr(self) -> str:
        c = self.config
        shown = ["in_features", "out_features", "n_editors", "rank", "n_layers", "n_modes", "routing", "fusion"]
        shown += [k for k in ("top_k", "feat_dim", "gate_norm") if c["routing"] == "gate"]
        shown += [k for k in ("generator", "fisher_keep") if c[k] is not None]
        return ", ".join(f"{k}={c[k]!r}" if isinstance(c[k], str) else f"{k}={c[k]}" for k in shown)

    # ------------------------------------------------------------------ routing
    @property
    def route_generator(self) -> torch.Generator | None:
        """The generator random routing (RaEditor) draws its groups from: seeded with `seed`, None
        without one (torch's global generator then).  Its state can be saved and set back, so that
        two evaluations route the same edits alike."""
        return self._route_gen

    def __getstate__(self) -> dict:
        """Pickled (pickle, torch.save, copy.deepcopy, a process's arguments) with the routing
        generator as its state's bytes: torch.Generator's own pickling gives a state tensor that
        nobody holds, and torch.multiprocessing shares it through a file descriptor that is closed
        before a spawned or forkserver child reads it (pytorch#146828), so every seeded editor, and
        a ModelEditor holding one, crashed the process it was handed to ("unable to resize file")."""
        state = super().__getstate__()
        if isinstance(self._route_gen, torch.Generator):
            state["_route_gen"] = _GeneratorState(bytes(self._route_gen.get_state().tolist()))
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if isinstance(self._route_gen, _GeneratorState):  # an editor pickled before holds the Generator
            self._route_gen = self._route_gen.generator()

    def route(self, n_edits: int, edit_feats=None, device=None):
        """(group per edit (E,), gate weight per edit (E,) or None, balance loss) of `n_edits` = E
        edits, on `device` (forward passes the factors'; None: the default device) under "single"
        and "random" routing, on edit_feats' under "gate".  The gate reads `edit_feats` (E,
        feat_dim) standardised by `gate_norm` (when the editor has one), which takes them into
        its statistics first in training mode."""
        # A public method: n_edits and device went to torch unchecked (randperm's TypeError for a
        # float, "negative dimension" for -1, a device string's RuntimeError), naming nothing.
        if not is_int(n_edits) or not 0 <= n_edits < 2**63:  # past int64: "Overflow when unpacking long long"
            raise ValueError(f"n_edits must be a non-negative int below 2**63, got {n_edits!r}")
        if device is not None and not isinstance(device, torch.device):  # forward passes mu.device
            device = as_device(device, "device")
        zero = torch.zeros((), device=device)
        if self.routing == "single":
            return torch.zeros(n_edits, dtype=torch.int64, device=device), None, zero
        if self.routing == "random":
            # Drawn on the CPU, where the seeded generator (and the global one the docs name) lives, whatever
            # torch.set_default_device says (a "meta" default device: "Cannot copy out of meta tensor").
            perm = torch.randperm(n_edits, generator=self._route_gen, device="cpu").to(device)
            # Which editors get the ⌈E/N_g⌉-edit groups is drawn too: `arange % N_g` alone always
            # gave them to the lowest-numbered editors (and, for E < N_g, no edit to editors ≥ E).
            labels = torch.randperm(self.n_editors, generator=self._route_gen, device="cpu").to(device)
            groups = torch.empty(n_edits, dtype=torch.int64, device=device)
            groups[perm] = labels[torch.arange(n_edits, device=device) % self.n_editors]  # balanced random split
            return groups, None, zero
        if edit_feats is None:
            # GroupedEditor(in, out) alone is gate-routed (SPEC's default): say how to do without.
            raise ValueError("edit_feats is required with routing='gate' (GroupedEditor's default); "
                             "routing='single' (the MEND preset) needs none")
        check_tensor(edit_feats, "edit_feats")
        if edit_feats.shape != (n_edits, self.w_gate.shape[0]):
            raise ValueError(f"edit_feats must have shape ({n_edits}, {self.w_gate.shape[0]}), got {tuple(edit_feats.shape)}")
        # Before the statistics read (or take) the features: on another device than the editor they
        # raised a bare RuntimeError from the norm.  Named as forward's factors are (edit_feats, the
        # editor): noisy_topk_gate's own check named its arguments, feats, w_gate and w_noise.
        check_same_device({"edit_feats": edit_feats, "the editor": self.w_gate})
        feats = edit_feats
        if self.gate_norm is not None:
            if self.training:
                self.gate_norm.update(edit_feats)
            feats = self.gate_norm(edit_feats)
        # The features in the gate's compute dtype (fp32, fp64 for a float64 editor), not the editor's:
        # a bf16 editor's gate computes in fp32 anyway, and rounding the standardised features to bf16
        # first put 3.3e-4 of error into its gate weights against float64 (fp16 8e-6, fp32 4e-8; session
        # 68), which with top_k ≥ 2 reached the shift (7e-4) and could flip a near-tied routing.
        gates, chosen, loss = ops.noisy_topk_gate(
            feats.to(torch.promote_types(self.w_gate.dtype, torch.float32)), self.w_gate, self.w_noise,
            k=self.top_k, training=self.training,
        )
        return chosen, gates.gather(1, chosen.unsqueeze(1)).squeeze(1), loss

    # ------------------------------------------------------------------ forward
    def forward(self, mu, eta, edit_offsets, mode: int = 0, edit_feats=None) -> GroupedEdit:
        """The edit of one weight from its gradient factors.

        mu (T, in), eta (T, out), edit_offsets int (E+1,) (one segment per edit), mode: which of
        the weights sharing this editor; edit_feats (E, feat_dim) for routing='gate' (see
        `MoEditor` for what ModelEditor passes; ignored by the other routings).  The factors are
        `capture.compute_factors`' (or `capture_factors`') `Factors.mu`, `.eta` and `.edit_offsets`
        of the edited layer, on the editor's device.  In training mode the call adds the factors to
        the running norms (and edit_feats to gate_norm's) first; a batch that would make a running
        statistic non-finite (a NaN or inf factor or feature, or an entry whose square overflows
        fp32) raises FloatingPointError and leaves every statistic as it was.  A batch whose
        gradients turn out non-finite later (in the caller's backward) has already been merged: a
        training loop of one's own keeps the buffers and puts them back then, as `fit` does.
        """
        check_tensor(mu, "mu")
        check_tensor(eta, "eta")
        if mu.dim() != 2 or mu.shape[1] != self.in_features:
            raise ValueError(f"mu must have shape (T, {self.in_features}), got {tuple(mu.shape)}")
        if eta.dim() != 2 or eta.shape != (mu.shape[0], self.out_features):
            raise ValueError(f"eta must have shape ({mu.shape[0]}, {self.out_features}), got {tuple(eta.shape)}")
        if not is_int(mode) or not 0 <= mode < self.n_modes:  # not a bool: True would index a new axis
            # A tensor here is mostly edit_feats passed positionally: its repr filled the message.
            got = (f"a Tensor of shape {tuple(mode.shape)} (edit_feats is a keyword argument)"
                   if isinstance(mode, torch.Tensor) and mode.dim() > 0 else repr(mode))
            raise ValueError(f"mode must be an int in [0, {self.n_modes}), got {got}")
        # Before the zero-row test and the norms, which raised torch's RuntimeError for factors on
        # another device than the editor (a model on a GPU, its editor left on the CPU).
        check_same_device({"mu": mu, "eta": eta, "the editor": self.alpha})
        check_factor_values(mu, eta)
        if isinstance(edit_offsets, torch.Tensor) and edit_offsets.is_meta:
            # Offsets on another real device are read there (kept_offsets moves them), but a meta
            # tensor has no values: it was NotImplementedError ("Cannot copy out of meta tensor").
            check_same_device({"mu": mu, "eta": eta, "edit_offsets": edit_offsets})
        n_edits = ops_check_offsets(edit_offsets, mu.shape[0])
        device = mu.device

        # MEND skips tokens whose μ or η is all zero (padding, tokens after the last label), judged
        # after the fp32 rounding below, as MEND does: a float64 row that underflows fp32 is zero
        # (16-bit rows are zero exactly when their fp32 values are: no copy for them).
        r_mu, r_eta = (t.float() if t.dtype == torch.float64 else t for t in (mu, eta))
        nz = (r_mu.abs().amax(1) != 0) & (r_eta.abs().amax(1) != 0)  # a NaN row counts: NaN != 0
        if not bool(nz.all()):
            edit_offsets = kept_offsets(edit_offsets, nz)
            mu, eta = mu[nz], eta[nz]
        # Routed (edit_feats checked) before the statistics take this batch: a call that raises
        # leaves the running norms as they were.
        edit_group, gate_weight, aux_loss = self.route(n_edits, edit_feats, device)
        if self.training and self.norm is not None:
            self.norm.update(mu, eta)
        token_edit = group_ids(edit_offsets, mu.shape[0])
        perm, _, offsets = ops.sort_by_group(edit_group[token_edit], self.n_editors)
        # One editor: sort_by_group is stable, so perm is the identity and h needs no permuted copy.
        permute = self.n_editors > 1
        # h = [μ; η], normalised, in group order.  The factors are rounded to fp32 first, whatever
        # the editor's dtype, as MEND's GradientTransform does (`compat.mend` reproduces float64
        # MEND checkpoints with it).  ψ reads the edits' tokens in their own order: with it, h is
        # permuted after.
        rows = perm if permute and self.psi is None else None
        h = self.norm.joint(mu, eta, rows) if self.norm is not None else joint_rows(mu, eta, rows)
        gain = self.psi(h, edit_offsets) if self.psi is not None else None
        if gain is not None and permute:
            gain, h = gain.index_select(0, perm), h.index_select(0, perm)
        for i, layer in enumerate(self.layers):
            h = ops.grouped_lowrank(
                h, offsets, layer.u, layer.v, layer.bias,
                layer.mode_scale[:, mode], layer.mode_shift[:, mode], gain if i == 0 else None,
            )
        mu_t, eta_t = h[:, : self.in_features], h[:, self.in_features:]
        if gate_weight is not None:
            eta_t = eta_t * gate_weight[token_edit[perm]].unsqueeze(1)

        fisher = None
        if self.fisher_keep is not None:
            fisher = ops.segmented_fisher(eta.detach(), mu.detach(), edit_offsets)
        return GroupedEdit(
            mu_t=mu_t, eta_t=eta_t, offsets=offsets, fusion=self.fusion, alpha=self.alpha[mode],
            edit_group=edit_group, aux_loss=aux_loss, fisher=fisher, fisher_keep=self.fisher_keep,
        )

    def dense(self, mu, eta, edit_offsets, mode: int = 0, edit_feats=None) -> torch.Tensor:
        """The fused (and masked) shift Δ for these factors (arguments as `forward`'s)."""
        return self(mu, eta, edit_offsets, mode, edit_feats).dense()

    def apply_(self, weight, mu, eta, edit_offsets, mode: int = 0, edit_feats=None) -> torch.Tensor:
        """weight += α Δ in place; returns the previous values of weight (see ops.undo_shift_).

        weight: the edited layer's (out_features, in_features) weight; the other arguments are
        `forward`'s.  The weight is checked before the forward runs: a wrong one raises with the
        running norms and the routing generator as they were.  So does any later failure (factors
        that give a non-finite shift, FloatingPointError; an error or Ctrl-C in the forward or the
        write): the statistics a training-mode forward had merged and the groups it had drawn go
        back.  Before, one call on factors holding a NaN left NaN running norms, and every later
        shift of the editor non-finite."""
        check_weight(weight, (self.out_features, self.in_features))
        # Vectors of the layer widths and a generator state: small beside the factors.
        buffers = {k: b.clone() for k, b in self.named_buffers()} if self.training else {}
        route = self._route_gen.get_state() if isinstance(self._route_gen, torch.Generator) else None
        try:
            return self(mu, eta, edit_offsets, mode, edit_feats).apply_(weight)
        except BaseException:
            with deferred_interrupt(), torch.no_grad():  # a Ctrl-C meanwhile waits until all is back
                for k, b in self.named_buffers():
                    if k in buffers:
                        b.copy_(buffers[k])
                if route is not None:
                    self._route_gen.set_state(route)
            raise

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Save to safetensors, with the constructor arguments in the metadata.  `path`'s folder
        must exist (FileNotFoundError naming it otherwise; none is created, as torch.save and
        safetensors' save_file create none)."""
        from ..safetensors_file import save_safetensors

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(tensors, path, metadata={"dcedit_config": json.dumps({**self.config, "seed": self.seed})})

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "GroupedEditor":
        """The editor `save` wrote at `path`, its tensors on `map_location` (a device or its
        string; None: the CPU).  A seeded editor comes back with its seed, and its routing
        generator starts from it, as a new editor with that seed (the draws made since are not
        saved).  ValueError for a file that is not such a checkpoint: not safetensors, a config
        this package's constructor does not take (a newer version's), tensors missing, unexpected
        or of another shape (safetensors', the constructor's TypeError and load_state_dict's
        RuntimeError before).  It comes back in training mode, as any new module: call `.eval()`
        before editing with it, since in training mode each call adds its factors to the running
        norms (and its features to gate_norm's) and a gate draws noise."""
        import inspect

        from safetensors import SafetensorError

        check_path(path, "path")  # an int was a file descriptor to os.path.isfile
        path = os.fspath(path)  # str() of an os.PathLike other than pathlib's is its repr
        # safetensors raised its own error for a bad device ("device gpu is invalid", or for "cuda"
        # without CUDA a RuntimeError about pinned memory); None is the CPU, as torch.load's None
        # keeps a CPU checkpoint there.
        map_location = as_device(map_location, "map_location") or torch.device("cpu")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            # The config and the tensors of one file; a file without the config is refused unread.
            meta, _, state = read_safetensors(path, {"dcedit_config"})
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a safetensors file ({exc})") from None
        if "dcedit_config" not in meta:
            from ..editor_checkpoint import CHECKPOINT_KEY

            hint = ("; it is a ModelEditor checkpoint: ModelEditor.load(path, model, tokenizer), whose "
                    ".editors are GroupedEditors" if CHECKPOINT_KEY in meta else "")
            raise ValueError(f"{path} is not a GroupedEditor checkpoint (no dcedit_config metadata){hint}")
        config = json_metadata(path, "dcedit_config", meta["dcedit_config"])
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(config) - set(params) - {"self"})
        if unknown:
            raise ValueError(f"{path}: its config has arguments this GroupedEditor does not take ({unknown}): "
                             "written by a newer dcedit_kernels?")
        missing = sorted(n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                         and n not in config)
        if missing:
            raise ValueError(f"{path}: its config lacks the arguments {missing} this GroupedEditor needs")
        config = with_absent_defaults(config)
        check_saved_shapes(path, config, state, f"{path}: the tensors do not match its config",
                           lambda k: f"{path}: tensor {k}", cls)
        # Built on the CPU whatever torch.set_default_device says, then moved to map_location: under a
        # "meta" default device (left on after building a model skeleton) the move raised "Cannot copy
        # out of meta tensor".
        try:  # the seed, which check_saved_shapes leaves out, is the file's too
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # an unseeded editor's draws: not the caller's
                editor = cls(**config)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f"{path}: its config is not one this GroupedEditor takes ({exc})") from None
        state = {k: v.to(map_location) for k, v in state.items()}
        editor.check_saved_state(state, lambda k: f"{path}: tensor {k}")
        editor.load_saved_state(state, map_location)
        return editor

    def check_saved_state(self, state: dict, name=lambda key: key) -> None:
        """ValueError (`name(key)` names the tensor) for a state `save` cannot have written: a tensor
        that is not floating-point (load_state_dict cast an int one silently), or parameters of
        several dtypes (`load_saved_state` takes alpha's, so an fp16 alpha alone made an fp32 editor
        fp16).  Keys and shapes are `check_state`'s."""
        for key, value in state.items():
            if not value.is_floating_point():
                raise ValueError(f"{name(key)} is {value.dtype}: an editor's tensors are floating-point")
        alpha = state.get("alpha")
        for key, _ in self.named_parameters():
            if alpha is not None and key in state and state[key].dtype != alpha.dtype:
                raise ValueError(f"{name(key)} is {state[key].dtype} but alpha is {alpha.dtype}: an editor's "
                                 "parameters share one dtype")

    def load_saved_state(self, state: dict, device=None) -> None:
        """`load_state_dict(state)` in the saved editor's dtype (its alpha's: a float64 editor stays
        exact, a bf16 one bf16; the running norms keep their own fp32), on `device` if given:
        load_state_dict alone copies into this editor's tensors, rounding a float64 editor to fp32.
        The caller checks `state` first (`check_saved_state`)."""
        alpha = state.get("alpha")
        dtype = alpha.dtype if alpha is not None and alpha.is_floating_point() else None
        self.to(device=device, dtype=dtype)
        self.load_state_dict(state)

    @classmethod
    def from_mend_state_dict(cls, state_dict, inner_params, shapes, prefix="mend.") -> dict[str, MendWeightView]:
        """{inner parameter: MendWeightView} of an original MEND checkpoint (each the editor of
        its weight shape with that weight's mode and edit_lr); see
        :func:`dcedit_kernels.compat.mend.load`."""
        from ..compat.mend import load

        return load(state_dict, inner_params, shapes, prefix=prefix)


# Here rather than in compat.mend, which builds the views and re-exports the class: compat.mend
# imports this module, and from_mend_state_dict's return type must be a name of this module for
# typing.get_type_hints to resolve it.
class MendWeightView:
    """MEND's editor for one inner parameter: its GradientTransform, its mode and its edit_lr.

    ``view(mu, eta, edit_offsets)`` returns the edit (:class:`GroupedEdit`, ops' out×in view,
    ``alpha`` = this weight's edit_lr) computed in eval mode; ``view.shift(...)`` MEND's
    ``mean_grads[name]`` in the orientation of the stored weight; ``view.apply_(weight, ...)``
    adds ``edit_lr · shift`` to the weight in place.  ``conv1d`` says the weight is stored
    in × out (GPT-2's Conv1D), where MEND's shift is ``Σ μ̃ η̃ᵀ``; ops always see out × in.
    Views of weights of one shape share one editor (``.editor``), as MEND's shared editors do.
    """

    def __init__(self, name: str, editor: GroupedEditor, mode: int, conv1d: bool):
        self.name, self.editor, self.mode, self.conv1d = name, editor, mode, conv1d

    @property
    def in_features(self) -> int:
        return self.editor.in_features

    @property
    def out_features(self) -> int:
        return self.editor.out_features

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the stored weight: (out, in), or (in, out) for a Conv1D."""
        i, o = self.in_features, self.out_features
        return (i, o) if self.conv1d else (o, i)

    @property
    def edit_lr(self) -> torch.Tensor:
        return self.editor.alpha[self.mode]

    def __repr__(self) -> str:
        return (f"MendWeightView({self.name!r}, in={self.in_features}, out={self.out_features}, "
                f"mode={self.mode}, conv1d={self.conv1d})")

    def __call__(self, mu, eta, edit_offsets=None) -> GroupedEdit:
        """The edit of this weight from mu (T, in), eta (T, out); edit_offsets None = one edit.

        MEND flattens every edit's tokens into one sum, so the segments only matter for
        bookkeeping; the running statistics stay frozen whatever the editor's mode.
        """
        for arg, t in (("mu", mu), ("eta", eta)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if edit_offsets is None:
            edit_offsets = torch.tensor([0, mu.shape[0]], dtype=torch.int32, device=mu.device)
        # Factors captured on another device (a split model) go to the editor's; no-ops otherwise.
        device = self.editor.alpha.device
        mu, eta = mu.to(device), eta.to(device)
        if isinstance(edit_offsets, torch.Tensor):  # anything else: the editor's ValueError
            edit_offsets = edit_offsets.to(device)
        was_training = self.editor.training
        self.editor.train(False)
        try:
            return self.editor(mu, eta, edit_offsets, mode=self.mode)
        finally:
            self.editor.train(was_training)

    def shift(self, mu, eta, edit_offsets=None) -> torch.Tensor:
        """MEND's shift (its ``mean_grads[name]``), without edit_lr, shaped like the weight."""
        delta = self(mu, eta, edit_offsets).dense()
        return delta.t() if self.conv1d else delta

    @torch.no_grad()
    def apply_(self, weight, mu, eta, edit_offsets=None) -> torch.Tensor:
        """weight += edit_lr · shift in place (MEND's ``p + edit_lrs[idx] * shift``).

        Returns the previous values of weight: ``ops.undo_shift_(weight, previous)`` restores it
        bit for bit.  Raises ValueError on a bad argument and FloatingPointError on a non-finite
        shift or sum, leaving weight untouched.
        """
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != self.weight_shape:
            layout = "in × out (Conv1D)" if self.conv1d else "out × in (nn.Linear)"
            raise ValueError(f"weight must have shape {self.weight_shape} ({layout}) for {self.name!r}, "
                             f"got {tuple(weight.shape)}")
        edit = self(mu, eta, edit_offsets)  # under no_grad: no graph is kept
        # The shift is formed where the weight is, from the factors moved there once.
        device = weight.device
        delta = ops.grouped_outer(edit.eta_t.to(device), edit.mu_t.to(device), edit.offsets.to(device), "add")
        if self.conv1d:
            delta = delta.t().contiguous()
        return apply_finite_shift_(weight, delta, float(edit.alpha))


def check_saved_shapes(path, config: dict, state: dict, mismatch: str, name, cls=None) -> None:
    """ValueError naming `path` unless the editor of the saved `config` holds `state`'s tensors, each
    of its shape (`check_state`'s `mismatch` and `name`): checked without building it, before the
    loads build it.  The config's sizes are the file's: built, they allocated first (a GroupedEditor
    of in_features=10**6: 200 MB, n_editors=10**6: 1 GB, before the shapes were refused), a million
    layers took minutes, a size beyond int64 raised torch's TypeError, and the constructor's
    ValueError did not name the file."""
    import inspect

    cls = cls or GroupedEditor
    saved_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    n_layers = config.get("n_layers", inspect.signature(cls.__init__).parameters["n_layers"].default)
    if is_int(n_layers) and n_layers != saved_layers:  # the one size the constructor loops over
        raise ValueError(f"{path}: its config has n_layers={n_layers}, its tensors hold {saved_layers} layers")
    try:
        # The tensors' shapes, no memory: unseeded, as a seeded build on "meta" repeats its draws on
        # the CPU (seeded_draw_) to advance the routing generator.
        with torch.device("meta"):
            expected = cls(**{**config, "seed": None}).state_dict()
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise ValueError(f"{path}: its config is not one this GroupedEditor takes ({exc})") from None
    check_state(state, expected, mismatch, name)


# Editor arguments newer than some checkpoints, and the value a config without them was trained
# with (before gate_norm existed the gate read the raw features), for gate-routed editors.
ABSENT_GATE_ARGUMENTS = {"gate_norm": False}


class _GeneratorState(bytes):
    """A CPU torch.Generator's state (its seed and position) as it is pickled: plain bytes."""

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.set_state(torch.frombuffer(bytearray(self), dtype=torch.uint8))
        return gen


def with_absent_defaults(config: dict, method: str | None = None) -> dict:
    """A saved editor config with the arguments it predates set to what it was trained with, and
    (`without_ignored_top_k`, `without_ignored_sizes`) a gateless editor's top_k, which it never
    read, at 1, its feat_dim at None, and the generator_hidden of one without ψ at 64; with the
    ModelEditor `method` that saved it, a one-editor method's fusion at "add" (`ignored_fusion`)."""
    config = without_ignored_sizes(without_ignored_top_k(config))
    if ignored_fusion(method, config):
        config = {**config, "fusion": "add"}
    if isinstance(config, dict) and config.get("routing") == "gate":
        return {**ABSENT_GATE_ARGUMENTS, **config}
    return config


def without_ignored_top_k(config):
    """A saved editor `config` with top_k 1 where no gate reads it: up to 0.5.22 a RaEditor took
    top_k=2 and ignored it (the constructor refuses it now), so its checkpoint loads as the editor
    it was.  A top_k that is no int > 1 is left for the constructor to refuse."""
    if (isinstance(config, dict) and config.get("routing") in ("random", "single") and is_int(config.get("top_k"))
            and config["top_k"] > 1):
        return {**config, "top_k": 1}
    return config


def without_ignored_sizes(config):
    """A saved editor `config` with feat_dim None where no gate reads it, and generator_hidden at its
    default where no ψ reads it: up to 0.5.24 RaEditor(feat_dim=20) or MEND(generator_hidden=128) was
    taken and read by nothing (the constructor refuses them now), so its checkpoint loads as the editor
    it was.  A value that is no positive int is left for the constructor to refuse."""
    if not isinstance(config, dict):
        return config
    if config.get("routing") in ("random", "single") and is_int(config.get("feat_dim")) and config["feat_dim"] >= 1:
        config = {**config, "feat_dim": None}
    hidden = config.get("generator_hidden")
    if config.get("generator") is None and is_int(hidden) and hidden >= 1 and hidden != GENERATOR_HIDDEN_DEFAULT:
        config = {**config, "generator_hidden": GENERATOR_HIDDEN_DEFAULT}
    return config


def ignored_sizes(method: str | None, kwargs) -> list[str]:
    """The names among feat_dim and generator_hidden that a checkpoint's editor_kwargs `kwargs` of
    `method` hold and its editors never read: those `without_ignored_sizes` changes once the
    kwargs carry the preset's routing and generator; its checkpoint loads without them."""
    if not isinstance(kwargs, dict) or method not in PRESET_ROUTING:
        return []
    # The preset's generator where editor_kwargs do not name one: ProEditor's is "token" (ψ reads
    # generator_hidden), the others' None.  ProEditor(generator=None), which has no ψ, is one of these
    # too: left out, its 0.5.24 checkpoint with generator_hidden=128 failed to load ("generator_hidden:
    # saved 64, here 128", its editors' configs being `without_ignored_sizes`').
    generator = kwargs["generator"] if "generator" in kwargs else ("token" if method == "proeditor" else None)
    kept = without_ignored_sizes({**kwargs, "routing": PRESET_ROUTING[method], "generator": generator})
    return [name for name in ("feat_dim", "generator_hidden") if name in kwargs and kept[name] != kwargs[name]]


# The routing of each ModelEditor editor method's preset.
PRESET_ROUTING = {"mend": "single", "raeditor": "random", "moeditor": "gate", "proeditor": "single"}


# The ModelEditor methods of one editor (the MEND and ProEditor presets).  Up to 0.5.23 they took a
# fusion other than "add", saved it in editor_kwargs and each editor's config, and fused nothing with
# it (of one group shift every fusion is that shift, bit for bit); their presets refuse it since.
ONE_EDITOR_METHODS = ("mend", "proeditor")


def ignored_fusion(method: str | None, config) -> bool:
    """Whether `config` (a checkpoint's editor_kwargs, or one of its editors' configs) of a one-editor
    `method` holds such a fusion: its checkpoint loads, and its training run resumes, as "add".  A
    value that is no fusion is left for the constructor to refuse."""
    return method in ONE_EDITOR_METHODS and isinstance(config, dict) and config.get("fusion") in ("max", "sss", "ssm")


# The ModelEditor methods without a gate.  Up to 0.5.24 they took gate_norm=False, saved it in
# editor_kwargs (not in their editors' configs, which hold gate_norm only under a gate) and read nothing
# of it; GroupedEditor refuses it since.
GATELESS_METHODS = tuple(m for m, routing in PRESET_ROUTING.items() if routing != "gate")


def ignored_gate_norm(method: str | None, kwargs) -> bool:
    """Whether a checkpoint's editor_kwargs `kwargs` of a gateless `method` hold such a gate_norm: its
    checkpoint loads without it.  A value that is no bool is left for the constructor to refuse."""
    return method in GATELESS_METHODS and isinstance(kwargs, dict) and kwargs.get("gate_norm") is False


def config_differences(saved: dict, now: dict) -> str:
    """"name: saved x, here y" for each argument where a saved editor config and this one differ."""
    return "; ".join(f"{k}: saved {saved.get(k)!r}, here {now.get(k)!r}"
                     for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))


def check_factor_values(mu, eta) -> None:
    """ValueError for factors without values to read (meta or fake tensors) and under torch.export.

    The forward reads them: MEND's all-zero token rows are dropped, so the edit's rows depend on
    their values, and the running norms read their count.  On meta or fake tensors (FakeTensorMode,
    torch.export's tracing) that read failed inside torch ("Tensor.item() cannot be called on meta
    tensors", DataDependentOutputException, GuardOnDataDependentSymNode), naming nothing.  Not
    while torch.compile traces (outside export): it breaks the graph there and reads real values."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    if exporting or (not tracing() and (no_values(mu) or no_values(eta))):
        got = "under torch.export" if exporting else f"got {'meta' if mu.is_meta or eta.is_meta else 'fake'} tensors"
        raise ValueError(f"mu and eta must hold values: an editor's forward reads them (it drops MEND's all-zero "
                         f"token rows, so the edit's shape depends on them), {got}; the ops of dcedit_kernels.ops "
                         "run on meta and fake tensors")


def ops_check_offsets(edit_offsets, total):
    from .._checks import check_offsets

    return check_offsets(edit_offsets, "edit_offsets", total)
