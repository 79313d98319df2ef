"""The paper's editors as GroupedEditor presets."""

from .grouped_editor import GroupedEditor

_ONE_EDITOR = "has one editor; n_editors is for RaEditor and MoEditor"


def _refuse_fixed(preset: str, kwargs: dict, name: str, why: str) -> None:
    """A preset passes `name` itself: given again it would reach GroupedEditor twice (Python's
    TypeError "got multiple values"), so say which preset fixes it and why."""
    if name in kwargs:
        raise ValueError(f"{preset} {why}, got {name}={kwargs[name]!r}")


def _refuse_fusion(preset: str, kwargs: dict) -> None:
    """A one-editor preset forms one group shift, which every fusion gives as it is ("max", "sss" and
    "ssm" of a single S are S): a fusion other than its "add" was taken and applied nothing, which a
    caller asking MEND for "max" (say, to fuse the edits' shifts) could not tell."""
    fusion = kwargs.get("fusion", "add")
    if not (isinstance(fusion, str) and fusion == "add"):
        raise ValueError(f"{preset} has one editor, so there are no group shifts to fuse (fusion combines the "
                         f"shifts of RaEditor's and MoEditor's editors, and of one every fusion is the same): "
                         f"leave fusion at 'add', got fusion={fusion!r}")


def _refuse_routing(preset: str, kwargs: dict) -> None:
    """A one-editor preset sends every edit to its one editor whatever the routing: "random" was taken
    and split nothing (only its draws advanced the seeded generator), and "gate" built a gate of one
    editor whose weight is always 1 and which only made forward require edit_feats."""
    routing = kwargs.get("routing", "single")
    if not (isinstance(routing, str) and routing == "single"):
        raise ValueError(f"{preset} has one editor, so there is nothing to route (routing splits the edits among "
                         f"RaEditor's and MoEditor's editors): leave routing at 'single', got routing={routing!r}")


def _one_editor(preset: str, kwargs: dict) -> None:
    """The one-editor presets' (MEND's, ProEditor's) checks and defaults: n_editors, fusion and
    routing refused unless they are the one editor's, routing "single" and fusion "add" set."""
    _refuse_fixed(preset, kwargs, "n_editors", _ONE_EDITOR)
    _refuse_fusion(preset, kwargs)
    _refuse_routing(preset, kwargs)
    kwargs.setdefault("routing", "single")
    kwargs.setdefault("fusion", "add")


def MEND(in_features, out_features, **kwargs) -> GroupedEditor:
    """One editor (Mitchell et al. 2021): GroupedEditor with routing "single" and fusion "add" (another
    routing or fusion is refused: `_refuse_routing`, `_refuse_fusion`); its other keywords (rank, n_layers, n_modes, norm, edit_lr,
    seed, ...) are GroupedEditor's."""
    _one_editor("MEND", kwargs)
    return GroupedEditor(in_features, out_features, n_editors=1, **kwargs)


def RaEditor(in_features, out_features, n_editors=4, **kwargs) -> GroupedEditor:
    """Edits split into `n_editors` random groups, one editor per group, group shifts fused ("sss" unless
    `fusion` says otherwise); the other keywords are GroupedEditor's."""
    _refuse_fixed("RaEditor", kwargs, "routing", "routes edits at random (MoEditor routes them with a gate)")
    kwargs.setdefault("fusion", "sss")
    return GroupedEditor(in_features, out_features, n_editors=n_editors, routing="random", **kwargs)


def MoEditor(in_features, out_features, n_editors=4, feat_dim=None, **kwargs) -> GroupedEditor:
    """A noisy top-k gate routes each edit to one of n_editors editors; shifts fused ("sss" unless
    `fusion` says otherwise); the other keywords are GroupedEditor's.

    The gate reads `edit_feats`, forward's (E, feat_dim) argument, which it needs.  ModelEditor
    passes each edit's mean over its prompt tokens of the model's last hidden state (the LM head's
    input, `head_input.py`; the encoder's output for seq2seq models), detached: feat_dim is then
    the model's hidden size.  feat_dim=None makes it in_features, which fits those features only
    where the edited weight's input is as wide as the hidden state (an attention projection or an
    MLP's up projection, not its down projection).

    top_k defaults to 2 (1 with one editor).  The edit goes to its top-1 editor with η̃ scaled by
    that editor's gate weight, the softmax over the kept logits: at top_k = 1 that weight is
    always 1, so no gradient of the edit or locality loss reaches the gate and only the balance
    loss trains it (Shazeer et al. keep k ≥ 2; Switch gates softmax over all logits for this
    reason).  Measured on SmolLM2 / CounterFact (RESULTS.md, N_g = 2, 150 × 25 training): at 25
    edits LMP 0.05 ± 0.01 with top-2 against -0.20 ± 0.08 with top-1.  With two editors top-2
    keeps both logits, so the balance loss's load term is constant and only its importance term
    (the summed soft gate weights) balances the routing.

    gate_norm (default True): the gate reads the edit features standardised by their running
    mean/std (see GroupedEditor).  On the demo's setting (SmolLM2, 20 × 25 training, 25 held-out
    edits, seeds 0-2) the raw-feature gate sent 0/25, 6/19 and 4/21 of the edits to its two
    editors, the standardised one 14/11, 13/12 and 11/14, for LMP 0.36, 0.63, 0.61 against 0.32,
    0.69, 0.54: balanced routing, no LMP gain.
    """
    _refuse_fixed("MoEditor", kwargs, "routing", "routes edits with a gate (RaEditor routes them at random)")
    kwargs.setdefault("fusion", "sss")
    kwargs.setdefault("top_k", moeditor_top_k_default(n_editors))
    return GroupedEditor(in_features, out_features, n_editors=n_editors, routing="gate", feat_dim=feat_dim,
                         **kwargs)


def moeditor_top_k_default(n_editors) -> int:
    """MoEditor's top_k where none is given: 2, or 1 with one editor (see `MoEditor`)."""
    return min(2, n_editors) if isinstance(n_editors, int) else 1


def ProEditor(in_features, out_features, generator="token", fisher_keep=0.7, **kwargs) -> GroupedEditor:
    """One editor with generated per-token (or per-edit) parameters and a Fisher mask
    (generator "token" or "sentence"; fisher_keep, the fraction of the shift's entries kept); the
    other keywords are GroupedEditor's (routing "single" and fusion "add" only, as MEND's)."""
    _one_editor("ProEditor", kwargs)
    return GroupedEditor(in_features, out_features, n_editors=1, generator=generator,
                         fisher_keep=fisher_keep, **kwargs)
