"""The edited pass's locality rows run from the lowest edited block on the KL reference pass's
hidden states (block_prefix, TrainConfig.reuse_prefix): the same loss and editor gradients as the
full pass on every architecture, lower blocks not run, and the full pass wherever reuse would not
be exact."""

import pytest
import torch

from dcedit_kernels import block_prefix
from dcedit_kernels.block_prefix import PrefixReuse
from dcedit_kernels.capture import frozen_parameters
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.train import TrainConfig, batch_loss

from test_architectures import ARCHS, build
from test_model_editor import one_thread, random_requests  # noqa: F401 (one_thread: autouse fixture)

UPPER = {"gpt2": "transformer.h.1.mlp.c_proj", "llama": "model.layers.1.mlp.down_proj"}


def model_and_upper_layer(arch, gen):
    """A float64 2-block model in eval mode and the MLP output layer of its block 1 (k = 1)."""
    if arch in UPPER:
        model, tok = tiny_model(arch, seed=int(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float64)
        return model.eval(), tok, [UPPER[arch]]
    model, tok, layers = build(arch, gen)
    return model, tok, layers[1:]


def loss_and_grads(me, reqs, **config):
    """The training loss of one batch and its gradients in the editors' parameters (editors in
    eval mode: no gate noise), and how many edited passes reused the prefix."""
    entered = []
    reuse = PrefixReuse.reuse

    def counting(self, key):
        entered.append(tuple(key))
        return reuse(self, key)

    params = [p for p in me.parameters() if p.requires_grad]
    with pytest.MonkeyPatch.context() as mp, frozen_parameters(me.model):
        mp.setattr(PrefixReuse, "reuse", counting)
        loss, _ = batch_loss(me, reqs, TrainConfig(batch_size=len(reqs), **config))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], entered


def assert_same(a, b):
    assert torch.allclose(a[0], b[0], rtol=1e-10, atol=0)
    for x, y in zip(a[1], b[1]):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("length_buckets", [False, True])
@pytest.mark.parametrize("arch", sorted(ARCHS) + sorted(UPPER))
def test_reused_prefix_gives_the_full_pass_loss_and_grads(arch, length_buckets, gen):
    model, tok, layers = model_and_upper_layer(arch, gen)
    me = ModelEditor(model, tok, layers, method="moeditor", n_editors=2, rank=3)
    me.editors.to(torch.float64)
    me.eval()
    reqs = random_requests(gen, 5)
    calls = []  # block 0's batch rows, per call
    block0 = model.get_submodule(block_prefix._block_of(model, layers[0])[0])[0]
    forward = block0.forward  # counted through an instance-level forward (a hook would stop the reuse)
    block0.forward = lambda *args, **kwargs: calls.append(args[0].shape[0]) or forward(*args, **kwargs)
    try:
        full = loss_and_grads(me, reqs, reuse_prefix=False, length_buckets=length_buckets)
        full_rows = sum(calls)
        calls.clear()
        reused = loss_and_grads(me, reqs, reuse_prefix=True, length_buckets=length_buckets)
    finally:
        del block0.forward
    assert full[2] == [] and reused[2], "the prefix was not reused"
    # Block 0 runs on each locality row once, in the reference pass, not again in the edited one.
    assert sum(calls) == full_rows - sum(len(key) for key in reused[2])
    assert_same(reused, full)


def test_prefix_reuse_is_not_used_where_it_would_not_be_exact(gen):
    """Block 0 of the edited modules (k = 0), modules outside one block list, a model in train
    mode, blocks shared between the prefix and the rest: no PrefixReuse."""
    model, tok = tiny_model("llama", seed=0, dtype=torch.float64)
    model.eval()
    modules = lambda *names: {n: model.get_submodule(n) for n in names}  # noqa: E731
    assert PrefixReuse.for_model(model, modules("model.layers.1.mlp.down_proj")).k == 1
    assert PrefixReuse.for_model(model, modules("model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj")) is None
    assert PrefixReuse.for_model(model, modules("model.layers.1.mlp.down_proj", "lm_head")) is None
    assert PrefixReuse.for_model(model, {}) is None
    model.train()
    assert PrefixReuse.for_model(model, modules("model.layers.1.mlp.down_proj")) is None
    model.eval()
    shared = model.model.layers[1].mlp.down_proj
    model.model.layers[0].mlp.down_proj = shared  # one module in block 0 and block 1
    assert PrefixReuse.for_model(model, modules("model.layers.1.mlp.down_proj")) is None
    model.model.layers[0] = model.model.layers[1]  # one block twice
    assert PrefixReuse.for_model(model, modules("model.layers.1.mlp.down_proj")) is None


@pytest.mark.parametrize("where", ["lower block hook", "between blocks", "global hook"])
def test_hooks_or_a_changed_hidden_state_fall_back_to_the_full_pass(where, gen):
    """A hook on a lower block would run again on the recorded output, and a hidden state changed
    between blocks breaks the chain the record checks: the edited pass then runs every block, and
    the loss is the full pass's."""
    model, tok, layers = model_and_upper_layer("llama", gen)
    me = ModelEditor(model, tok, layers, method="mend", rank=3)
    me.editors.to(torch.float64)
    me.eval()
    reqs = random_requests(gen, 4)
    blocks = model.model.layers
    if where == "lower block hook":
        handle = blocks[0].register_forward_hook(lambda module, args, out: None)
    elif where == "between blocks":  # block 1 sees a new tensor, not the one block 0 returned
        handle = blocks[1].register_forward_pre_hook(lambda module, args: (args[0] * 1.0,) + args[1:])
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        full = loss_and_grads(me, reqs, reuse_prefix=False)
        fallback = loss_and_grads(me, reqs, reuse_prefix=True)
    finally:
        handle.remove()
    assert fallback[2] == []
    assert_same(fallback, full)


def test_record_keeps_nothing_when_the_pass_raises_or_has_another_shape(gen):
    model, tok, layers = model_and_upper_layer("llama", gen)
    prefix = PrefixReuse.for_model(model, {layers[0]: model.get_submodule(layers[0])})
    ids = torch.randint(3, 20, (2, 5), generator=gen)
    with prefix.record([0, 1], (2, 5)):
        model(input_ids=ids)
    assert _hidden_shape(prefix.recorded[(0, 1)]) == (2, 5)
    with prefix.record([0, 1], (2, 4)):  # not the pass's (rows, width)
        model(input_ids=ids)
    assert (0, 1) not in prefix.recorded
    with pytest.raises(RuntimeError, match="stop"), prefix.record([0, 1], (2, 5)):
        model(input_ids=ids)
        raise RuntimeError("stop")
    assert not prefix.recorded
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.model.layers)


def _hidden_shape(output):
    return tuple(block_prefix._hidden(output).shape[:2])


def test_reuse_restores_the_blocks_forwards(gen):
    model, tok, layers = model_and_upper_layer("llama", gen)
    prefix = PrefixReuse.for_model(model, {layers[0]: model.get_submodule(layers[0])})
    ids = torch.randint(3, 20, (2, 5), generator=gen)
    with prefix.record([0, 1], (2, 5)):
        want = model(input_ids=ids).logits
    own = object()
    model.model.layers[0].__dict__["forward"] = own  # an instance-level forward set before (accelerate's)
    try:
        with pytest.raises(RuntimeError, match="stop"), prefix.reuse([0, 1]):
            assert torch.equal(model(input_ids=ids, use_cache=False).logits, want)
            raise RuntimeError("stop")
        assert model.model.layers[0].forward is own
    finally:
        del model.model.layers[0].forward
    assert "forward" not in model.model.layers[0].__dict__


def test_train_config_checks_reuse_prefix():
    with pytest.raises(ValueError, match="reuse_prefix must be a bool"):
        TrainConfig(reuse_prefix=None)


@pytest.mark.parametrize("arch", sorted(UPPER))
def test_accelerate_dispatched_model_reuses_the_prefix(arch, gen):
    """accelerate's hooks wrap each block's forward (no registered hook): the prefix is reused,
    the blocks' wrapped forwards come back after each pass, and the loss is the plain model's."""
    accelerate = pytest.importorskip("accelerate")
    from test_multi_device import accelerate_device_map

    plain, tok, layers = model_and_upper_layer(arch, gen)
    twin, _ = tiny_model(arch)
    twin.load_state_dict(plain.state_dict())
    twin = accelerate.dispatch_model(twin.double().eval(), device_map=accelerate_device_map(twin, arch, "cpu"),
                                     force_hooks=True)
    blocks = twin.get_submodule(block_prefix._block_of(twin, layers[0])[0])
    wrapped = blocks[0].__dict__["forward"]
    reqs = random_requests(gen, 4)
    results = []
    for model in (plain, twin):
        me = ModelEditor(model, tok, layers, method="mend", rank=3, seed=0)
        me.editors.to(torch.float64)
        me.eval()
        results.append(loss_and_grads(me, reqs, reuse_prefix=True))
    assert results[1][2], "the prefix was not reused"
    assert blocks[0].__dict__["forward"] is wrapped
    assert_same(results[1], results[0])


def test_blocks_moved_by_hooks_fall_back_to_the_full_pass():
    """A model split by hand, with hooks on the blocks that move their inputs (test_multi_device's
    harness): the hooks rule the reuse out, and the loss is the one-device model's."""
    from test_multi_device import assert_training_step_matches, twins

    me_ref, me_split = twins("llama", ("cpu", "cpu"), "mend")
    upper = ["model.layers.1.mlp.down_proj"]
    me_ref, me_split = (ModelEditor(me.model, me.tokenizer, upper, method="mend", rank=4, seed=0)
                        for me in (me_ref, me_split))
    assert PrefixReuse.for_model(me_split.model, me_split.modules)._hooked()
    assert_training_step_matches(me_ref, me_split, "mend", exact=True)
