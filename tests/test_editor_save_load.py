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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_loaded_editor_keeps_its_dtype(method, dtype, gen, tmp_path):
    """An editor moved to float64 or bf16 comes back in that dtype, bit for bit (it came back in
    fp32: float64 weights rounded, so that its shifts differed from the saved editor's)."""
    editor = _trained_looking(small_editor(method, 7), gen).to(dtype).eval()
    path = tmp_path / "editor.safetensors"
    editor.save(str(path))
    twin = copy.deepcopy(editor)
    loaded = GroupedEditor.load(str(path)).eval()
    for (name, a), b in zip(editor.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    mu, eta, offsets, feats = editor_inputs(gen, torch.float64)
    assert torch.equal(loaded.dense(mu, eta, offsets, 0, feats), twin.dense(mu, eta, offsets, 0, feats))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_get_the_mode_the_umask_gives(umask, tmp_path):
    """safetensors 0.8 leaves its temporary file's mode, 0600, on the file it writes: a saved editor
    was unreadable to the user's group whatever the umask.  Every checkpoint writer goes through
    `save_safetensors`: the editor's, the ModelEditor's, and the trainer's."""
    import os
    import stat

    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.models import tiny_model
    from dcedit_kernels.train import TrainConfig
    from test_model_editor import random_requests

    old = os.umask(umask)
    try:
        small_editor("mend").save(str(tmp_path / "editor.safetensors"))
        model, tok = tiny_model("llama", seed=0)
        me = ModelEditor(model, tok, ["model.layers.0.mlp.down_proj"], method="mend", rank=3)
        me.save(tmp_path / "model_editor.safetensors")
        me.fit(random_requests(torch.Generator().manual_seed(0), 4),
               config=TrainConfig(steps=1, batch_size=2, progress=False, checkpoint_dir=str(tmp_path / "ckpt")))
    finally:
        os.umask(old)
    files = [tmp_path / "editor.safetensors", tmp_path / "model_editor.safetensors",
             *(tmp_path / "ckpt").glob("*.safetensors")]
    assert len(files) >= 4 and not list(tmp_path.rglob("*.tmp"))
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert GroupedEditor.load(str(files[0])).config == small_editor("mend").config


def test_threads_saving_the_same_path_do_not_collide(tmp_path):
    """Each write has its own temporary name (one per process id collided between threads: one
    thread moved the other's file away), and a long file name still fits."""
    from concurrent.futures import ThreadPoolExecutor

    from dcedit_kernels.safetensors_file import save_safetensors

    path = tmp_path / "same.safetensors"
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: save_safetensors(tensors, path), range(40)))
    long = tmp_path / ("e" * 240 + ".safetensors")
    save_safetensors(tensors, long)
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["w"], tensors["w"]) and torch.equal(load_file(long)["w"], tensors["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, long.name])
