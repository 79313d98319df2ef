"""GroupedEditor.save / GroupedEditor.load (safetensors with the constructor arguments): the
loaded editor equals the saved one, seed included (it was dropped: a saved seeded RaEditor came
back routing from torch's global generator)."""

import copy

import pytest
import torch

from dcedit_kernels.editors import MEND, GroupedEditor, MoEditor, ProEditor, RaEditor
from helpers import randn, ragged_offsets

D_IN, D_OUT = 5, 6
EDITORS = {
    "mend": lambda seed: MEND(D_IN, D_OUT, rank=3, seed=seed),
    "raeditor": lambda seed: RaEditor(D_IN, D_OUT, n_editors=3, rank=3, seed=seed),
    "moeditor": lambda seed: MoEditor(D_IN, D_OUT, n_editors=3, feat_dim=D_OUT, rank=3, seed=seed),
    "proeditor": lambda seed: ProEditor(D_IN, D_OUT, rank=3, seed=seed),
}


def _trained_looking(editor, gen):
    """Random weights and warm norms, so that a lost tensor shows in the output."""
    with torch.no_grad():
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if editor.norm is not None:
        editor.norm.update(randn((9, D_IN), gen), randn((9, D_OUT), gen))
    return editor


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("method", list(EDITORS))
def test_loaded_editor_equals_the_saved_one(method, seed, gen, tmp_path):
    editor = _trained_looking(EDITORS[method](seed), gen).eval()
    path = tmp_path / "editor.safetensors"
    editor.save(str(path))
    twin = copy.deepcopy(editor)  # the saved editor as it was, for RaEditor's first routing draw
    loaded = GroupedEditor.load(str(path)).eval()
    assert loaded.config == editor.config and loaded.seed == seed
    for (name, a), b in zip(editor.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    mu, eta, feats = randn((7, D_IN), gen), randn((7, D_OUT), gen), randn((3, D_OUT), gen)
    offsets = ragged_offsets([3, 0, 4])
    if method == "raeditor" and seed is None:
        torch.manual_seed(0)
        want = twin.dense(mu, eta, offsets, 0, feats)
        torch.manual_seed(0)
        got = loaded.dense(mu, eta, offsets, 0, feats)
    else:  # a seeded editor routes from its own generator, restarted from the seed on load
        want = twin.dense(mu, eta, offsets, 0, feats)
        got = loaded.dense(mu, eta, offsets, 0, feats)
    assert torch.equal(got, want)
