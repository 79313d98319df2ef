"""Models wrapped by peft (LoRA adapters): the wrapper shares the model's live edits, and naming an
adapter layer says which name edits its weight.  peft is no dependency: the first tests use a
stand-in with peft's shape (a PeftModel forwards what it lacks to the model it wraps and gives it
back from `get_base_model()`; a LoRA layer holds the layer it adapts as `base_layer`); the last
runs the real one where it is installed."""

import pytest
import torch
from torch import nn

from dcedit_kernels.edit_handle import weights_owner
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from test_model_editor import assert_bit_identical, one_thread, random_requests, snapshot  # noqa: F401


class Forwarding(nn.Module):
    """What a module lacks comes from the model it wraps, as peft's wrappers do."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner(), name)


class BaseTuner(Forwarding):
    """peft's tuner base class (LoraModel's): the model it put its adapter layers into is `model`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def inner(self):
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class LoraModel(BaseTuner):
    pass


class PeftModelForCausalLM(Forwarding):
    """peft's wrapper as ModelEditor meets it: its `base_model` is the tuner."""

    def __init__(self, model):
        super().__init__()
        self.base_model = LoraModel(model)

    def inner(self):
        return self.base_model

    def get_base_model(self):
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)


class Linear(nn.Module):
    """peft's LoRA layer: named Linear, holding the layer it adapts."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x):
        return self.base_layer(x)


PeftModelForCausalLM.__module__ = "peft.peft_model"
BaseTuner.__module__ = "peft.tuners.tuners_utils"
LoraModel.__module__ = "peft.tuners.lora.model"
Linear.__module__ = "peft.tuners.lora.layer"
LAYER = "model.layers.1.mlp.down_proj"


def test_edits_through_a_peft_model_and_through_its_model_share_one_undo_order(gen):
    """A ModelEditor of the PeftModel and one of the model it wraps keep one list of live edits, as
    torch.compile's wrapper and its model do: the earlier edit refuses to undo before the later one.
    Keyed by the wrapper, each undo was taken and the model stayed edited (a helper's trials on
    real peft: logits off the unedited model by 0.018 on the tiny Llama, 0.12 on the tiny GPT-2)."""
    model, tok = tiny_model("llama", seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    wrapped = PeftModelForCausalLM(model)
    assert weights_owner(wrapped) is weights_owner(wrapped.base_model) is model
    assert weights_owner(torch.compile(wrapped, backend="eager")) is model  # one level after another
    before = snapshot(model)
    through = ModelEditor(wrapped, tok, ["base_model.model." + LAYER], method="ft", ft_steps=2, ft_stop_loss=None)
    tuner = ModelEditor(wrapped.base_model, tok, ["model." + LAYER], method="ft", ft_steps=1, ft_stop_loss=None)
    direct = ModelEditor(model, tok, [LAYER], method="ft", ft_steps=2, ft_stop_loss=None)
    handles = [editor.apply(random_requests(gen, 2)) for editor in (through, tuner, direct)]
    for earlier in handles[:2]:
        with pytest.raises(RuntimeError, match="later"):
            earlier.undo()
    assert all(h.undo() for h in reversed(handles))
    assert_bit_identical(before, model)


def test_a_module_that_only_looks_like_peft_is_no_wrapper_of_its_base():
    """Only peft's own classes are asked for `get_base_model()`: the name is common enough."""
    class Holder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def get_base_model(self):
            return self.inner

    holder = Holder(nn.Linear(2, 2))
    assert weights_owner(holder) is holder


def test_naming_an_adapter_layer_says_which_name_edits_its_weight():
    """peft's LoRA layer is also called Linear: "is of type Linear; capture supports nn.Linear"
    named neither the adapter nor the layer to give."""
    model, tok = tiny_model("llama", seed=0)
    model.model.layers[1].mlp.down_proj = Linear(model.model.layers[1].mlp.down_proj)
    with pytest.raises(ValueError, match=r"layers: 'model.layers.1.mlp.down_proj' is of type Linear "
                       r"\(peft.tuners.lora.layer.Linear, an adapter layer over the Linear "
                       r"'model.layers.1.mlp.down_proj.base_layer': name that to edit its weight\)"):
        ModelEditor(model, tok, [LAYER], method="mend", rank=2)
    ModelEditor(model, tok, [LAYER + ".base_layer"], method="mend", rank=2)
    model.model.embed_tokens = Linear(model.model.embed_tokens)  # an adapter over what no edit takes
    with pytest.raises(ValueError) as info:
        ModelEditor(model, tok, ["model.embed_tokens"], method="mend", rank=2)
    assert str(info.value) == ("layers: 'model.embed_tokens' is of type Linear; capture supports nn.Linear "
                               "and transformers Conv1D")


def test_a_real_lora_model_edits_as_its_merged_twin_and_undoes_in_order(gen):
    """With peft installed: an FT edit through a LoRA-wrapped model changes the base weight as the
    same edit of the model with its adapter merged does, and shares the model's undo order."""
    peft = pytest.importorskip("peft")
    import copy

    model, tok = tiny_model("llama", seed=int(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float64)
    config = peft.LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    assert weights_owner(wrapped) is weights_owner(wrapped.base_model) is model
    merged = copy.deepcopy(wrapped).merge_and_unload()
    requests = random_requests(gen, 2)
    name = "base_model.model." + LAYER
    with pytest.raises(ValueError, match=r"name that to edit its weight"):
        ModelEditor(wrapped, tok, [name], method="ft")
    before = snapshot(model)
    handle = ModelEditor(wrapped, tok, [name + ".base_layer"], method="ft", ft_steps=2, ft_stop_loss=None).apply(requests)
    twin = ModelEditor(merged, tok, [LAYER], method="ft", ft_steps=2, ft_stop_loss=None).apply(requests)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
    later = ModelEditor(model, tok, [LAYER + ".base_layer"], method="ft", ft_steps=1, ft_stop_loss=None).apply(requests)
    with pytest.raises(RuntimeError, match="later"):
        handle.undo()
    assert later.undo() and handle.undo() and twin.undo()
    assert_bit_identical(before, model)
