"""apply and fit warn when the model they run is in train mode with dropout on (a model left in train
mode after adapter training: each apply gave another edit, and fit's locality KL compared two
differently dropped-out passes, without a word)."""

import warnings

import pytest
import torch
from torch import nn

from dcedit_kernels.dropout_check import active_dropouts
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model
from dcedit_kernels.train import TrainConfig, evaluate_edits
from test_model_editor import LAYERS, one_thread, random_requests  # noqa: F401

WARNED = r"the model is in train mode with dropout on \((\d+) modules? with a rate above 0\)"


def dropping_out(arch, rate, seed):
    model, tok = tiny_model(arch, seed=seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
    return model.train(), tok


def dropout_warnings(caught):
    return [str(w.message) for w in caught if "train mode with dropout on" in str(w.message)]


def test_apply_warns_of_dropout_in_train_mode_and_its_edits_then_differ(gen):
    seed = int(torch.randint(0, 1000, (1,), generator=gen))
    model, tok = dropping_out("gpt2", 0.3, seed)
    me = ModelEditor(model, tok, LAYERS["gpt2"][2:3], method="ft", ft_steps=2, ft_stop_loss=None)
    requests = random_requests(gen, 2)
    shifts = []
    for _ in range(2):
        weight = me.modules[me.layers[0]].weight
        before = weight.detach().clone()
        with pytest.warns(UserWarning, match=r"ModelEditor.apply: " + WARNED + r": the capture and the fine-tuning"):
            with me.edited(requests):
                shifts.append(weight.detach() - before)
    assert not torch.equal(shifts[0], shifts[1])  # what the warning is about
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with me.edited(requests):
            pass
    assert dropout_warnings(caught) == []


def test_fit_warns_of_dropout_in_train_mode_once_for_its_validations_too(gen):
    """Each validation's apply warned again, as ModelEditor.apply's, for one fit call."""
    model, tok = dropping_out("gpt2", 0.1, int(torch.randint(0, 1000, (1,), generator=gen)))
    me = ModelEditor(model, tok, LAYERS["gpt2"][2:3], method="mend", rank=3)
    config = TrainConfig(steps=2, batch_size=2, val_every=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        me.fit(random_requests(gen, 2), random_requests(gen, 2), config)
    said = dropout_warnings(caught)
    assert len(said) == 1 and said[0].startswith("train_editor: ") and "each pass draws its own dropout masks" in said[0]
    assert model.training  # fit takes the model as it finds it, and leaves it so
    with pytest.warns(UserWarning, match=r"ModelEditor.apply: " + WARNED):  # quiet inside fit only
        me.apply(random_requests(gen, 1)).undo()
    with pytest.warns(UserWarning, match=r"ModelEditor.apply: " + WARNED):  # fit's scoring, called on its own
        evaluate_edits(me, random_requests(gen, 2), batch_size=2)


def test_a_model_in_train_mode_without_dropout_says_nothing(gen):
    """The tiny models' dropout layers have rate 0 (activation-checkpointing tests train them so)."""
    model, tok = tiny_model("gpt2", seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    model.train()
    assert active_dropouts(model) == 0
    me = ModelEditor(model, tok, LAYERS["gpt2"][2:3], method="ft", ft_steps=1, ft_stop_loss=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        me.apply(random_requests(gen, 1)).undo()
    assert dropout_warnings(caught) == []


def test_active_dropouts_counts_layers_and_attention_rates_in_train_mode():
    model, _ = tiny_model("llama", seed=0)
    attention = model.model.layers[1].self_attn
    attention.attention_dropout = 0.1  # transformers' Llama applies it as a function, in train mode only
    assert active_dropouts(model) == 0  # tiny_model returns eval mode
    model.train()
    assert active_dropouts(model) == 1
    model.model.layers[0].mlp.add_module("drop", nn.Dropout(0.2))
    assert active_dropouts(model) == 2
    attention.eval()
    assert active_dropouts(model) == 1


def test_rates_applied_as_functions_count_by_their_float_attributes():
    """BART's layers keep their rates as floats (`dropout`, `activation_dropout`) and apply them with
    nn.functional.dropout while training; an int, a bool or a rate of 0 is none."""
    model, _ = tiny_model("bart", seed=0)
    model.train()
    assert active_dropouts(model) == 0  # tiny_model's rates are 0
    model.model.encoder.layers[0].self_attn.dropout = 0.1
    model.model.decoder.layers[0].activation_dropout = 0.2
    model.model.decoder.layers[1].dropout_flag = True
    model.model.decoder.layers[1].drop_count = 3
    assert active_dropouts(model) == 2
