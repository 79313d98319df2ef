"""What a user of any torch nn.Module does with the editors and the result objects in a notebook:
print them, move them, copy them (`repr`, `.to("meta")`)."""

import pytest
import torch

from helpers import EDITOR_KINDS, small_editor


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_an_editor_on_the_meta_device_prints(method):
    """`print(editor)` of an editor moved to "meta" (as one builds a model before `to_empty`): the
    running norms' extra_repr read their token count with int(), which raised RuntimeError
    ("Tensor.item() cannot be called on meta tensors").  On "meta" the count has no value and is
    left out; the sizes are still shown."""
    editor = small_editor(method)
    on_cpu = repr(editor)
    assert "tokens_seen=0" in on_cpu
    text = repr(editor.to("meta"))
    assert "RunningNorm(in_features=" in text and "tokens_seen" not in text and "rows_seen" not in text
    assert text.splitlines()[1] == on_cpu.splitlines()[1]  # the editor's own arguments, as before
    if method == "moeditor":
        assert "FeatureNorm(features=" in text
    assert "tokens_seen=" in repr(editor.to_empty(device="cpu").norm)  # a count with values is shown again
