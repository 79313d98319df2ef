"""The paper's editors as GroupedEditor presets."""

from .grouped_editor import GroupedEditor


def MEND(in_features, out_features, **kwargs) -> GroupedEditor:
    """One editor (Mitchell et al. 2021)."""
    kwargs.setdefault("routing", "single")
    kwargs.setdefault("fusion", "add")
    return GroupedEditor(in_features, out_features, n_editors=1, **kwargs)


def RaEditor(in_features, out_features, n_editors=4, **kwargs) -> GroupedEditor:
    """Edits split into random groups, one editor per group, group shifts fused."""
    kwargs.setdefault("fusion", "sss")
    return GroupedEditor(in_features, out_features, n_editors=n_editors, routing="random", **kwargs)


def MoEditor(in_features, out_features, n_editors=4, feat_dim=None, **kwargs) -> GroupedEditor:
    """A noisy top-k gate routes each edit to one of n_editors editors; shifts fused."""
    kwargs.setdefault("fusion", "sss")
    return GroupedEditor(in_features, out_features, n_editors=n_editors, routing="gate", feat_dim=feat_dim,
                         **kwargs)


def ProEditor(in_features, out_features, generator="token", fisher_keep=0.7, **kwargs) -> GroupedEditor:
    """One editor with generated per-token (or per-edit) parameters and a Fisher mask."""
    kwargs.setdefault("routing", "single")
    kwargs.setdefault("fusion", "add")
    return GroupedEditor(in_features, out_features, n_editors=1, generator=generator,
                         fisher_keep=fisher_keep, **kwargs)
