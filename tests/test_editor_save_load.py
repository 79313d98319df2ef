"""GroupedEditor.save / GroupedEditor.load (safetensors with the constructor arguments): the
loaded editor equals the saved one, seed included (it was dropped: a saved seeded RaEditor came
back routing from torch's global generator)."""

import copy

import pytest
import torch

from dcedit_kernels.editors import GroupedEditor
from helpers import EDITOR_KINDS, OP_CASE_DIMS, editor_inputs, randn, small_editor

D_IN, D_OUT = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]


def _trained_looking(editor, gen):
    """Random weights and warm norms, so that a lost tensor shows in the output."""
    with torch.no_grad():
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if editor.norm is not None:
        editor.norm.update(randn((9, D_IN), gen), randn((9, D_OUT), gen))
    return editor


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_loaded_editor_equals_the_saved_one(method, seed, gen, tmp_path):
    editor = _trained_looking(small_editor(method, seed), gen).eval()
    path = tmp_path / "editor.safetensors"
    editor.save(str(path))
    twin = copy.deepcopy(editor)  # the saved editor as it was, for RaEditor's first routing draw
    loaded = GroupedEditor.load(str(path)).eval()
    assert loaded.config == editor.config and loaded.seed == seed
    for (name, a), b in zip(editor.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    mu, eta, offsets, feats = editor_inputs(gen)
    if method == "raeditor" and seed is None:
        torch.manual_seed(0)
        want = twin.dense(mu, eta, offsets, 0, feats)
        torch.manual_seed(0)
        got = loaded.dense(mu, eta, offsets, 0, feats)
    else:  # a seeded editor routes from its own generator, restarted from the seed on load
        want = twin.dense(mu, eta, offsets, 0, feats)
        got = loaded.dense(mu, eta, offsets, 0, feats)
    assert torch.equal(got, want)
