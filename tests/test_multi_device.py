"""Models split across devices: edit, undo, save/load, baselines and training give what the same
model gives on one device.

The split tests move blocks of a tiny model by hand and hook each block to move its inputs to its
own device, as accelerate's `device_map` hooks do: the input embedding on device B, block 0 (and
the final norm and the LM head) on device A, block 1 on B, so the edited layers of one shape sit
on two devices, their shared editor on the first one, and the logits on another device than the
inputs.  With B = "cuda:0" they need a GPU and are skipped without one; with A = B = "cpu" they run
everywhere and check the harness itself (every move is then a no-op, so results must be exact).
The device-placement rules (`dcedit_kernels.devices`) are tested on the CPU directly.

Seeds are fixed (not per-run random as in the op tests): CPU and CUDA round differently, and a
fixed input keeps a near-tie of the gate or the Fisher mask from flipping between runs.
"""

from types import SimpleNamespace

import pytest
import torch

from helpers import rel_err
from test_model_editor import one_thread  # noqa: F401 (autouse fixture: one intra-op thread)

from dcedit_kernels.capture import weight_out_in
from dcedit_kernels.compat.transformers_versions import dtype_kwarg
from dcedit_kernels.devices import (as_device, check_resident, cuda_indices, input_device, model_devices, module_device,
                                    place_editor)
from dcedit_kernels.evaluate import PeakMemory, measure_edit
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.requests import EditRequest
from dcedit_kernels.train import TrainConfig, batch_loss

HAS_CUDA = torch.cuda.is_available()
PAIRS = [
    pytest.param(("cpu", "cpu"), id="cpu-cpu"),
    pytest.param(("cpu", "cuda:0"), id="cpu-cuda",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")),
]
LAYERS = {
    # Two weights of one shape in blocks 0 and 1 (one shared editor across the split), one more shape.
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"],
    "llama": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"],
    # Cross-attention keys on both devices (their input is the encoder output, moved to block 0's
    # device by the hooks), a decoder and an encoder layer of one more shape.
    "bart": ["model.decoder.layers.0.encoder_attn.k_proj", "model.decoder.layers.1.encoder_attn.k_proj",
             "model.decoder.layers.0.fc1", "model.encoder.layers.1.fc1"],
}


def placement(arch: str, a: str, b: str) -> dict:
    """Embedding on b, block 0 on a, block 1 on b, final norm and LM head on a."""
    if arch == "gpt2":
        return {"transformer.wte": b, "transformer.wpe": b, "transformer.h.0": a, "transformer.h.1": b,
                "transformer.ln_f": a, "lm_head": a}
    if arch == "bart":  # the encoder on b; decoder block 0 on a, the rest of the decoder on b
        return {"model.shared": b, "model.encoder": b, "model.decoder.embed_tokens": b,
                "model.decoder.embed_positions": b, "model.decoder.layernorm_embedding": b,
                "model.decoder.layers.0": a, "model.decoder.layers.1": b, "lm_head": a}
    return {"model.embed_tokens": b, "model.rotary_emb": b, "model.layers.0": a, "model.layers.1": b,
            "model.norm": a, "lm_head": a}


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def split_model(model, where: dict):
    """Move each named submodule to its device and hook it to move its inputs there (what
    accelerate's AlignDevicesHook does for each entry of a device_map)."""
    for name, device in where.items():
        module = model.get_submodule(name)
        module.to(device)
        module.register_forward_pre_hook(
            lambda m, args, kwargs, device=device: (_move(args, device), _move(kwargs, device)), with_kwargs=True)
    return model


def models(arch, pair):
    """(the model on the CPU, the same model split over `pair`, tokenizer)."""
    ref, tok = tiny_model(arch, seed=3)
    split, _ = tiny_model(arch, seed=3)
    return ref, split_model(split, placement(arch, *pair)), tok


def requests(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def words(k):
        return " ".join("".join(letters[int(i)] for i in torch.randint(0, 26, (4,), generator=gen)) for _ in range(k))

    return [EditRequest(prompt=words(3), target=words(2), rephrase=words(3), locality=words(2),
                        locality_target=words(1)) for _ in range(n)]


def randomize(me, seed=1, scale=0.05):
    """Non-trivial editors (the identity init has u = 0), drawn on the CPU, copied to each editor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in me.editors.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * scale)


def twins(arch, pair, method, **kwargs):
    """ModelEditors with identical editors over the CPU model and the split one."""
    ref, split, tok = models(arch, pair)
    kwargs = {"rank": 8, "seed": 0, **kwargs} if method not in ("ft", "ft_kl") else kwargs
    me_ref = ModelEditor(ref, tok, LAYERS[arch], method=method, **kwargs)
    me_split = ModelEditor(split, tok, LAYERS[arch], method=method, **kwargs)
    if len(me_ref.editors):
        randomize(me_ref)
        me_split.load_state_tensors(me_ref.state_tensors())
    return me_ref, me_split


def assert_close(a, b, exact, what):
    a, b = a.detach().cpu(), b.detach().cpu()
    if exact:
        assert torch.equal(a, b), f"{what} differs"
    else:
        assert rel_err(a, b) < 1e-3, f"{what}: relative error {rel_err(a, b):.3g}"


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(before, model):
    for k, v in model.state_dict().items():
        assert before[k].device == v.device, k
        assert torch.equal(before[k].contiguous().view(torch.uint8), v.detach().contiguous().view(torch.uint8)), k


def edited_deltas(me, reqs):
    before = {n: weight_out_in(me.modules[n]).detach().cpu().clone() for n in me.layers}
    handle = me.apply(reqs)
    return handle, {n: weight_out_in(me.modules[n]).detach().cpu() - before[n] for n in me.layers}


def assert_split_edit_matches(me_ref, me_split, reqs, exact, what, nonzero=True):
    """Both twins edit `reqs`: the split model's shifts equal the reference's (and are not all
    zero with `nonzero`), and undo restores the split model bit for bit.  Returns the split
    edit's stats."""
    before = snapshot(me_split.model)
    handle_ref, deltas_ref = edited_deltas(me_ref, reqs)
    handle, deltas = edited_deltas(me_split, reqs)
    for name in me_split.layers:
        if nonzero:
            assert deltas[name].abs().sum() > 0, name
        assert_close(deltas[name], deltas_ref[name], exact, f"{what} of {name}")
    handle.undo()
    handle_ref.undo()
    assert_bit_identical(before, me_split.model)
    return handle.stats


# ---------------------------------------------------------------------------------------------
# Placement rules (CPU)
# ---------------------------------------------------------------------------------------------
def test_editor_placement_rule():
    cpu, cuda1 = torch.device("cpu"), torch.device("cuda:1")  # devices need no hardware to exist
    assert place_editor([cuda1, cpu]) == cuda1  # the first layer of that shape
    assert place_editor([cpu, cuda1], override=cuda1) == cuda1
    with pytest.raises(ValueError, match="layer_devices"):
        place_editor([])
    assert cuda_indices([cpu, torch.device("cuda:2"), cuda1, torch.device("cuda:2")]) == [1, 2]
    with PeakMemory([cpu, cpu]) as memory:  # a split model's device list; no CUDA among them
        pass
    assert memory.method != "cuda_peak_allocated"


def test_as_device_checks_its_argument():
    assert as_device(None, "editor_device") is None
    assert as_device("cpu", "editor_device") == torch.device("cpu")
    assert as_device(torch.device("cpu"), "editor_device") == torch.device("cpu")
    # Devices of backends this machine lacks are refused here, not deep in a later .to() (an
    # unbuilt MPS or XPU raised RuntimeError or AssertionError).
    absent = [d for d in ("mps", "xpu:3") if not getattr(torch, d[:3]).is_available()]
    for bad in ("meta", "cuda:99", "nonsense", 1.5, True, *absent):
        with pytest.raises(ValueError, match="editor_device"):
            as_device(bad, "editor_device")
    # "meta:0" is not torch.device("meta"): it passed, and ModelEditor built its editors on "meta"
    # (apply then failed in Tensor.item()).  Types without an availability check in torch that this
    # build cannot use ("hip", "vulkan", "lazy" on a CPU build) passed too, and failed in the editors' .to().
    unusable = [d for d in ("hip", "vulkan", "lazy") if not _makes_tensors(d)]
    for bad in ("meta:0", torch.device("meta", 1), *unusable):
        with pytest.raises(ValueError, match="editor_device"):
            as_device(bad, "editor_device")


def _makes_tensors(device: str) -> bool:
    try:
        torch.empty(0, device=device)
        return True
    except Exception:
        return False


def test_a_checkpoint_rng_state_of_a_cuda_device_not_in_play_is_not_set(monkeypatch):
    """A run checkpointed with its model split over cuda:0 and cuda:1 and resumed on one GPU (or with
    the model on the CPU): `_set_rng_states` set every saved CUDA state, and on a machine without
    device 1 torch.cuda.set_rng_state raises IndexError (tuple index out of range; simulated here);
    a device outside the run's fork_rng would have kept the checkpoint's state after training."""
    from dcedit_kernels import train_checkpoint

    model, tok = tiny_model("llama")
    me = ModelEditor(model, tok, LAYERS["llama"], method="mend", rank=4)
    states = {"rng_state": torch.get_rng_state(), "cuda_rng.1": torch.zeros(16, dtype=torch.uint8)}
    calls = []

    def missing_device(state, device):
        calls.append(device)
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state", missing_device)
    train_checkpoint._set_rng_states(me, states)  # no CUDA device in play here
    assert calls == []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(device))
    monkeypatch.setattr(train_checkpoint, "_cuda_devices", lambda me: [1])
    train_checkpoint._set_rng_states(me, states)  # in play: set
    assert calls == [1]


def test_inputs_go_to_the_input_embedding_device():
    model, tok = tiny_model("llama")
    assert input_device(model) == torch.device("cpu") and model_devices(model) == [torch.device("cpu")]
    me = ModelEditor(model, tok, LAYERS["llama"], method="mend", rank=4)
    assert me.device == torch.device("cpu")
    # An accelerate hook's execution device wins over where the weights are (offloaded modules
    # keep them on "meta"): inputs go there, not to the first edited layer's device.
    embedding = model.get_input_embeddings()
    embedding._hf_hook = SimpleNamespace(execution_device=torch.device("cuda:3"))
    try:
        assert input_device(model) == torch.device("cuda:3")
        assert me.device == torch.device("cuda:3")
        assert all(p.device.type == "cpu" for p in me.editors.parameters())
        # Hooks added with append=True are chained into a SequentialHook (no execution_device of
        # its own): the execution device of the hook inside it still wins.
        embedding._hf_hook = SimpleNamespace(hooks=(SimpleNamespace(), embedding._hf_hook))
        assert input_device(model) == torch.device("cuda:3")
    finally:
        del embedding._hf_hook
    # An embedding left on "meta" without a hook: the first resident parameter's device.
    embedding.to("meta")
    assert input_device(model) == torch.device("cpu")
    assert input_device(torch.nn.ReLU()) == torch.device("cpu")


def test_an_int_execution_device_is_an_index_of_the_machines_accelerator(monkeypatch):
    """accelerate reads a hook's int execution device (what device_map="auto" writes) as an index of
    the machine's accelerator (`normalize_device`: "xpu:1" on an Intel GPU); module_device read it
    as "cuda:1" everywhere, so on an XPU the edit batches went to a CUDA device that is not there."""
    model, _ = tiny_model("llama")
    model.get_input_embeddings()._hf_hook = SimpleNamespace(execution_device=1)
    if not HAS_CUDA:  # no accelerator: CUDA, as before
        assert input_device(model) == torch.device("cuda:1")
    if not hasattr(torch, "accelerator"):  # torch 2.5: an int is a CUDA index, checked above
        pytest.skip("torch before 2.6 has no torch.accelerator to name another accelerator")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("xpu"))
    assert input_device(model) == torch.device("xpu:1")
    modeling = pytest.importorskip("accelerate.utils.modeling")
    normalize_device = getattr(modeling, "normalize_device", None)  # accelerate >= 1.16 (the GPU stack's 1.15: none)
    if normalize_device is not None:
        assert torch.device(normalize_device(1)) == input_device(model)


def test_a_sequential_hook_takes_the_first_execution_device_among_its_hooks():
    """A SequentialHook (hooks chained with append=True) has no execution device of its own: the
    first of its hooks that has one gives it, not a later hook's, nor the weights' device when a
    later hook has none."""
    model, _ = tiny_model("llama")
    first, second = torch.device("cuda:3"), torch.device("cuda:5")
    model.get_input_embeddings()._hf_hook = SimpleNamespace(hooks=(
        SimpleNamespace(), SimpleNamespace(execution_device=first), SimpleNamespace(execution_device=second),
        SimpleNamespace()))
    assert input_device(model) == first


def test_a_module_without_parameters_computes_on_its_first_buffers_device():
    """module_device falls back to the first buffer's device where a module has no parameter (a
    rotary embedding's inv_freq, a fixed table), and is None for a module with neither."""
    for device in ("cpu", "meta"):
        module = torch.nn.Module()
        module.register_buffer("table", torch.randn(3, 2, device=device))
        module.register_buffer("other", torch.zeros(1))
        assert module_device(module) == torch.device(device)
    assert module_device(torch.nn.ReLU()) is None


def test_model_devices_leaves_out_offloaded_weights():
    """Weights left on "meta" (offloaded by accelerate) are on no device the model computes on:
    model_devices names the devices of the resident ones only (peak memory, RNG states)."""
    model, _ = tiny_model("llama")
    model.model.layers[0].to("meta")
    assert model_devices(model) == [torch.device("cpu")]


class _OnDevice(torch.nn.Parameter):
    """A CPU parameter that reports another device (`shown`): fake CUDA/XPU placements on a CPU."""
    shown = None

    @property
    def device(self):
        return self.shown if self.shown is not None else super().device


class _BufferOnDevice(torch.Tensor):
    shown = None

    @property
    def device(self):
        return self.shown if self.shown is not None else super().device


def test_placement_rules_on_random_module_trees_with_fake_devices(gen, monkeypatch):
    """module_device, input_device, model_devices, place_editor and cuda_indices over 150 random
    module trees whose parameters and buffers report "cpu", "meta", "cuda", "cuda:0/1/3" or "xpu:1"
    (CPU tensors that report another device), embeddings with random accelerate-style hooks (an
    execution device that is None, an int, a str, a torch.device or "meta", or a SequentialHook-like
    chain of hooks with and without one), and get_input_embeddings that returns the embedding, None
    or a bare parameter, raises, or is missing: against the rules of the docstrings, written here."""
    # The module replaced, not its function: torch < 2.6 has no torch.accelerator.  No accelerator: an int is CUDA's.
    monkeypatch.setattr(torch, "accelerator", SimpleNamespace(current_accelerator=lambda *a, **k: None), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    names = ["cpu", "meta", "cuda", "cuda:0", "cuda:1", "cuda:3", "xpu:1"]
    draw = lambda hi: int(torch.randint(0, hi, (1,), generator=gen))  # noqa: E731

    def tensor(buffer):
        device = torch.device(names[draw(len(names))])
        if device.type == "meta":
            t = torch.empty(2, device="meta")
        else:
            t = torch.randn(2, generator=gen).as_subclass(_BufferOnDevice) if buffer else _OnDevice(torch.randn(2, generator=gen))
            t.shown = None if device.type == "cpu" else device
        return t if buffer or device.type != "meta" else torch.nn.Parameter(t)

    def tree(depth):
        module = torch.nn.Module()
        for k in range(draw(3)):
            module.register_parameter(f"p{k}", tensor(False))
        for k in range(draw(3)):
            module.register_buffer(f"b{k}", tensor(True))
        for k in range(draw(3) if depth else 0):
            module.add_module(f"c{k}", tree(depth - 1))
        return module

    def execution():
        return [None, 0, 2, "cuda:5", torch.device("cuda:4"), torch.device("cpu"), "meta"][draw(7)]

    def hook():
        kind = draw(3)
        if kind == 0:
            return SimpleNamespace(execution_device=execution())
        return SimpleNamespace(hooks=tuple(SimpleNamespace(execution_device=execution()) if draw(3) else SimpleNamespace()
                                           for _ in range(draw(4))))

    def want_module_device(module):
        h = getattr(module, "_hf_hook", None)
        chain = [h] + list(getattr(h, "hooks", ())) if h is not None else []
        execution = next((e for e in (getattr(c, "execution_device", None) for c in chain) if e is not None), None)
        if execution is not None:
            return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
        return next((t.device for t in [*module.parameters(), *module.buffers()]), None)

    for _ in range(150):
        model, embedding = tree(2), tree(1)
        if draw(3):
            embedding._hf_hook = hook()
        model.emb = embedding
        kind = draw(5)
        if kind < 4:
            def get_input_embeddings(kind=kind, model=model):
                if kind == 3:
                    raise NotImplementedError
                return [model.emb, None, next(model.parameters(), None)][kind]
            model.get_input_embeddings = get_input_embeddings
        for module in model.modules():
            assert module_device(module) == want_module_device(module)
        want = want_module_device(embedding) if kind == 0 else None
        if want is None or want.type == "meta":
            want = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        assert input_device(model) == want
        every = [t.device for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"]
        assert model_devices(model) == list(dict.fromkeys(every))
        layer_devices, override = every or [torch.device("cpu")], [None, torch.device("cuda:7")][draw(2)]
        assert place_editor(iter(layer_devices), override) == (layer_devices[0] if override is None else override)
        assert cuda_indices(every) == sorted({2 if d.index is None else d.index for d in every if d.type == "cuda"})


def test_as_device_refuses_a_bool_as_a_bool():
    """True is an int to Python, but no CUDA index: it is refused for its type, by name."""
    for bad in (True, False):
        with pytest.raises(ValueError, match="editor_device must be None, a str, an int or a torch.device, got bool"):
            as_device(bad, "editor_device")


def test_as_device_refuses_the_index_one_past_the_last_cuda_device(monkeypatch):
    """With two CUDA devices (faked here), cuda:0 and cuda:1 (and "cuda", the current one) are
    taken and cuda:2, one past the last, is refused naming the device count."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert as_device("cuda:1", "editor_device") == torch.device("cuda:1")
    assert as_device(0, "editor_device") == torch.device("cuda:0")
    assert as_device("cuda", "editor_device") == torch.device("cuda")
    for bad in ("cuda:2", 2):
        with pytest.raises(ValueError, match=r"editor_device: cuda:2 is not available here \(2 CUDA devices\)"):
            as_device(bad, "editor_device")


def test_cuda_indices_reads_a_bare_cuda_as_the_current_device(monkeypatch):
    """"cuda" without an index is the current CUDA device (faked here as 2), not device 0."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert cuda_indices([torch.device("cuda")]) == [2]
    assert cuda_indices([torch.device("cuda"), torch.device("cuda:0"), torch.device("cpu")]) == [0, 2]


def test_an_int_execution_device_is_cuda_where_the_accelerator_query_raises(monkeypatch):
    """torch 2.6's `torch.accelerator.current_accelerator()` raises RuntimeError on a CPU-only build
    (simulated here): an int execution device is then a CUDA index, as with no accelerator named."""
    model, _ = tiny_model("llama")
    model.get_input_embeddings()._hf_hook = SimpleNamespace(execution_device=1)

    def raising(*args, **kwargs):
        raise RuntimeError("no accelerator (simulated)")

    # The module replaced, not its function: torch < 2.6 (2.4 is supported) has no torch.accelerator.
    monkeypatch.setattr(torch, "accelerator", SimpleNamespace(current_accelerator=raising), raising=False)
    assert input_device(model) == torch.device("cuda:1")


@pytest.mark.parametrize("error", [NotImplementedError, AttributeError])
def test_inputs_go_to_the_first_parameter_where_get_input_embeddings_raises(error):
    """A model whose `get_input_embeddings` raises (Hugging Face's NotImplementedError for a model
    without one; AttributeError from one that reads a submodule it lacks) has its inputs on the
    device of its first parameter, as a model without the method."""
    class NoEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)

        def get_input_embeddings(self):
            raise error("no input embedding")

    assert input_device(NoEmbedding()) == torch.device("cpu")


@pytest.mark.parametrize("returned", ["none", "weight"])
def test_inputs_go_to_the_first_parameter_where_the_input_embedding_is_no_module(returned):
    """A `get_input_embeddings` that returns no module (None, or a bare embedding matrix) tells no
    device: the inputs go to the first parameter's, as for a model without the method."""
    class BareEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(5, 2))

        def get_input_embeddings(self):
            return None if returned == "none" else self.table

    assert input_device(BareEmbedding()) == torch.device("cpu")


def test_offloaded_edited_layer_is_refused():
    model, tok = tiny_model("llama")
    model.get_submodule("model.layers.0.mlp.down_proj").to("meta")
    with pytest.raises(ValueError, match=r"layers: 'model.layers.0.mlp.down_proj'.*meta"):
        ModelEditor(model, tok, LAYERS["llama"], method="mend")
    with pytest.raises(ValueError, match="'w'"):
        check_resident({"w": torch.empty(2, 2, device="meta")})
    ModelEditor(model, tok, LAYERS["llama"][1:], method="ft")  # other layers on meta are fine


def test_editor_device_argument(tmp_path):
    model, tok = tiny_model("gpt2")
    me = ModelEditor(model, tok, LAYERS["gpt2"], method="raeditor", rank=4, editor_device="cpu")
    assert me.editor_device == torch.device("cpu")
    assert {p.device for p in me.editors.parameters()} == {torch.device("cpu")}
    me.save(tmp_path / "e.safetensors")
    loaded = ModelEditor.load(tmp_path / "e.safetensors", model, tok, editor_device="cpu")
    assert loaded.editor_device == torch.device("cpu") and "editor_device" not in loaded.config()["editor_kwargs"]
    for bad in ("meta", "cuda:99", 2.0):
        with pytest.raises(ValueError, match="editor_device"):
            ModelEditor(model, tok, LAYERS["gpt2"], method="mend", editor_device=bad)


# ---------------------------------------------------------------------------------------------
# Split models: the same results as on one device
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("arch,method", [("llama", "mend"), ("gpt2", "moeditor"), ("llama", "proeditor"),
                                         ("gpt2", "raeditor")])
def test_split_edit_and_undo_match_one_device(arch, method, pair):
    exact = pair[0] == pair[1]
    me_ref, me_split = twins(arch, pair, method)
    a, b = (torch.device(d) for d in pair)
    names = LAYERS[arch]
    # The editor of the shared shape sits with the first layer of that shape (block 0, device a),
    # the other shape's with its only layer (block 1, device b); inputs go to the embedding (b).
    key_shared, mode = me_split.slots[names[0]]
    assert me_split.slots[names[1]] == (key_shared, 1) and mode == 0
    assert next(me_split.editors[key_shared].parameters()).device == a
    assert next(me_split.editors[me_split.slots[names[2]][0]].parameters()).device == b
    assert me_split.device == b
    # The capture keeps each layer's factors on that layer's device.
    batch = me_split.tokenize([r.prompt for r in requests()], [r.target for r in requests()])
    factors, feats, _ = me_split.capture(batch)
    for name in names:
        device = weight_out_in(me_split.modules[name]).device
        assert factors[name].mu.device == factors[name].eta.device == factors[name].edit_offsets.device == device

    stats = assert_split_edit_matches(me_ref, me_split, requests(), exact, f"{method} shift")
    if pair[1].startswith("cuda"):
        assert stats["peak_memory_bytes"] is not None


@pytest.mark.parametrize("pair", PAIRS)
def test_split_seq2seq_capture_and_edit(pair):
    """Cross-attention inputs on another device than the encoder still count as encoder-side."""
    exact = pair[0] == pair[1]
    me_ref, me_split = twins("bart", pair, "mend")
    reqs = [EditRequest("a b c d e f g h", "x y"), EditRequest("i j", "k l m n o p q r")]
    got, want = (me.capture(me.tokenize([r.prompt for r in reqs], [r.target for r in reqs]))[0]
                 for me in (me_split, me_ref))
    for name in LAYERS["bart"]:
        assert got[name].mu.device == weight_out_in(me_split.modules[name]).device
        assert got[name].mu.shape == want[name].mu.shape, name  # the same tokens kept
        assert_close(got[name].mu, want[name].mu, exact, f"mu of {name}")
        assert_close(got[name].eta, want[name].eta, exact, f"eta of {name}")
        assert torch.equal(got[name].edit_offsets.cpu(), want[name].edit_offsets), name
    assert_split_edit_matches(me_ref, me_split, reqs, exact, "shift", nonzero=False)


@pytest.mark.parametrize("pair", PAIRS)
def test_split_save_and_load(pair, tmp_path):
    exact = pair[0] == pair[1]
    me_ref, me_split = twins("llama", pair, "proeditor")
    path = tmp_path / "editor.safetensors"
    me_split.save(path)
    _, split2, tok = models("llama", pair)
    loaded = ModelEditor.load(path, split2, tok)
    for key, editor in loaded.editors.items():  # placed as the constructor places them
        assert {p.device for p in editor.parameters()} == {p.device for p in me_split.editors[key].parameters()}
    for k, v in loaded.state_tensors().items():
        assert torch.equal(v, me_split.state_tensors()[k]), k
    handle_ref, deltas_ref = edited_deltas(me_ref, requests())
    _, deltas = edited_deltas(loaded, requests())
    for name in LAYERS["llama"]:
        assert_close(deltas[name], deltas_ref[name], exact, f"shift of {name} after load")
    handle_ref.undo()
    on_b = ModelEditor.load(path, split2, tok, editor_device=pair[1])
    assert {p.device for p in on_b.editors.parameters()} == {torch.device(pair[1])}


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", ["ft", "ft_kl"])
def test_split_fine_tuning_baselines(method, pair):
    exact = pair[0] == pair[1]
    # SGD: the update is linear in the gradient, so rounding differences stay small (Adam's first
    # step is lr·sign(g), which a tiny gradient's rounding can flip).
    me_ref, me_split = twins("gpt2", pair, method, ft_steps=3, ft_optimizer="sgd", ft_lr=0.1)
    assert_split_edit_matches(me_ref, me_split, requests(), exact, f"{method} shift")


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("arch,method", [("llama", "mend"), ("gpt2", "raeditor"), ("llama", "moeditor"),
                                         ("gpt2", "proeditor")])
def test_split_training_step_matches_one_device(arch, method, pair):
    me_ref, me_split = twins(arch, pair, method)
    assert_training_step_matches(me_ref, me_split, method, exact=pair[0] == pair[1])


def assert_training_step_matches(me_ref, me_split, method, exact, ref_config=None):
    """One batch_loss and its editor gradients: the split twin's equal the reference's, and the
    gradients came back to each editor's device.  `ref_config`: TrainConfig options of the
    reference's pass only."""
    grads = []
    for me, options in ((me_ref, ref_config or {}), (me_split, {})):
        # MoEditor in eval mode: its gate noise would be drawn from two devices' generators.
        me.train(method != "moeditor")
        params = list(me.editors.parameters())
        loss, parts = batch_loss(me, requests(), TrainConfig(progress=False, **options))
        grads.append((loss, torch.autograd.grad(loss, params, allow_unused=True), params))
    (loss_ref, g_ref, _), (loss, g, params) = grads
    assert_close(loss, loss_ref, exact, "training loss")
    assert any(x is not None and x.abs().sum() > 0 for x in g)
    for i, (x, x_ref, p) in enumerate(zip(g, g_ref, params)):
        assert (x is None) == (x_ref is None), i
        if x is not None:
            assert x.device == p.device, i  # gradients came back across the moves to each editor
            assert_close(x, x_ref, exact, f"gradient of editor parameter {i}")


@pytest.mark.parametrize("pair", PAIRS)
def test_split_train_editor_loop_and_resume(pair, tmp_path):
    exact = pair[0] == pair[1]
    me_ref, me_split = twins("llama", pair, "mend")
    train, val = requests(6, seed=4), requests(2, seed=5)
    options = dict(steps=2, batch_size=2, val_every=1, progress=False, lr=1e-3)
    r_ref = me_ref.fit(train, val, **options)
    r = me_split.fit(train, val, checkpoint_dir=str(tmp_path), **options)
    for h, h_ref in zip(r.history, r_ref.history):
        assert h["loss"] == pytest.approx(h_ref["loss"], rel=0 if exact else 1e-3)
    for k, v in me_split.state_tensors().items():
        assert_close(v, me_ref.state_tensors()[k], exact, k)
    devices = {p.device for p in me_split.editors.parameters()}
    resumed = me_split.fit(train, val, checkpoint_dir=str(tmp_path), **{**options, "steps": 3})
    assert resumed.resumed_from == 2 and resumed.steps == 3
    assert {p.device for p in me_split.editors.parameters()} == devices


@pytest.mark.parametrize("pair", PAIRS)
def test_split_measure_edit_matches_one_device(pair):
    me_ref, me_split = twins("gpt2", pair, "mend")
    got, want = measure_edit(me_split, requests()), measure_edit(me_ref, requests())
    for key in ("es", "reliability", "dd", "ns"):
        assert got[key] == pytest.approx(want[key]), key


# ---------------------------------------------------------------------------------------------
# accelerate's own hooks (dispatch_model), one on each edited layer of block 1
# ---------------------------------------------------------------------------------------------
def accelerate_device_map(model, arch, device):
    """placement()'s entries on one device, block 1 split into its children (its MLP into each
    linear layer), so that accelerate hooks the edited layers of block 1 themselves."""
    where = placement(arch, device, device)
    block = "transformer.h.1" if arch == "gpt2" else "model.layers.1"
    del where[block]
    for name, child in model.get_submodule(block).named_children():
        parent = f"{block}.{name}"
        children = [f"{parent}.{n}" for n, _ in child.named_children()] if name == "mlp" else [parent]
        where.update({c: device for c in children})
    return where


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device"))])
@pytest.mark.parametrize("arch,method", [("gpt2", "moeditor"), ("llama", "mend"), ("gpt2", "proeditor")])
def test_accelerate_dispatch_model_hooks(arch, method, device):
    """A model dispatched by accelerate (`dispatch_model(force_hooks=True)`: an AlignDevicesHook
    on every device_map entry, edited layers included) edits, undoes and trains as the plain model.
    (A genuine split needs two GPUs: with a GPU, accelerate reads "cpu" entries as CPU offload,
    which leaves weights on "meta"; test_accelerate_cpu_offload_is_refused covers that.)"""
    accelerate = pytest.importorskip("accelerate")
    ref, tok = tiny_model(arch, seed=3)
    model, _ = tiny_model(arch, seed=3)
    model = accelerate.dispatch_model(model, device_map=accelerate_device_map(model, arch, device), force_hooks=True)
    hooked = LAYERS[arch][1:]  # block 1's edited layers
    assert all(hasattr(model.get_submodule(name), "_hf_hook") for name in hooked)
    kwargs = dict(method=method, rank=8, seed=0)
    me_ref, me = ModelEditor(ref, tok, LAYERS[arch], **kwargs), ModelEditor(model, tok, LAYERS[arch], **kwargs)
    randomize(me_ref)
    me.load_state_tensors(me_ref.state_tensors())
    exact = device == "cpu"
    assert_split_edit_matches(me_ref, me, requests(), exact, f"{method} shift")
    assert_training_step_matches(me_ref, me, method, exact)
    assert all(hasattr(model.get_submodule(name), "_hf_hook") for name in hooked)  # left in place


def test_accelerate_cpu_offload_is_refused():
    """accelerate's CPU offload keeps the weights in its hooks and "meta" tensors in the layers:
    an edit there could not reach the weights, so ModelEditor refuses it, naming the layer."""
    accelerate = pytest.importorskip("accelerate")
    model, tok = tiny_model("llama")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.*meta"):
        ModelEditor(model, tok, LAYERS["llama"], method="mend")


@pytest.mark.parametrize("method", ["mend", "ft"])
def test_a_layer_offloaded_after_the_editor_was_built_is_refused_at_apply(method):
    """accelerate's cpu_offload of a block after the ModelEditor was built leaves its weights on
    "meta": apply raised NotImplementedError ("Cannot copy out of meta tensor") from the shift of
    that layer, and FT said the layer "got no gradient (it did not run in the model's forward)"."""
    accelerate = pytest.importorskip("accelerate")
    model, tok = tiny_model("llama", seed=3)
    kwargs = dict(rank=4, seed=0) if method == "mend" else dict(ft_steps=1)
    me = ModelEditor(model, tok, LAYERS["llama"], method=method, **kwargs)
    accelerate.cpu_offload(model.model.layers[1], execution_device=torch.device("cpu"))
    before = {k: v for k, v in snapshot(model).items() if v.device.type != "meta"}
    with pytest.raises(ValueError, match=r"layers: 'model.layers.1.mlp.down_proj'.*meta"):
        me.apply(requests())
    assert me._live == []
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_training_with_a_layer_offloaded_after_the_editor_was_built_is_refused():
    """cpu_offload of a block after the ModelEditor was built: fit and batch_loss ran the patched
    forward of `lowrank_edited` (which bypasses accelerate's loading hook) on the "meta" weight and
    failed with "Tensor on device meta is not on the expected device cpu!"; they now refuse with a
    ValueError naming the layer, before any step."""
    accelerate = pytest.importorskip("accelerate")
    model, tok = tiny_model("llama", seed=3)
    me = ModelEditor(model, tok, LAYERS["llama"], method="mend", rank=4, seed=0)
    randomize(me)
    accelerate.cpu_offload(model.model.layers[1], execution_device=torch.device("cpu"))
    state = {k: v.clone() for k, v in me.state_tensors().items()}
    with pytest.raises(ValueError, match=r"layers: 'model.layers.1.mlp.down_proj'.*meta"):
        me.fit(requests(4), steps=1, batch_size=2, progress=False)
    for k, v in me.state_tensors().items():  # no step taken
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match=r"edits: 'model.layers.1.mlp.down_proj'.*meta"):
        batch_loss(me, requests(), TrainConfig(progress=False))


def test_undo_after_the_model_was_offloaded_refuses_and_restores_nothing(tmp_path):
    """An edit undone after `dispatch_model` sent an edited block to disk: undo copied the saved
    values into the Parameters the model no longer held (the disk copy kept the edit), returned
    True and restored the resident layers only.  It now refuses before restoring anything."""
    accelerate = pytest.importorskip("accelerate")
    model, tok = tiny_model("llama", seed=3)
    me = ModelEditor(model, tok, LAYERS["llama"], method="mend", rank=4, seed=0)
    randomize(me, scale=0.5)
    handle = me.apply(requests())
    edited = snapshot(model)
    where = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
             "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=where, offload_dir=str(tmp_path), main_device="cpu")
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"1 of the 3 weights this edit changed .* no longer parameters"):
        handle.undo()
    assert handle.active and me._live == [handle]
    for k, v in model.state_dict().items():
        if v.device.type != "meta":
            assert torch.equal(v, edited[k]), k


def test_edit_of_a_model_with_disk_offloaded_blocks_matches_the_plain_model(tmp_path):
    """`from_pretrained(device_map=..., offload_folder=...)` with block 0 on disk (its weights on
    "meta", loaded by accelerate's hook at each forward) and block 1 in memory: block 1's layers
    edit as in the plain model (the capture runs through the offloaded block), undo is bit exact,
    and block 0's layers are refused."""
    pytest.importorskip("accelerate")
    import transformers

    ref, tok = tiny_model("llama", seed=3)
    ref.save_pretrained(tmp_path / "model")
    where = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
             "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(  # dtype_kwarg: `torch_dtype` before 4.56
        tmp_path / "model", device_map=where, offload_folder=str(tmp_path / "offload"), **dtype_kwarg(torch.float32))
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    with pytest.raises(ValueError, match=r"layers: 'model.layers.0.mlp.down_proj'.*meta"):
        ModelEditor(model, tok, LAYERS["llama"], method="mend")
    layers = LAYERS["llama"][1:] + ["lm_head"]
    me_ref = ModelEditor(ref, tok, layers, method="mend", rank=8, seed=0)
    me = ModelEditor(model, tok, layers, method="mend", rank=8, seed=0)
    randomize(me_ref)
    me.load_state_tensors(me_ref.state_tensors())
    before = {k: v for k, v in snapshot(model).items() if v.device.type != "meta"}
    _, deltas_ref = edited_deltas(me_ref, requests())
    handle, deltas = edited_deltas(me, requests())
    for name in layers:
        assert deltas[name].abs().sum() > 0, name
        assert torch.equal(deltas[name], deltas_ref[name]), name
    handle.undo()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k].view(torch.uint8), v.view(torch.uint8)), k
