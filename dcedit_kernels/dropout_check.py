"""`warn_active_dropout`: a warning when an edit or editor training runs a model whose dropout is on.

`apply` and `fit` run the model in the mode they find it in (the README's models come in eval mode:
`load_model`, `from_pretrained`).  A model left in train mode with dropout, as peft's adapter training
leaves one (LoRA dropout 0.05-0.1), drew dropout masks in the capture and the fine-tuning: a helper's
trials on a LoRA-wrapped tiny Llama gave a different MEND shift at each apply (0.012 apart) and
drawdowns of 1.0 and 0.5 from two runs of one `measure_edit`, and `fit`'s locality KL compared two
passes with different masks (1.7e-3 at the first step against 4.0e-8 in eval mode), all without a word.
"""

from __future__ import annotations

from torch import nn

from ._thread_flag import ThreadFlag
from ._warn import warn

_QUIET = ThreadFlag()  # on inside `already_warned()`


def active_dropouts(model: nn.Module) -> int:
    """How many of `model`'s modules drop out in their current mode: dropout layers with p > 0 in
    train mode, and modules in train mode holding a rate above 0 that they apply as a function
    (transformers keeps them as float attributes named for it: `attention_dropout` in Llama-style
    attention, `dropout` and `activation_dropout` in BART's and OPT's layers, `hidden_dropout`,
    `resid_pdrop`, `layerdrop`, ..., each used only while `self.training`)."""
    count = 0
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            count += module.p > 0
        else:
            count += any("drop" in name and type(value) is float and value > 0
                         for name, value in vars(module).items())
    return count


def warn_active_dropout(model: nn.Module, what: str, consequence: str) -> None:
    """A UserWarning from `what` when `model` is in train mode with dropout on (`active_dropouts`):
    `consequence` says what the dropout does to it."""
    if _QUIET:
        return
    n = active_dropouts(model)
    if n:
        warn(f"{what}: the model is in train mode with dropout on ({n} module{'s' if n > 1 else ''} "
             f"with a rate above 0): {consequence}. Call model.eval() first unless that is meant "
             "(load_model and from_pretrained return models in eval mode; peft's get_peft_model and "
             "training an adapter leave train mode on)", UserWarning)


def already_warned():
    """`warn_active_dropout` says nothing inside (in this thread): fit warned for its whole run, and
    each of its validations' applies warned again as `ModelEditor.apply` (a helper's trials: two
    warnings for one fit call under Python's default filter, one more per validation under "always").
    Around fit's validations only: `evaluate_edits` called on its own warns as its applies do."""
    return _QUIET.on()
