"""Metrics on hand-computed cases; the factor Gram matrix against dense per-edit gradients."""

import contextlib
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dcedit_kernels.capture import Factors, compute_factors
from dcedit_kernels.metrics import (
    drawdown,
    edit_success,
    factor_gram,
    factors_gram,
    gcr,
    gms,
    gradient_gram,
    lmp,
    locality_predictions,
    neighbourhood_success,
    reliability,
    target_accuracy,
)
from dcedit_kernels.models import tiny_model, tiny_tokenizer
from dcedit_kernels.requests import EditRequest
from dcedit_kernels.tokenize import IGNORE_INDEX, tokenize_pairs

from helpers import input_shapes, ragged_offsets, randn, readme_join, rel_err, seed_from
from test_model_editor import ctrl_c_raises, one_thread  # noqa: F401 (autouse: one intra-op thread; BART case 21.6 s with two, 6.8 s with one)


class PrefixLM(nn.Module):
    """A causal 'LM' whose next-token prediction is looked up from the whole prefix: exactly
    what it predicts at each position is set by `teach`, so metrics can be computed by hand."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.vocab = len(tok)
        self.table: dict[tuple, int] = {}
        self.unknown = tok.convert_tokens_to_ids("~")  # predicted where nothing was taught
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.modes_seen = []

    def teach(self, text, wrong_after=None):
        """Predict `text`'s next tokens; after the prefix `wrong_after` (a str) predict '~' instead."""
        ids = self.tok(text)["input_ids"]
        for t in range(1, len(ids)):
            self.table[tuple(ids[:t])] = ids[t]
        if wrong_after is not None:
            self.table[tuple(self.tok(wrong_after)["input_ids"])] = self.unknown

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.modes_seen.append(self.training)
        B, L = input_ids.shape
        nxt = torch.full((B, L), self.unknown, dtype=torch.long)
        for b in range(B):
            row = input_ids[b].tolist()
            for t in range(L):
                nxt[b, t] = self.table.get(tuple(row[: t + 1]), self.unknown)
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, self.vocab).float())


# The tiny GPT-2 tokenizer is byte-level with no merges: one token per character, so the target
# " ab" is 3 tokens (space, a, b).
REQUESTS = [
    EditRequest("xy", "ab", rephrase="uv", locality="hi", locality_target="jk"),
    EditRequest("pq", "cd", rephrase="mn", locality="rs", locality_target="tw"),
]


def scripted_model():
    lm = PrefixLM(tiny_tokenizer("gpt2"))
    lm.teach("xy ab")                       # reliability 1 on request 0
    lm.teach("pq cd", wrong_after="pq c")   # request 0: ' ', 'c' right, 'd' wrong -> 2/3
    lm.teach("uv ab", wrong_after="uv")     # ES request 0: ' ' wrong, a, b right -> 2/3
    lm.teach("mn cd", wrong_after="mn c")   # ES request 1: 2/3
    lm.teach("hi jk")                       # NS request 0: 1
    lm.teach("rs tw", wrong_after="rs")     # NS request 1: 2/3
    return lm


def test_prediction_metrics_by_hand():
    lm = scripted_model()
    tok = lm.tok
    assert reliability(lm, tok, REQUESTS) == pytest.approx((1 + 2 / 3) / 2)
    assert reliability(lm, tok, REQUESTS, exact=True) == pytest.approx(0.5)
    assert edit_success(lm, tok, REQUESTS) == pytest.approx(2 / 3)
    assert edit_success(lm, tok, REQUESTS, exact=True) == 0.0
    assert neighbourhood_success(lm, tok, REQUESTS) == pytest.approx((1 + 2 / 3) / 2)
    assert neighbourhood_success(lm, tok, REQUESTS, exact=True) == pytest.approx(0.5)
    acc = target_accuracy(lm, tok, ["xy", "pq", "pq"], ["ab", "cd", "zz"], batch_size=2)
    assert acc.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])  # "pq zz": only the space is right


def test_drawdown_by_hand():
    lm = scripted_model()
    tok = lm.tok
    base = locality_predictions(lm, tok, REQUESTS)
    assert [len(p) for p in base] == [3, 3]
    assert drawdown(lm, tok, REQUESTS, base) == 0.0
    lm.teach("hi jk", wrong_after="hi j")  # the "edit" changes one of request 0's three tokens
    assert drawdown(lm, tok, REQUESTS, base) == pytest.approx(0.5)
    assert drawdown(lm, tok, REQUESTS, base, reduction="token") == pytest.approx((1 / 3 + 0) / 2)
    es = edit_success(lm, tok, REQUESTS)
    assert lmp(es, 0.5) == pytest.approx(2 / 3 - 0.5)


@pytest.mark.parametrize("bad", ["0.5", True, None, torch.tensor(0.5)])
def test_lmp_takes_real_numbers_only(bad):
    # float() took "0.5" and True without a word.
    with pytest.raises(ValueError, match="es must be a real number"):
        lmp(bad, 0.1)
    with pytest.raises(ValueError, match="dd must be a real number"):
        lmp(0.5, bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1e-9, 1 + 1e-9, 50, -1, np.float64("nan")])
def test_lmp_takes_shares_in_0_1_only(bad):
    # NaN gave an LMP of NaN, inf one of -inf, and percentages (ES 50, DD 10) one of 40.
    with pytest.raises(ValueError, match=r"es must be in \[0, 1\]"):
        lmp(bad, 0.1)
    with pytest.raises(ValueError, match=r"dd must be in \[0, 1\]"):
        lmp(0.5, bad)


def test_lmp_of_shares_at_the_ends_and_of_numpy_or_int_numbers():
    es, dd = torch.rand(2, dtype=torch.float64).tolist()
    assert lmp(es, dd) == es - dd
    assert lmp(np.float64(es), np.float32(dd)) == es - float(np.float32(dd))
    assert (lmp(0, 1), lmp(1, 0), lmp(0.0, 0.0), lmp(1.0, 1.0)) == (-1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_drawdown_refuses_base_predictions_that_are_not_token_ids(dtype):
    # A bool tensor counted every input changed (DD 1.0 of a model nothing changed), NaN ones too.
    lm = scripted_model()
    base = locality_predictions(lm, lm.tok, REQUESTS)
    for k in range(len(base)):
        bad = [b.to(dtype) if i == k else b for i, b in enumerate(base)]
        with pytest.raises(ValueError, match=rf"^base_predictions\[{k}\] must hold token ids .*got {dtype}$"):
            drawdown(lm, lm.tok, REQUESTS, bad)
    for ids in (torch.int32, torch.int64, torch.int16):  # any integer dtype: the same ids
        assert drawdown(lm, lm.tok, REQUESTS, [b.to(ids) for b in base]) == 0.0


def test_drawdown_without_locality_target_scores_the_text():
    lm = scripted_model()
    tok = lm.tok
    requests = [EditRequest("xy", "ab", locality="hello"), REQUESTS[1]]
    lm.teach("hello")
    base = locality_predictions(lm, tok, requests)
    assert len(base[0]) == 4  # every next token of "hello"
    lm.teach("hello", wrong_after="hel")
    assert drawdown(lm, tok, requests, base) == pytest.approx(0.5)


def test_metrics_restore_mode_and_check_inputs():
    lm = scripted_model()
    tok = lm.tok
    lm.train()
    reliability(lm, tok, REQUESTS)
    assert lm.training and lm.modes_seen and not any(lm.modes_seen)
    with pytest.raises(ValueError, match=r"requests\[0\]\.rephrase"):
        edit_success(lm, tok, [EditRequest("a", "b")])
    with pytest.raises(ValueError, match=r"requests\[1\]\.locality_target"):
        neighbourhood_success(lm, tok, [REQUESTS[0], EditRequest("a", "b", locality="c")])
    with pytest.raises(ValueError, match="batch_size"):
        reliability(lm, tok, REQUESTS, batch_size=0)
    # Only an int: True scored one row per batch and 2.0 reached range()'s TypeError.
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive int, got {bad!r}$"):
            reliability(lm, tok, REQUESTS, batch_size=bad)
    base = locality_predictions(lm, tok, REQUESTS)
    for wrong in (base[:1], base + base[:1]):  # one too few, one too many (zip dropped the extra)
        with pytest.raises(ValueError, match=r"base_predictions must have one entry per request \(2\)"):
            drawdown(lm, tok, REQUESTS, wrong)
    with pytest.raises(ValueError, match="reduction"):
        drawdown(lm, tok, REQUESTS, base, reduction="mean")
    with pytest.raises(ValueError, match="empty"):
        reliability(lm, tok, [])
    # Lengths are checked over the whole lists, not per batch: with batch_size 2, two prompts and
    # four targets once returned two accuracies (the extra targets dropped without a word), and
    # four prompts with two targets said "targets must not be empty".
    for n_prompts, n_targets in ((2, 4), (4, 2)):
        with pytest.raises(ValueError, match=f"same length, got {n_prompts} and {n_targets}"):
            target_accuracy(lm, tok, ["xy"] * n_prompts, ["ab"] * n_targets, batch_size=2)
    # A lone str is one text, not a list of its characters: target_accuracy(lm, tok, "xy", "ab")
    # once returned two accuracies, of "x" + "a" and "y" + "b".
    for prompts, targets, name in (("xy", ["ab"], "prompts"), (["xy"], "ab", "targets"), ("xy", "ab", "prompts")):
        with pytest.raises(ValueError, match=f"{name} must be a sequence of str, got a single str"):
            target_accuracy(lm, tok, prompts, targets)


def test_evaluate_method_refuses_a_repeated_n_edits():
    """by_n holds one entry per N_u: a repeated N_u ran its samples twice and pooled both into it."""
    from dcedit_kernels.evaluate import evaluate_method

    with pytest.raises(ValueError, match=r"n_edits must not repeat a value, got \[1, 2, 1\]"):
        evaluate_method(None, None, "ft", REQUESTS, n_edits=(1, 2, 1), repeats=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart", "t5"])
def test_batched_scoring_matches_one_at_a_time(arch, gen):
    """Padding in a batch changes nothing; the accuracy equals a direct argmax computation over the
    full logits (the scoring itself has the LM head compute the scored positions only)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    model, tok = tiny_model(arch, seed=seed)
    prompts = ["The Eiffel Tower is in", "ab", "Toko Yasuda plays the"]
    targets = ["Rome", "x y z", "piano"]
    batched = target_accuracy(model, tok, prompts, targets, batch_size=3)
    single = target_accuracy(model, tok, prompts, targets, batch_size=1)
    assert torch.allclose(batched, single)
    for i in range(3):
        expected = argmax_accuracy(model, tok, prompts[i], targets[i], seq2seq=arch in ("bart", "t5"))
        assert float(single[i]) == pytest.approx(expected)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_a_seq2seq_model_without_prepare_decoder_input_ids_scores_the_same(arch, gen):
    """Such a model gets its labels (it builds its decoder inputs from them) and computes its own
    loss: the scoring has it compute the full logits, which that loss needs."""
    model, tok = tiny_model(arch, seed=seed_from(gen))
    prompts, targets = ["The Eiffel Tower is in", "ab", "Toko Yasuda plays the"], ["Rome", "x y z", "piano"]
    want = target_accuracy(model, tok, prompts, targets)
    model.prepare_decoder_input_ids_from_labels = None
    assert torch.equal(target_accuracy(model, tok, prompts, targets), want)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_scoring_batches_rows_of_similar_length(arch, gen):
    """More rows than a batch: the batches take the rows sorted by length (fewer padding slots) and
    the scores come back in the caller's order, each what scoring its row alone gives."""
    from dcedit_kernels.metrics import _score

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    model, tok = tiny_model(arch, seed=seed, dtype=torch.float64)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    n = 9
    lengths = torch.randint(1, 12, (n,), generator=gen).tolist()
    prompts = [" ".join(words[(i + k) % len(words)] for k in range(m)) for i, m in enumerate(lengths)]
    targets = [words[i % len(words)] for i in range(n)]
    with input_shapes(model.get_input_embeddings()) as widths:
        batched = _score(model, tok, prompts, targets, batch_size=3)
    # Each row scored in a call of its own: one call over all rows would sort them the same way, and
    # a wrong way back to the caller's order would reorder both alike.
    single = [_score(model, tok, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    for (p, g), (p1, g1) in zip(batched, single):
        assert torch.equal(g, g1) and torch.equal(p, p1)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(targets[i]))
    ids = [len(tokenize_pairs(model, tok, [prompts[i]], [targets[i]])["input_ids"][0]) for i in order]
    if arch == "llama":  # the encoder of a seq2seq model is called first, on the prompts alone
        assert [w[0] for w in widths] == [3, 3, 3]
        assert [w[1] for w in widths] == [max(ids[lo:lo + 3]) for lo in (0, 3, 6)]


def test_scoring_sorts_rows_by_prompt_and_target_length(gen):
    """The tiny GPT-2 tokenizer spells one token per character: rows of 1 + 30, 5 + 1, 10 + 1 and
    20 + 30 characters batch as {5 + 1, 10 + 1} and {1 + 30, 20 + 30}; sorted by the prompt alone
    they batched as {1 + 30, 5 + 1} and {10 + 1, 20 + 30}, 32 and 51 wide instead of 12 and 51."""
    from dcedit_kernels.metrics import _score

    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(n):
        return "".join(letters[i] for i in torch.randint(0, 26, (n,), generator=gen).tolist())

    rows = [(text(p), text(t)) for p, t in ((1, 30), (5, 1), (10, 1), (20, 30))]
    with input_shapes(model.get_input_embeddings()) as shapes:
        _score(model, tok, [p for p, _ in rows], [t for _, t in rows], 2)
    assert shapes == [(2, 10 + 1 + 1), (2, 20 + 1 + 30)]  # the longer row's prompt, space, target


def test_sorted_scoring_names_the_first_bad_row_in_the_callers_order(gen):
    """Rows are batched by length, but with several bad rows the error names the first in the
    caller's order, as the batches in the given order did (not the first of the sorted batches)."""
    from dcedit_kernels.metrics import _score

    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    n_pos = model.config.n_positions
    prompts = ["the cat", "word " * (n_pos + 40), "a dog", "x y", "word " * (n_pos + 5), "z", "p"]
    targets = ["sat", "b", "ran", "q", "c", "w", "r"]
    texts = ["hello world there", "z", "a b c", "d e f", "", "g h i"]
    for batch_size in (1, 2, 3):
        with pytest.raises(ValueError, match=r"^prompts\[1\] \+ targets\[1\]: a text is"):
            _score(model, tok, prompts, targets, batch_size=batch_size)
        with pytest.raises(ValueError, match=r"^prompts\[1\] \('z'\) needs at least 2 tokens"):
            _score(model, tok, texts, None, batch_size=batch_size)
    # One bad row: its own error, whatever batch it sorts into.
    with pytest.raises(ValueError, match=r"^prompts\[3\] must be a non-empty string"):
        _score(model, tok, texts[:1] + texts[2:], None, batch_size=2)


def test_lower_blocks_kept_gives_an_enclosing_blocks_store_back(gen):
    """Once a nested `lower_blocks_kept` block exits, scoring keeps its batches in the enclosing
    block's store again (the enclosing store was dropped for the rest of its block)."""
    from dcedit_kernels.metrics import lower_blocks_kept

    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    modules = {"transformer.h.1.mlp.c_proj": model.transformer.h[1].mlp.c_proj}
    outer, inner = {}, {}
    with lower_blocks_kept(modules, outer):
        with lower_blocks_kept(modules, inner):
            reliability(model, tok, REQUESTS)
        assert inner and not outer
        reliability(model, tok, REQUESTS)
    assert outer


def test_lower_blocks_kept_names_a_bad_argument_on_entry(gen):
    """A list of modules, or a list/None store, raised AttributeError from the first scoring pass in the
    block; modules given by name were no model's, so the block kept nothing, without a word."""
    from dcedit_kernels.metrics import lower_blocks_kept

    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    layer = model.transformer.h[1].mlp.c_proj
    name = "transformer.h.1.mlp.c_proj"
    for modules, store, match in (([layer], {}, r"^modules must be a mapping of layer name -> torch.nn.Module .*got list$"),
                                  ({name: name}, {}, rf"^modules\['{name}'\] must be a torch.nn.Module, got str$"),
                                  ({name: layer}, [], r"^store must be a dict, got list$"),
                                  ({name: layer}, None, r"^store must be a dict, got NoneType$")):
        with pytest.raises(ValueError, match=match):
            with lower_blocks_kept(modules, store):
                reliability(model, tok, REQUESTS)
    store = {}
    with lower_blocks_kept({name: layer}, store):
        assert reliability(model, tok, REQUESTS) == reliability(model, tok, REQUESTS)
    assert store


def test_lower_blocks_kept_of_one_model_leaves_other_models_scoring_alone(gen):
    """The kept blocks are those of the model that holds `modules`: scoring another model inside
    the block raised AttributeError where the layers' names are not its modules (a Llama scored
    inside a GPT-2's block), and a model of the same layout had its lower blocks' output kept and
    reused, so a change of its lower weights inside the block left its predictions stale."""
    from dcedit_kernels.metrics import lower_blocks_kept

    model, _ = tiny_model("gpt2", seed=seed_from(gen))
    modules = {"transformer.h.1.mlp.c_proj": model.transformer.h[1].mlp.c_proj}
    llama, llama_tok = tiny_model("llama", seed=seed_from(gen))
    other, tok = tiny_model("gpt2", seed=seed_from(gen))
    store = {}
    with lower_blocks_kept(modules, store):
        want = locality_predictions(llama, llama_tok, REQUESTS)
        assert all(torch.equal(a, b) for a, b in zip(want, locality_predictions(llama, llama_tok, REQUESTS)))
        locality_predictions(other, tok, REQUESTS)
        with torch.no_grad():
            for p in other.transformer.h[0].parameters():
                p.add_(randn(p.shape, gen))
        got = locality_predictions(other, tok, REQUESTS)
    want = locality_predictions(other, tok, REQUESTS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not store


def argmax_accuracy(model, tok, prompt, target, seq2seq, **forward_kwargs):
    """The target's teacher-forced argmax accuracy from one plain forward over the full logits
    (a seq2seq model's special tokens not scored)."""
    batch = tokenize_pairs(model, tok, [prompt], [target])
    with torch.no_grad():
        logits = model(**batch, **forward_kwargs).logits[0]
    labels = batch["labels"][0]
    if seq2seq:
        special = torch.tensor(sorted(set(tok.all_special_ids)))
        keep = (labels != IGNORE_INDEX) & ~torch.isin(labels, special)
        pred = logits.argmax(-1)[keep]
    else:
        keep = labels[1:] != IGNORE_INDEX
        pred = logits[:-1].argmax(-1)[keep]
        labels = labels[1:]
    return float((pred == labels[keep]).double().mean())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scoring_builds_no_kv_cache(arch):
    """A scoring pass reads no cache back: none is built (a causal LM's holds every block's keys
    and values for the whole batch), and the accuracy is the cached forward's."""
    model, tok = tiny_model(arch, seed=0)
    caches = []
    hook = model.register_forward_hook(lambda m, args, out: caches.append(out.past_key_values))
    try:
        acc = target_accuracy(model, tok, ["The Eiffel Tower is in", "ab"], ["Rome", "x y z"], batch_size=2)
    finally:
        hook.remove()
    assert caches == [None]
    for i, (prompt, target) in enumerate([("The Eiffel Tower is in", "Rome"), ("ab", "x y z")]):
        assert float(acc[i]) == pytest.approx(argmax_accuracy(model, tok, prompt, target, False, use_cache=True))


# --- gradient metrics --------------------------------------------------------------------------


def test_gcr_gms_by_hand():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert gcr(g) == pytest.approx(1 / 3)  # only (0, 2) has negative cosine
    assert gms(g) == pytest.approx(1.0)
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert gcr(g) == 0.0 and gms(g) == pytest.approx(2 * 3 * 1 / (9 + 1))
    g = torch.tensor([[3.0, 4.0], [-3.0, -4.0], [0.0, 0.0]])
    # pairs: (0,1) cos -1 conflicts, ratio 1; (0,2) and (1,2): zero gradient, ratio 0
    assert gcr(g) == pytest.approx(1 / 3) and gms(g) == pytest.approx(1 / 3)
    assert gms(torch.zeros(2, 5)) == 1.0 and gcr(torch.zeros(2, 5)) == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        gcr()
    with pytest.raises(ValueError, match="exactly one"):
        gms(g, gram=gradient_gram(g))
    with pytest.raises(ValueError, match="at least 2"):
        gcr(torch.ones(1, 3))
    with pytest.raises(ValueError, match="square"):
        gms(gram=torch.ones(2, 3))


def test_gradient_gram_refuses_what_is_not_an_e_by_p_float_matrix():
    # Without the check a 1-D tensor gave its squared norm and an int matrix a Gram.
    for bad, message in ((torch.ones(3), "grads must be 2-D"),
                         (torch.ones(2, 3, dtype=torch.long), "grads must be float"),
                         ([[1.0, 2.0]], "grads must be a torch.Tensor")):
        with pytest.raises(ValueError, match=message):
            gradient_gram(bad)


def test_gradient_metrics_name_a_tensor_without_values():
    """Meta tensors raised torch's RuntimeError from deep inside (factor_gram: "cannot repeat_interleave
    a meta tensor without output_size"; gcr/gms: "Tensor.item() cannot be called on meta tensors")."""
    meta = dict(device="meta")
    for metric in (gcr, gms):
        with pytest.raises(ValueError, match=r"^grads has no values \(a meta or fake tensor, on meta\)"):
            metric(torch.ones(3, 4, **meta))
        with pytest.raises(ValueError, match=r"^gram has no values \(a meta or fake tensor, on meta\)"):
            metric(gram=torch.eye(3, **meta))
    with pytest.raises(ValueError, match=r"^mu has no values \(a meta or fake tensor, on meta\)"):
        factor_gram(torch.ones(5, 3, **meta), torch.ones(5, 4, **meta), torch.tensor([0, 2, 5], **meta))


def test_gradient_metrics_refuse_a_gram_that_is_not_symmetric(gen):
    """Only the upper triangle is read: a cross product of two gradient sets gave a ratio."""
    a, b = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    for metric in (gcr, gms):
        with pytest.raises(ValueError, match="gram must be symmetric"):
            metric(gram=a @ b.t())
        with pytest.raises(ValueError, match="gram must be symmetric"):
            metric(gram=torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # zero gradients have zero products
    # fp32 rounding of a Gram matrix (entries computed apart, in another order) is accepted.
    g = torch.randn(5, 100_000, generator=gen) * torch.logspace(-3, 3, 5).unsqueeze(1)
    ordered = lambda i, j: (g[i] * g[j]) if i <= j else (g[i] * g[j]).flip(0)  # noqa: E731
    gram = torch.stack([torch.stack([ordered(i, j).sum() for j in range(5)]) for i in range(5)])
    assert not torch.equal(gram, gram.t())
    assert gcr(gram=gram) == gcr(g)
    assert gms(gram=gram) == pytest.approx(gms(g), rel=1e-5)


def dense_per_edit(mu, eta, offsets):
    bounds = offsets.tolist()
    return torch.stack([(eta[a:b].double().t() @ mu[a:b].double()).flatten() for a, b in zip(bounds[:-1], bounds[1:])])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factor_gram_equals_dense(dtype, gen):
    E = int(torch.randint(2, 9, (1,), generator=gen))
    counts = torch.randint(0, 6, (E,), generator=gen).tolist()
    counts[int(torch.randint(0, E, (1,), generator=gen))] = 0  # an empty edit
    offsets = ragged_offsets(counts)
    T = sum(counts)
    mu, eta = randn((T, 7), gen, dtype), randn((T, 5), gen, dtype)
    dense = dense_per_edit(mu, eta, offsets)
    expected = dense @ dense.t()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for chunk in (1, 3, 4096):
        gram = factor_gram(mu, eta, offsets, chunk=chunk)
        assert gram.dtype == torch.float64  # fp32 factors too: a float64 Gram (no under/overflow)
        assert rel_err(gram, expected) < tol, chunk
    gram = factor_gram(mu, eta, offsets, chunk=3)
    assert gcr(gram=gram) == gcr(dense)
    assert gms(gram=gram) == pytest.approx(gms(dense), rel=1e-6)


def test_factors_gram_sums_weights_and_matches_captured_grads(gen):
    """On captured factors of a real tiny model: the Gram over two weights equals the Gram of the
    concatenated per-edit gradients."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    model, tok = tiny_model("gpt2", seed=seed, dtype=torch.float64)
    batch = tokenize_pairs(model, tok, ["Toko Yasuda, the", "ab", "The capital of France is"], ["piano", "x y", "Rome"])
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"]
    factors, _ = compute_factors(model, batch, names)
    dense = torch.cat([factors[n].gradient(per_edit=True).flatten(1) for n in names], dim=1)
    assert rel_err(factors_gram(factors), dense @ dense.t()) < 1e-10
    assert rel_err(factors_gram(factors[names[0]]), gradient_gram(factors[names[0]].gradient(per_edit=True).flatten(1))) < 1e-10


def cancelling_factors(gen, rows: int, in_features: int, out_features: int, scale: float = 1.0,
                       dtype=torch.float32):
    """(mu, eta) of `rows` random tokens whose first three (edit 0 of offsets [0, 3, ...]) share one μ
    and have η summing to zero, so that edit 0's gradient Σ η_tᵀμ_t cancels (to rounding); those three
    rows times `scale`, the scale of its cancelled terms against the other edits'."""
    mu, eta = randn((rows, in_features), gen, dtype), randn((rows, out_features), gen, dtype)
    mu[1:3] = mu[0]
    eta[2] = -(eta[0] + eta[1])
    mu[:3] *= scale
    eta[:3] *= scale
    return mu, eta


def test_gms_of_an_edit_whose_token_gradients_cancel_is_a_number(gen):
    """Edit 0's three tokens share μ and their η sum to (nearly) zero: its Gram diagonal, when it was
    a sum of terms of both signs, rounded to below zero about half the time (and to ~1e-5 above it
    otherwise, hence the tolerance).  It counts as a (near) zero gradient (GMS against the float64
    dense gradients), not as a NaN from the root of a negative norm²."""
    offsets = torch.tensor([0, 3, 4, 5], dtype=torch.int32)
    for _ in range(20):
        mu, eta = cancelling_factors(gen, 5, 6, 5)
        gram = factor_gram(mu, eta, offsets)
        assert gms(gram=gram) == pytest.approx(gms(dense_per_edit(mu, eta, offsets)), abs=1e-2)


def test_a_cancelled_edits_norm_squared_is_the_float64_gradients(gen):
    """Edit 0's tokens cancel at 100× the scale of the other edits: factor_gram's fp32 kernel rounded
    its norm² at the scale of its terms, to either side of 0 by up to ~7× the other edits' largest
    norm², and above zero it read as a large gradient (GMS 0.88 where the float64 gradients give
    0.33).  The diagonal now comes from each edit's own tokens in float64: near 0 both ways, and GMS
    is the float64 gradients' in every draw."""
    offsets = torch.tensor([0, 3, 4, 5], dtype=torch.int32)
    for _ in range(20):
        mu, eta = cancelling_factors(gen, 5, 64, 32, scale=100)
        gram = factor_gram(mu, eta, offsets)
        dense = dense_per_edit(mu, eta, offsets)
        assert abs(float(gram[0, 0])) < 1e-5 * float(gram.diagonal()[1:].max())
        assert rel_err(gram.diagonal(), (dense * dense).sum(1)) < 1e-6
        assert gms(gram=gram) == pytest.approx(gms(dense), abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_cancelled_edits_norm_squared_at_1000x_is_never_below_zero(dtype, gen):
    """Edit 0's tokens cancel at 1000× the scale of the other edits (and edit 3's exactly): the
    float64 kernel Σ_{s,t} (η_s·η_t)(μ_s·μ_t) rounded edit 0's norm² at the scale of the squared terms
    (7.0 for 8.46, GMS 0.02 off, ~1e-3 of the largest norm² either way) and could take it below zero.
    The diagonal is now a sum of squares (‖R H‖², M = (QR)ᵀ): at or above zero, at the gradients'
    rounding, for fp32 and fp64 factors."""
    offsets = torch.tensor([0, 3, 4, 5, 7], dtype=torch.int32)
    for _ in range(20):
        mu, eta = cancelling_factors(gen, 7, 64, 32, scale=1000, dtype=dtype)
        mu[6], eta[6] = mu[5], -eta[5]  # edit 3: exactly zero
        gram = factor_gram(mu, eta, offsets)
        dense = dense_per_edit(mu, eta, offsets)
        top = float((dense * dense).sum(1).max())
        assert bool((gram.diagonal() >= 0).all())
        assert float(gram[3, 3]) < 1e-12 * top
        assert float((gram.diagonal() - (dense * dense).sum(1)).abs().max()) < 1e-9 * top
        # Without edit 3: the ratio of two gradients that are both rounding (fp64: edit 0 too) is rounding.
        assert gms(gram=gram[:3, :3]) == pytest.approx(gms(dense[:3]), abs=1e-6)


def test_a_users_gram_with_rounding_in_a_zero_gradients_row_is_accepted(gen):
    """An edit whose token gradients cancel has G_ii ≈ 0, so its Cauchy-Schwarz bound is 0, while its
    entries hold the rounding of the terms that cancelled: an fp32 Gram of the user's own (factor_gram
    before 68b2f62 gave such Grams on an AMD EPYC: up to 2.9 eps × the largest G_ii apart) was refused
    as not symmetric. The asymmetry is now judged with the gram dtype's rounding at its largest norm²;
    a matrix that is no Gram is still refused (test above)."""
    for _ in range(20):
        g = torch.randn(4, 30, generator=gen)
        g[0] = 0
        gram = g @ g.t()
        top = float(gram.diagonal().max())
        gram[0, 1:], gram[1:, 0] = 3e-7 * top, -3e-7 * top  # rounding of the cancelled terms, both signs
        for metric in (gcr, gms):
            assert metric(gram=gram) == pytest.approx(metric(g.double()), abs=1e-6)
        with pytest.raises(ValueError, match="gram must be symmetric"):  # a thousand times that is no rounding
            gms(gram=gram.index_fill(0, torch.tensor([0]), 3e-4 * top))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_norm_squared_that_rounds_below_zero_is_a_zero_gradient(dtype, gen):
    """A user's Gram may round a zero gradient's norm² to just below 0: within the dtype's rounding at
    the largest norm² it counts as exactly 0, so the pair metrics equal those of the Gram with 0 there
    (GMS 0 against every other edit), not those of its magnitude (`abs` for the clamp passed the
    tests above within their tolerance: mutation testing)."""
    g = torch.randn(4, 30, generator=gen, dtype=dtype)
    g[0] = 0
    gram = g @ g.t()
    below = gram.clone()
    below[0, 0] = -100 * torch.finfo(dtype).eps * float(gram.diagonal().max())
    for metric in (gcr, gms):
        assert metric(gram=below) == metric(gram=gram)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_gram_with_a_norm_squared_clearly_below_zero_is_refused(dtype, gen):
    """A Gram's diagonal holds norms²: one below zero beyond rounding was read as a zero gradient, a
    ratio from a matrix that is no Gram.  gradient_gram's and factor_gram's diagonals are sums of
    squares (factor_gram's even for an edit whose tokens cancel at 1000× the others' scale), so the
    package's own Grams pass."""
    for _ in range(10):
        E = int(torch.randint(2, 6, (1,), generator=gen))
        g = torch.randn(E, 30, generator=gen, dtype=dtype)
        k = int(torch.randint(0, E, (1,), generator=gen))
        g[k] = 0
        gram = g @ g.t()
        top = float(gram.diagonal().max())
        for value in (-1e-2 * top, -top, -1e3 * top):
            bad = gram.clone()
            bad[k, k] = value
            for metric in (gcr, gms):
                with pytest.raises(ValueError, match=rf"gram\[{k}, {k}\] = .* is below zero beyond rounding"):
                    metric(gram=bad)
        assert gms(gram=gram) == pytest.approx(gms(g.double()), abs=1e-6)
    offsets = torch.tensor([0, 3, 4, 5], dtype=torch.int32)
    for _ in range(10):
        mu, eta = cancelling_factors(gen, 5, 64, 32, scale=1000, dtype=dtype)
        gram = factor_gram(mu, eta, offsets)
        assert gcr(gram=gram) == gcr(gram=gram.clone())  # accepted, not refused
        assert gms(gram=gram) == pytest.approx(gms(dense_per_edit(mu, eta, offsets)), abs=1e-6)


def gcr_gms_of_gram_float64(gram):
    """GCR and GMS read from a Gram's values in float64: the signs of its upper triangle, and
    2r / (1 + r²) of r = √(G_ii / G_jj) over pairs (1 for two zeros)."""
    gram = gram.double()
    pairs = list(itertools.combinations(range(gram.shape[0]), 2))
    conflict = [float(gram[i, j] < 0) for i, j in pairs]
    similarity = []
    for i, j in pairs:
        a, b = float(gram[i, i]), float(gram[j, j])
        r = 1.0 if a == b == 0 else math.sqrt(min(a, b) / max(a, b))
        similarity.append(2 * r / (1 + r * r))
    return sum(conflict) / len(pairs), sum(similarity) / len(pairs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_gram_is_read_as_one_and_checked_as_one(dtype, gen):
    """A caller's bf16/fp16 Gram (its rows' product in that dtype) gives the metrics of its values, but
    a norm² below zero and an asymmetric matrix are refused as for fp32: with the 16-bit dtype's own
    1024 eps (8× the largest norm² for bf16, 1.0× for fp16) both read as a Gram, the one as a zero
    gradient, the other by its upper triangle."""
    for _ in range(10):
        E = int(torch.randint(2, 7, (1,), generator=gen))
        g = randn((E, int(torch.randint(1, 40, (1,), generator=gen))), gen, dtype)
        k = int(torch.randint(0, E, (1,), generator=gen))
        g[k] *= float(torch.randint(0, 2, (1,), generator=gen))  # maybe a zero gradient
        gram = g @ g.t()
        conflict, similarity = gcr_gms_of_gram_float64(gram)
        assert gcr(gram=gram) == conflict
        assert gms(gram=gram) == pytest.approx(similarity, rel=1e-12)
        top = float(gram.diagonal().double().max())
        c = float(torch.empty(1, dtype=torch.float64).uniform_(0.05, 0.9, generator=gen))
        below = gram.clone()
        below[k, k] = -c * top
        crossed = gram.clone()
        i, j = (k, (k + 1) % E)
        crossed[i, j] = crossed[i, j] + c * top
        crossed[j, i] = crossed[j, i] - c * top
        for metric in (gcr, gms):
            with pytest.raises(ValueError, match=rf"gram\[{k}, {k}\] = .* is below zero beyond rounding"):
                metric(gram=below)
            with pytest.raises(ValueError, match="gram must be symmetric"):
                metric(gram=crossed)


def test_gcr_gms_of_float64_gradients_and_grams_far_from_1(gen):
    """float64 rows of norm past 1e154 overflowed the Gram (GMS NaN), and GMS's √(G_ii·G_jj) overflowed
    past 1e77 (inf) and underflowed below 1e-81 (0 for equal norms); rows below 1e-154 read as zero
    gradients (GMS 1, GCR 0).  Rows b_i·2^k_i, k_i up to ±900 (powers of two: exact), give b's
    cosines' signs and the ratios 2r / (1 + r²) of their norms r = ‖b_i‖/‖b_j‖·2^(k_i - k_j)."""
    for _ in range(10):
        E = int(torch.randint(2, 7, (1,), generator=gen))
        b = torch.randn(E, 30, generator=gen, dtype=torch.float64)
        k = torch.randint(-900, 901, (E,), generator=gen)
        k[int(torch.randint(0, E, (1,), generator=gen))] = 900 * (1 if bool(torch.rand(1, generator=gen) < 0.5) else -1)
        g = b * torch.pow(2.0, k.double())[:, None]
        norm = b.norm(dim=1)
        expected = []
        for i, j in itertools.combinations(range(E), 2):
            lo, hi = (i, j) if (k[i], norm[i]) <= (k[j], norm[j]) else (j, i)
            r = float(norm[lo] / norm[hi]) * 2.0 ** int(k[lo] - k[hi])
            expected.append(2 * r / (1 + r * r))
        assert gms(g) == pytest.approx(sum(expected) / len(expected), rel=1e-12, abs=1e-300)
        assert gcr(g) == gcr(b)  # the same rows once each is scaled to its largest entry: the same products
        # A user's float64 Gram at 2^±800 its scale: the same metrics as the Gram of b.
        for shift in (-800, 800):
            gram = (b @ b.t()) * 2.0 ** shift
            assert gms(gram=gram) == pytest.approx(gms(b), rel=1e-12)
            assert gcr(gram=gram) == gcr(b)
            # and the symmetry check still holds there (its bound √(G_ii·G_jj) overflowed at 2^800: none)
            gram[0, 1] += 0.1 * gram[0, 0].sqrt() * gram[1, 1].sqrt()
            with pytest.raises(ValueError, match="gram must be symmetric"):
                gms(gram=gram)


def test_gms_of_a_zero_gradient_and_float64_subnormal_ones_is_a_number(gen):
    """A zero gradient against a float64 row of subnormal entries (norm below 2^-1023): the ratio of
    norms took 2^(e_lo - e_hi) with e = 0 for the zero row and e down to -1073 for the other, which
    overflowed, and 0·inf made GMS NaN (from finite gradients).  Oracle: the rows times 2^1060 (exact:
    their entries are multiples of 2^-1074), whose norms are normal float64 numbers; a pair with one
    zero gradient counts 0, two zero gradients 1."""
    for _ in range(10):
        E = int(torch.randint(3, 7, (1,), generator=gen))
        k = torch.randint(-1060, -1029, (E,), generator=gen)
        g = torch.randn(E, 30, generator=gen, dtype=torch.float64) * torch.pow(2.0, k.double())[:, None]
        zeros = torch.randperm(E, generator=gen)[: int(torch.randint(1, 3, (1,), generator=gen))]
        g[zeros] = 0
        up = g * 2.0 ** 530 * 2.0 ** 530  # 2^1060 is past float64's range: two exact steps
        norm = up.norm(dim=1)
        expected = []
        for i, j in itertools.combinations(range(E), 2):
            lo, hi = sorted((float(norm[i]), float(norm[j])))
            expected.append(1.0 if hi == 0 else 2 * (lo / hi) / (1 + (lo / hi) ** 2))
        assert gms(g) == pytest.approx(sum(expected) / len(expected), rel=1e-12)
        assert gcr(g) == gcr(up)  # the same rows up to a power of two: the same signs
        assert gms(g[[int(zeros[0]), next(e for e in range(E) if e not in zeros.tolist())]]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gcr_gms_of_an_infinite_gradient_are_nan(dtype, gen):
    """A gradient with an inf entry has no cosine nor a norm to compare: GCR counted the signs of its
    infinite products (a number), and GMS read it as infinitely large (0 for its pairs) from the rows,
    NaN from a Gram; now both are NaN (as for a NaN gradient) from rows, a Gram and factor_gram."""
    E = int(torch.randint(2, 6, (1,), generator=gen))
    g = torch.randn(E, 8, generator=gen, dtype=dtype)
    g[int(torch.randint(0, E, (1,), generator=gen)), int(torch.randint(0, 8, (1,), generator=gen))] = -math.inf
    mu, eta = randn((E + 1, 6), gen, dtype), randn((E + 1, 4), gen, dtype)
    mu[int(torch.randint(0, E + 1, (1,), generator=gen)), 2] = math.inf
    offsets = torch.tensor([0, 2, *range(3, E + 2)], dtype=torch.int32)
    for kwargs in (dict(grads=g), dict(gram=g.double() @ g.double().t()), dict(gram=factor_gram(mu, eta, offsets))):
        for metric in (gcr, gms):
            assert math.isnan(metric(**kwargs)), (metric.__name__, list(kwargs))


@pytest.mark.parametrize("scale", [1e-12, 1e-20, 1e20])
def test_factor_gram_tiny_and_huge_fp32_factors(scale):
    # Two one-token edits with opposite gradients, norms 1 and 2 (times scale²): the unscaled fp32
    # kernel underflowed to 0 (GCR 0, GMS 1) or overflowed to inf (GMS NaN).
    mu = torch.tensor([[1.0, 0.0], [1.0, 0.0]]) * scale
    eta = torch.tensor([[1.0], [-2.0]]) * scale
    gram = factor_gram(mu, eta, torch.tensor([0, 1, 2], dtype=torch.int32))
    assert gcr(gram=gram) == 1.0
    assert gms(gram=gram) == pytest.approx(0.8, rel=1e-6)


def test_factor_gram_holds_one_float64_kernel_per_chunk():
    """factor_gram's peak: one float64 (c, T) kernel beside an fp32 one, not the three float64 ones
    the out-of-place products held (3.0x c·T·8 bytes measured; 1.5x now), which dominated
    gradient_conflict's peak on many edits.  Live CPU tensor bytes from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    T = 1024
    g = torch.Generator().manual_seed(0)
    mu, eta = torch.randn(T, 4, generator=g), torch.randn(T, 4, generator=g)
    offsets = torch.tensor([0, 100, 500, 900, T], dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        factor_gram(mu, eta, offsets, chunk=T)
    live = peak = 0
    for _, nbytes in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        live += nbytes
        peak = max(peak, live)
    assert peak < 2 * T * T * 8, peak / (T * T * 8)


def test_factor_gram_errors():
    mu, eta = torch.ones(3, 2), torch.ones(3, 4)
    with pytest.raises(ValueError, match="edit_offsets"):
        factor_gram(mu, eta, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="same number of rows"):
        factor_gram(mu, torch.ones(2, 4), torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="mu"):
        factor_gram(torch.ones(3), eta, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk"):
        factor_gram(mu, eta, torch.tensor([0, 3], dtype=torch.int32), chunk=0)
    with pytest.raises(ValueError, match="edit_offsets must be a torch.Tensor"):  # was AttributeError
        factor_gram(mu, eta, [0, 3])
    f1 = Factors(mu, eta, torch.tensor([0, 1, 3], dtype=torch.int32))
    f2 = Factors(mu, eta, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="same edits"):
        factors_gram({"a": f1, "b": f2})
    with pytest.raises(ValueError, match="mapping"):
        factors_gram({})


def test_metrics_leave_an_eval_model_in_eval_mode():
    """Scoring restores the model's own mode, eval as well as train (a model left in train mode
    would run with dropout afterwards)."""
    lm = scripted_model()
    tok = lm.tok
    lm.eval()
    reliability(lm, tok, REQUESTS)
    base = locality_predictions(lm, tok, REQUESTS)
    drawdown(lm, tok, REQUESTS, base)
    assert lm.modes_seen and not any(lm.modes_seen)
    assert not lm.training


class ScriptedEditor:
    """A stand-in ModelEditor over the PrefixLM: apply teaches it `lessons`, undo forgets them."""

    method = "scripted"

    def __init__(self, lm, lessons):
        self.model, self.tokenizer, self.lessons = lm, lm.tok, lessons

    def apply(self, requests):
        lm, saved = self.model, dict(self.model.table)
        for text, wrong_after in self.lessons:
            lm.teach(text, wrong_after)
        return SimpleNamespace(undo=lambda: (lm.table.clear(), lm.table.update(saved)))


def test_measure_edit_scores_every_metric_by_hand():
    """One run of evaluate.measure_edit on the scripted LM: the edit makes request 0's rephrase fully
    right and changes one of the three tokens of its locality target, so ES = (1 + 2/3)/2, DD = 1/2
    (an input counts as changed when any scored token is: 1/6 by token), LMP = ES − DD, NS = 2/3;
    everything is undone afterwards."""
    from dcedit_kernels.evaluate import measure_edit

    lm = scripted_model()
    editor = ScriptedEditor(lm, [("uv ab", None), ("hi jk", "hi j")])
    before = dict(lm.table)
    run = measure_edit(editor, REQUESTS)
    assert run["es"] == pytest.approx((1 + 2 / 3) / 2)
    assert run["reliability"] == pytest.approx((1 + 2 / 3) / 2)
    assert run["dd"] == pytest.approx(0.5)
    assert run["lmp"] == pytest.approx((1 + 2 / 3) / 2 - 0.5)
    assert run["ns"] == pytest.approx(2 / 3)
    assert run["n_edits"] == 2 and lm.table == before


def test_measure_edit_scores_ns_over_the_requests_with_a_locality_target():
    """A locality prompt without its target counts for DD (every next token of the text) but not for
    NS: an edit that changes one of request 0's three locality tokens gives NS 2/3 (request 0's
    alone) and DD 1/2 ("world" is unchanged)."""
    from dcedit_kernels.evaluate import measure_edit

    lm = scripted_model()
    lm.teach("world")
    run = measure_edit(ScriptedEditor(lm, [("hi jk", "hi j")]), [REQUESTS[0], EditRequest("pq", "cd", locality="world")])
    assert run["ns"] == pytest.approx(2 / 3) and run["dd"] == pytest.approx(0.5)


def test_scoring_restores_every_submodules_mode():
    """A model that trains with a block kept in eval mode (or an eval model with a submodule in
    train mode) gets each submodule's own mode back, also when scoring raises: restoring only the
    top-level mode (`model.train(was_training)`) flipped the block with it."""
    model, tok = tiny_model("gpt2", seed=0)
    for top, odd in ((True, model.transformer.h[0]), (False, model.transformer.drop)):
        model.train(top)
        odd.train(not top)
        before = {n: m.training for n, m in model.named_modules()}
        reliability(model, tok, [EditRequest("ab", "cd"), EditRequest("The sky is", "blue")], batch_size=1)
        assert {n: m.training for n, m in model.named_modules()} == before
        with pytest.raises(ValueError, match=r"requests\[1\]\.locality"):  # one token: nothing to score
            locality_predictions(model, tok, [EditRequest("ab", "cd", locality="hello"),
                                              EditRequest("ab", "cd", locality="z")])
        assert {n: m.training for n, m in model.named_modules()} == before


def test_two_threads_scoring_a_model_in_train_mode_score_in_eval_mode_and_leave_it_training():
    """Two threads scoring one model in train mode (README "Threads"): the second in, while the
    first had the model in eval mode, kept "eval" as the mode to restore and put it back after the
    first had restored train mode (the model left in eval mode), and its pass after the first left
    ran in train mode (dropout on).  The modes are now the model's, kept by the first in and put
    back by the last out: every pass in eval mode, the model training afterwards."""
    import threading

    model, tok = tiny_model("gpt2", seed=0)
    requests = [EditRequest("ab", "cd"), EditRequest("The sky is", "blue")]
    model.train()
    first, second_in, first_out = threading.get_ident(), threading.Event(), threading.Event()
    second, seen = [], []

    def interleave(_module, _args):
        if threading.get_ident() == first and not second:
            second.append(threading.Thread(target=reliability, args=(model, tok, requests)))
            second[0].start()
            second_in.wait(30)  # the second thread is in its pass
        elif threading.get_ident() != first:
            second_in.set()
            first_out.wait(30)  # and stays there until the first thread's call has returned
            seen.append(model.training)

    hook = model.get_input_embeddings().register_forward_pre_hook(interleave)
    try:
        reliability(model, tok, requests)
    finally:
        first_out.set()
        hook.remove()
    second[0].join(60)
    assert seen == [False]
    assert model.training and all(m.training for m in model.modules())


def test_scoring_errors_name_the_callers_item():
    """A bad item in a later batch is named by its place in the caller's list (it was named by its
    place in the batch: `texts[1]` for requests[5] with batch_size 4)."""
    model, tok = tiny_model("gpt2", seed=0)
    requests = [EditRequest("ab", "cd", locality="hello there") for _ in range(5)]
    requests.append(EditRequest("ab", "cd", locality="z"))
    base = [torch.zeros(0)] * len(requests)
    for fn in (lambda: locality_predictions(model, tok, requests, batch_size=4),
               lambda: drawdown(model, tok, requests, base, batch_size=4)):
        with pytest.raises(ValueError, match=r"^requests\[5\]\.locality \('z'\) needs at least 2 tokens"):
            fn()
    with pytest.raises(ValueError, match=r"^prompts\[5\] must be a non-empty string"):
        target_accuracy(model, tok, ["ab"] * 5 + [" "], ["cd"] * 6, batch_size=4)


def test_a_target_the_tokenizer_refuses_is_named_as_the_requests_target(gen):
    """BERT's normalizer drops "\\x07", so the target tokenizes to nothing: the tokenizer's error about
    `targets[i]` of its batch names the caller's `requests[k].target` (and the prompt as one)."""
    lm = PrefixLM(tiny_tokenizer("bert"))
    k = int(torch.randint(1, 5, (1,), generator=gen))
    requests = [EditRequest("a b", "c")] * k + [EditRequest("a b", "\x07")]
    with pytest.raises(ValueError, match=rf"^requests\[{k}\]\.target \('\\x07'\) tokenizes to no tokens "
                                         rf"after requests\[{k}\]\.prompt$"):
        reliability(lm, lm.tok, requests, batch_size=2)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_a_text_past_the_positions_is_named_with_what_is_too_long(arch, gen):
    """A row past a learned position table is a ValueError naming the caller's item and what is too
    long: a causal pair's "prompt + target", a seq2seq prompt or target, and a causal LM's
    locality text scored without a target its "prompt" (it said "prompt + target", though there
    is no target).  The model is left as it was."""
    model, tok = tiny_model(arch, seed=seed_from(gen))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    limit = model.config.max_position_embeddings if arch == "bart" else model.config.n_positions
    long = "word " * int(torch.randint(limit, 2 * limit, (1,), generator=gen))
    fine = EditRequest("ab", "cd", locality="hello there", locality_target="cd")
    k = int(torch.randint(1, 4, (1,), generator=gen))
    cases = [(EditRequest("ab", long), reliability, r"requests\[{k}\]\.target", "target"),
             (EditRequest(long, "cd"), reliability, r"requests\[{k}\]\.prompt", "prompt")]
    if arch == "gpt2":
        cases = [(EditRequest("ab", long), reliability, r"requests\[{k}\]\.prompt \+ requests\[{k}\]\.target",
                  r"prompt \+ target"),
                 (EditRequest("ab", "cd", locality=long), locality_predictions, r"requests\[{k}\]\.locality",
                  "prompt")]
    for bad, metric, label, what in cases:
        with pytest.raises(ValueError, match=rf"^{label.format(k=k)}: a text is \d+ tokens \({what}\), "
                                             rf"more than the model's {limit} positions"):
            metric(model, tok, [fine] * k + [bad], batch_size=2)
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_a_seq2seq_target_of_special_tokens_only_is_a_value_error(arch, gen):
    """A seq2seq target is scored without its special tokens; one that holds nothing else ("<unk>",
    "</s>") had no token left: its accuracy was NaN (and so the metric's mean), exact=True raised
    RuntimeError from min() of nothing.  Now a ValueError naming the request; the other targets
    still score as one at a time."""
    model, tok = tiny_model(arch, seed=seed_from(gen))
    special = [tok.unk_token, tok.eos_token][int(torch.randint(0, 2, (1,), generator=gen))]
    requests = [EditRequest("The sky is", "blue")] * 4 + [EditRequest("Say", special)]
    for exact in (False, True):
        with pytest.raises(ValueError, match=rf"^requests\[4\]\.target \({special!r}\) has no token to score"):
            reliability(model, tok, requests, batch_size=3, exact=exact)
    with pytest.raises(ValueError, match=r"^targets\[1\] .* has no token to score"):
        target_accuracy(model, tok, ["ab", "cd"], ["x", special])
    accuracy = target_accuracy(model, tok, ["The sky is"], ["blue"])
    assert float(accuracy[0]) == pytest.approx(argmax_accuracy(model, tok, "The sky is", "blue", seq2seq=True))


def gcr_gms_float64(g):
    g = g.double()
    conflict, similarity = [], []
    for i in range(g.shape[0]):
        for j in range(i + 1, g.shape[0]):
            a, b = g[i].norm(), g[j].norm()
            conflict.append(float(g[i] @ g[j] < 0))
            similarity.append(1.0 if a == b == 0 else float(2 * a * b / (a * a + b * b)))
    return sum(conflict) / len(conflict), sum(similarity) / len(similarity)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gcr_gms_match_float64_at_any_scale(dtype, gen):
    """Per-edit gradients whose rows differ by up to 1e±30 (fp32 and fp64; bf16 shares fp32's
    exponent range): the fp32 Gram of the raw rows underflowed (a pair with cosine -1 of entries
    ~1e-23 counted as no conflict, GMS 1 instead of 0.8 for norms 1 and 2) and overflowed."""
    for _ in range(10):
        E, P = int(torch.randint(2, 7, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        scale = 10.0 ** torch.randint(-30, 31, (E, 1), generator=gen, dtype=torch.float64)
        g = (randn((E, P), gen, torch.float64) * scale).to(dtype)
        maybe_zero = int(torch.randint(0, E, (1,), generator=gen))
        g[maybe_zero] *= float(torch.randint(0, 2, (1,), generator=gen))  # maybe a zero row
        conflict, similarity = gcr_gms_float64(g)
        assert gcr(g) == conflict
        assert gms(g) == pytest.approx(similarity, rel=1e-5)
    g = torch.tensor([[1e-23, 0.0], [-2e-23, 0.0]], dtype=dtype)
    assert gcr(g) == 1.0 and gms(g) == pytest.approx(0.8, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_gcr_gms_of_a_nan_gradient_are_nan():
    """A NaN gradient gave GCR 1/3 and GMS 1.0 (NaN pairs counted as non-conflicting, equal-norm)."""
    g = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [-1.0, 0.0]])
    assert math.isnan(gcr(g)) and math.isnan(gms(g))
    assert math.isnan(gcr(gram=gradient_gram(g))) and math.isnan(gms(gram=gradient_gram(g)))


def _live_edit_warnings(call) -> list[str]:
    """The messages of the warnings about live edits that `call()` gives."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "live edit" in str(w.message)]


def test_measure_edit_and_evaluate_method_warn_of_the_models_live_edits(gen):
    """measure_edit and evaluate_method on a model still holding an edit (applied, not undone)
    took its predictions for the unedited model's (DD's reference) and applied each edit on top,
    without a word (a new-user audit).  They warn, naming how many and how to undo or keep them,
    evaluate_method once per call; undone or kept edits say nothing; the live edits stay as they were."""
    from test_model_editor import make_editor, random_requests

    from dcedit_kernels.evaluate import evaluate_method, measure_edit

    me = make_editor("gpt2", "mend", gen)
    reqs = random_requests(gen, 3)
    measure = lambda: measure_edit(me, reqs[:2], batch_size=2)  # noqa: E731
    evaluate = lambda: evaluate_method(me.model, me.tokenizer, me, reqs, n_edits=(1, 2), repeats=2,  # noqa: E731
                                       batch_size=2, progress=False)
    assert _live_edit_warnings(measure) == [] and _live_edit_warnings(evaluate) == []
    first = me.apply(reqs[2:])
    said = _live_edit_warnings(measure)
    assert len(said) == 1 and said[0].startswith("measure_edit: the model holds 1 live edit (")
    assert "undo it first (handle.undo()" in said[0] and "handle.keep()" in said[0], said
    said = _live_edit_warnings(evaluate)  # 4 runs, one warning
    assert len(said) == 1 and said[0].startswith("evaluate_method: the model holds 1 live edit ("), said
    second = me.apply(reqs[:1])
    said = _live_edit_warnings(measure)
    assert len(said) == 1 and said[0].startswith("measure_edit: the model holds 2 live edits ("), said
    assert me._live == [first, second]  # the runs' own edits undone, the caller's left
    second.undo()
    assert len(_live_edit_warnings(measure)) == 1
    first.keep()  # part of the model on purpose
    assert _live_edit_warnings(measure) == [] and _live_edit_warnings(evaluate) == []


def test_measure_edit_scores_ns_and_dd_of_the_edited_model_in_one_pass(gen):
    """With a locality_target on every request, NS and DD score the same pairs on the edited model:
    measure_edit runs them as one pass and gives the values of the two metrics called apart."""
    from test_model_editor import random_requests

    from dcedit_kernels.evaluate import measure_edit

    model, tok = tiny_model("gpt2", seed=int(torch.randint(0, 100, (1,), generator=gen)))
    reqs = random_requests(gen, 6)
    base = locality_predictions(model, tok, reqs, batch_size=4)
    weight = model.transformer.h[0].mlp.c_fc.weight
    noise = torch.randn(weight.shape, generator=gen)

    class NoiseEditor:
        method = "noise"

        def __init__(self):
            self.model, self.tokenizer = model, tok

        def apply(self, requests):
            saved = weight.detach().clone()
            with torch.no_grad():
                weight.add_(noise)
            return SimpleNamespace(undo=lambda: weight.data.copy_(saved))

    def apart(m):
        return dict(ns=neighbourhood_success(m, tok, reqs, 4), dd=drawdown(m, tok, reqs, base, 4))

    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        run = measure_edit(NoiseEditor(), reqs, batch_size=4)
    finally:
        hook.remove()
    assert len(calls) == 4 * 2  # unedited locality, ES, reliability, NS + DD: 2 batches of 4 each
    again = measure_edit(NoiseEditor(), reqs, batch_size=4, during=apart)
    assert (run["ns"], run["dd"]) == (again["ns"], again["dd"]) == (again["during"]["ns"], again["during"]["dd"])
    assert 0 < run["dd"]  # the edit changed some locality prediction
    # Its edit may change any block, so the kept lower blocks cannot serve it (it has no `modules`:
    # a bare AttributeError after the unedited scores).
    with pytest.raises(ValueError, match="lower_blocks keeps the blocks below a ModelEditor's layers.*NoiseEditor"):
        measure_edit(NoiseEditor(), reqs, batch_size=4, lower_blocks={})


def test_prediction_metrics_average_over_requests_not_tokens():
    """Each request counts once whatever its target's length (SPEC: the mean over requests of each
    request's accuracy): a 7-token target all right and a 2-token one half right give (1 + 1/2)/2,
    not the 8/9 of the pooled tokens."""
    lm = PrefixLM(tiny_tokenizer("gpt2"))
    requests = [EditRequest("xy", "abcdef", rephrase="uv", locality="hi", locality_target="jklmno"),
                EditRequest("pq", "c", rephrase="mn", locality="rs", locality_target="t")]
    for prompt, request_field, target_field in (("xy", "prompt", "target"), ("uv", "rephrase", "target"),
                                                ("hi", "locality", "locality_target")):
        lm.teach(f"{prompt} " + getattr(requests[0], target_field))
        second = getattr(requests[1], request_field)
        lm.teach(f"{second} " + getattr(requests[1], target_field), wrong_after=f"{second} ")
    want = (1 + 1 / 2) / 2
    assert reliability(lm, lm.tok, requests) == pytest.approx(want)
    assert edit_success(lm, lm.tok, requests) == pytest.approx(want)
    assert neighbourhood_success(lm, lm.tok, requests) == pytest.approx(want)
    assert reliability(lm, lm.tok, requests, exact=True) == pytest.approx(1 / 2)


@pytest.mark.parametrize("fp64", ["mu", "eta"])
def test_factor_gram_of_mixed_dtype_factors_is_computed_in_float64(fp64, gen):
    """Factors of which one is float64 and the other fp32 (either way round) give the float64
    Gram of the float64 dense gradients, to float64 rounding: the kernel is computed in float64
    when either factor is (in fp32 the float64 factor was rounded first, an error ~1e-7).  Pins
    factor_gram's dtype choice over both factors."""
    counts = torch.randint(1, 5, (3,), generator=gen).tolist()
    offsets = ragged_offsets(counts)
    T = sum(counts)
    mu = randn((T, 6), gen, torch.float64 if fp64 == "mu" else torch.float32)
    eta = randn((T, 4), gen, torch.float64 if fp64 == "eta" else torch.float32)
    dense = dense_per_edit(mu, eta, offsets)
    assert rel_err(factor_gram(mu, eta, offsets), dense @ dense.t()) < 1e-12


def test_gradient_metrics_of_zero_width_gradients(gen):
    """Gradients with no entries, (E, 0) rows or factors of a layer with no input feature, are zero
    gradients: GCR 0 (a zero gradient conflicts with nothing), GMS 1 (a pair of zeros) and a zero
    Gram, not amax's error on a reduction over no entry.  Pins _pow2_scaled_rows' zero-width case."""
    E = int(torch.randint(2, 6, (1,), generator=gen))
    assert gcr(torch.zeros(E, 0)) == 0.0 and gms(torch.zeros(E, 0)) == 1.0
    counts = torch.randint(0, 4, (E,), generator=gen).tolist()
    T = sum(counts)
    gram = factor_gram(torch.zeros(T, 0), randn((T, 3), gen), ragged_offsets(counts))
    assert torch.equal(gram, torch.zeros(E, E, dtype=torch.float64))
    gram = factor_gram(randn((T, 3), gen), torch.zeros(T, 0), ragged_offsets(counts))
    assert torch.equal(gram, torch.zeros(E, E, dtype=torch.float64))


# --- one row at a time, written from the README and the docstrings alone ----------------------


def _row_ids(tok, text):
    ids = list(tok(text)["input_ids"])
    while ids and ids[-1] in set(tok.all_special_ids):  # a trailing EOS is no token of the text
        ids.pop()
    return ids


def _row_predictions(model, tok, prompt, target=None):
    """(argmax ids, gold ids) of one unpadded row: the target's tokens (those after the prompt's own),
    or, without a target, every token of the text but the first, each predicted at the position before."""
    if target is None:
        ids, first = _row_ids(tok, prompt), 1
    else:
        ids, prompt_ids = _row_ids(tok, readme_join(prompt, target)), _row_ids(tok, prompt)
        assert ids[:len(prompt_ids)] == prompt_ids  # the tiny tokenizers spell one token per character
        first = len(prompt_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits[first - 1:len(ids) - 1].argmax(-1), torch.tensor(ids[first:])


def _row_accuracy(model, tok, prompt, target, exact=False):
    predicted, gold = _row_predictions(model, tok, prompt, target)
    hits = (predicted == gold).double().tolist()
    return min(hits) if exact else sum(hits) / len(hits)


def _speaking_model(arch, gen):
    """A tiny model whose argmax is always a lowercase letter or the space (the other rows of its
    output embedding zeroed), so that its own greedy continuations are texts it partly predicts."""
    model, tok = tiny_model(arch, seed=seed_from(gen))
    allowed = {_row_ids(tok, "a" + ch)[-1] for ch in "abcdefghijklmnopqrstuvwxyz "}
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[[i for i in range(head.shape[0]) if i not in allowed]] = 0
    return model, tok


def _greedy_text(model, tok, prompt, n):
    ids, out = _row_ids(tok, prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    text = tok.decode(out)
    return text if text.strip() else text + "ab"


def _mixed_requests(model, tok, gen):
    """Random requests plus the join's whitespace cases, and some whose target (and locality target) is
    the model's own greedy continuation, so that accuracies are neither all 0 nor all 1."""
    from test_model_editor import random_requests

    reqs = random_requests(gen, 4) + [
        EditRequest("The capital of France is", " Rome", rephrase="France's capital:", locality="Paris is in",
                    locality_target="France"),
        EditRequest("Its name is ", "Bob Smith", rephrase="Called ", locality="The sky is", locality_target=" blue sky"),
        EditRequest("ab", "x y z", rephrase="A much longer rephrased prompt", locality="hello there friend"),
    ]
    for i, r in enumerate(list(reqs)):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        loc_target = _greedy_text(model, tok, r.locality, n) if r.locality_target else None
        reqs.append(EditRequest(r.prompt, _greedy_text(model, tok, r.prompt, n), rephrase=r.rephrase,
                                locality=r.locality, locality_target=loc_target))
    return reqs


@contextlib.contextmanager
def _noise_added(weight, noise):
    """`weight` plus `noise` inside the block (a stand-in edit), its own values back after it, also
    when the block raises."""
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(noise)
    try:
        yield
    finally:
        weight.data.copy_(saved)


def _oracle_dd(edited, base):
    """DD from each locality row's predictions after and before the change: "input" the share of rows
    with any scored token changed, "token" the mean share of changed tokens."""
    return {"input": sum(float((a != b).any()) for a, b in zip(edited, base)) / len(base),
            "token": sum(float((a != b).double().mean()) for a, b in zip(edited, base)) / len(base)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prediction_metrics_and_drawdown_match_one_row_at_a_time(arch, gen):
    """On a tiny real causal LM, the accuracies, the locality predictions and DD of any batch size
    (1, 2: sorted rows with padding, more than the rows: one padded batch), under either tokenizer
    padding side (the README: the batches pad on the right whatever it says), equal an unpadded
    one-row-at-a-time computation with the README's join (a space unless the prompt ends in
    whitespace or the target starts with it): targets of several tokens, locality inputs with and
    without a target (then every next token), DD of a weight change scored against the unedited
    predictions, "input" (any scored token changed) and "token" (share changed)."""
    model, tok = _speaking_model(arch, gen)
    reqs = _mixed_requests(model, tok, gen)
    local = [r for r in reqs if r.locality]
    rows = {field: [(getattr(r, prompt_field), getattr(r, target_field)) for r in reqs]
            for field, prompt_field, target_field in (("rel", "prompt", "target"), ("es", "rephrase", "target"),
                                                      ("ns", "locality", "locality_target"))}
    base = [_row_predictions(model, tok, r.locality, r.locality_target)[0] for r in local]
    weight = model.get_submodule("transformer.h.1.mlp.c_fc" if arch == "gpt2" else "model.layers.1.mlp.up_proj").weight
    noise = torch.randn(weight.shape, generator=gen) * 0.03
    with _noise_added(weight, noise):
        edited = [_row_predictions(model, tok, r.locality, r.locality_target)[0] for r in local]
    want_dd = _oracle_dd(edited, base)
    want = {(field, exact): [_row_accuracy(model, tok, p, t, exact) for p, t in pairs]
            for field, pairs in rows.items() for exact in (False, True)}
    assert 0 < sum(want[("rel", False)]) < len(reqs)  # some right, some wrong
    for side in ("left", "right"):
        tok.padding_side = side
        for batch_size in (1, 2, len(reqs) + 3):
            for exact in (False, True):
                got = {"rel": reliability(model, tok, reqs, batch_size, exact),
                       "es": edit_success(model, tok, reqs, batch_size, exact),
                       "ns": neighbourhood_success(model, tok, [r for r in reqs if r.locality_target], batch_size, exact)}
                accuracy = target_accuracy(model, tok, [p for p, _ in rows["rel"]], [t for _, t in rows["rel"]],
                                           batch_size, exact)
                assert accuracy.tolist() == want[("rel", exact)], (side, batch_size, exact)
                for field, value in got.items():
                    scored = [a for a, (_, t) in zip(want[(field, exact)], rows[field]) if t is not None]
                    assert value == pytest.approx(sum(scored) / len(scored), rel=1e-12, abs=1e-15), (field, side)
            predicted = locality_predictions(model, tok, local, batch_size)
            assert all(torch.equal(p, b) for p, b in zip(predicted, base)), (side, batch_size)
            with _noise_added(weight, noise):
                for reduction, value in want_dd.items():
                    assert drawdown(model, tok, local, predicted, batch_size, reduction) == pytest.approx(value, abs=1e-15)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_measure_edit_and_evaluate_method_of_a_real_edit_match_one_row_at_a_time(arch, gen):
    """measure_edit of a real MEND edit of the upper block (random non-zero editor: the scoring of the
    edited model may run from the unedited pass's kept lower-block output) on requests where some lack
    a rephrase, a locality prompt or a locality target: ES over the requests with a rephrase,
    reliability over all, NS over those with a locality target, DD over those with a locality prompt
    (unedited predictions first), LMP = ES − DD, each equal to an unpadded one-row computation of the
    model with the same edit applied (to the requests without their locality fields) and undone.
    evaluate_method's mean and population std over its runs' samples are those of the same computation."""
    import dataclasses
    import warnings

    from dcedit_kernels.evaluate import evaluate_method, measure_edit, sample_indices
    from dcedit_kernels.model_editor import ModelEditor
    from test_model_editor import randomize_editors

    model, tok = _speaking_model(arch, gen)
    reqs = _mixed_requests(model, tok, gen)
    for i, field in ((0, "rephrase"), (1, "locality"), (8, "rephrase")):
        reqs[i] = dataclasses.replace(reqs[i], **{field: None}, **({"locality_target": None} if field == "locality" else {}))
    layers = (["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"] if arch == "gpt2"
              else ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"])
    me = ModelEditor(model, tok, layers, method="mend", rank=5, edit_lr=0.02)

    def by_rows(batch):
        def mean(values):
            return sum(values) / len(values) if values else None

        local = [r for r in batch if r.locality]
        base = [_row_predictions(model, tok, r.locality, r.locality_target)[0] for r in local]
        handle = me.apply([dataclasses.replace(r, locality=None, locality_target=None) for r in batch])
        try:
            out = dict(es=mean([_row_accuracy(model, tok, r.rephrase, r.target) for r in batch if r.rephrase]),
                       reliability=mean([_row_accuracy(model, tok, r.prompt, r.target) for r in batch]),
                       ns=mean([_row_accuracy(model, tok, r.locality, r.locality_target)
                                for r in batch if r.locality_target]),
                       dd=mean([float((_row_predictions(model, tok, r.locality, r.locality_target)[0] != b).any())
                                for r, b in zip(local, base)]))
        finally:
            handle.undo()
        out["lmp"] = None if out["es"] is None or out["dd"] is None else out["es"] - out["dd"]
        return out

    def same(got, want):
        return got is want is None or (None not in (got, want) and got == pytest.approx(want, rel=1e-12, abs=1e-15))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-editor warning
        # An edit that leaves every rephrase (or prompt) wrong or every one right would let a metric
        # computed on the wrong rows pass: draw editors until neither is (1 draw in ~13 had ES 0).
        for _ in range(20):
            randomize_editors(me, gen)
            want = by_rows(reqs)
            if 0 < want["reliability"] < 1 and 0 < want["es"] < 1:
                break
        assert 0 < want["reliability"] < 1 and 0 < want["es"] < 1
        for batch_size in (1, 2, len(reqs) + 3):
            run = measure_edit(me, reqs, batch_size=batch_size)
            for metric, value in want.items():
                assert same(run[metric], value), (metric, batch_size, run[metric], value)
        for sample in (reqs[:2], reqs[1:2]):  # no locality prompt in the second: DD, NS and LMP None
            run = measure_edit(me, sample, batch_size=2)
            assert all(same(run[m], v) for m, v in by_rows(sample).items()), sample
        result = evaluate_method(model, tok, me, reqs, n_edits=(3,), repeats=3, seed=5, batch_size=2, progress=False)
        runs = [by_rows([reqs[i] for i in sample_indices(len(reqs), 3, 5, k)]) for k in range(3)]
    for metric in want:
        values = [r[metric] for r in runs if r[metric] is not None]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        stat = result["by_n"][3][metric]
        assert same(stat["mean"], mean) and same(stat["std"], std), (metric, stat, values)


# --- seq2seq, 16-bit models and every method inside measure_edit, one row at a time ------------------
# Written from the README ("Reading the numbers") and the metrics/tokenize docstrings alone: a seq2seq
# model's encoder reads the prompt as its tokenizer encodes it, its decoder is teacher-forced on the
# target's labels (the target's tokens with the tokenizer's special tokens) shifted right after the
# decoder start token, and the scored tokens are the labels that are not special tokens.


def _s2s_predictions(model, tok, prompt, target):
    """(argmax ids, gold ids) of one unpadded seq2seq row."""
    labels = list(tok(target)["input_ids"])
    decoder = [model.config.decoder_start_token_id] + labels[:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok(prompt)["input_ids"]]),
                       decoder_input_ids=torch.tensor([decoder])).logits[0]
    scored = [t for t, label in enumerate(labels) if label not in set(tok.all_special_ids)]
    return logits.argmax(-1)[scored], torch.tensor([labels[t] for t in scored])


def _any_predictions(model, tok, prompt, target=None):
    """One unpadded row of either kind, scored in eval mode."""
    was = model.training
    model.eval()
    try:
        if model.config.is_encoder_decoder:
            return _s2s_predictions(model, tok, prompt, target)
        return _row_predictions(model, tok, prompt, target)
    finally:
        model.train(was)


def _any_accuracy(model, tok, prompt, target, exact=False):
    predicted, gold = _any_predictions(model, tok, prompt, target)
    hits = (predicted == gold).double().tolist()
    return min(hits) if exact else sum(hits) / len(hits)


def _rows_metrics(model, tok, reqs, base):
    """ES, reliability, NS, DD ("input") and LMP of the model as it is, one row at a time; `base`: the
    unedited predictions of the requests with a locality prompt."""
    def mean(values):
        return sum(values) / len(values) if values else None

    now = [_any_predictions(model, tok, r.locality, r.locality_target)[0] for r in reqs if r.locality]
    out = dict(es=mean([_any_accuracy(model, tok, r.rephrase, r.target) for r in reqs if r.rephrase]),
               reliability=mean([_any_accuracy(model, tok, r.prompt, r.target) for r in reqs]),
               ns=mean([_any_accuracy(model, tok, r.locality, r.locality_target) for r in reqs if r.locality_target]),
               dd=mean([float((a != b).any()) for a, b in zip(now, base)]))
    out["lmp"] = None if out["es"] is None or out["dd"] is None else out["es"] - out["dd"]
    return out


def _speaking_any(arch, gen, dtype=torch.float32):
    """`_speaking_model` for either kind of model (and BART's final logits bias zeroed too)."""
    model, tok = tiny_model(arch, seed=seed_from(gen), dtype=dtype)
    allowed = {i for i in tok(" ".join("abcdefghijklmnopqrstuvwxyz"))["input_ids"] if i not in set(tok.all_special_ids)}
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[[i for i in range(head.shape[0]) if i not in allowed]] = 0
        if getattr(model, "final_logits_bias", None) is not None:
            model.final_logits_bias.zero_()
    return model, tok


def _greedy_any(model, tok, prompt, n):
    """n greedy tokens after the prompt (a seq2seq decoder's from its start token and the specials its
    labels start with), as text; "ab" when nothing is left of them."""
    special = set(tok.all_special_ids)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            lead = list(itertools.takewhile(special.__contains__, tok("a")["input_ids"]))  # BART's <s>
            ids, out = torch.tensor([tok(prompt)["input_ids"]]), []
            for _ in range(n):
                decoder = torch.tensor([[model.config.decoder_start_token_id] + lead + out])
                out.append(int(model(input_ids=ids, decoder_input_ids=decoder).logits[0, -1].argmax()))
        else:
            ids, out = _row_ids(tok, prompt), []
            for _ in range(n):
                out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    text = tok.decode([i for i in out if i not in special]).strip()
    return text or "ab"


def _requests_any(model, tok, gen, n=3):
    """n random requests, and n more whose targets (and locality targets) are the model's own greedy
    continuations, so that accuracies are neither all 0 nor all 1."""
    from test_model_editor import random_requests

    reqs = random_requests(gen, n)
    for r in list(reqs):
        k = int(torch.randint(1, 5, (1,), generator=gen))
        reqs.append(EditRequest(r.prompt, _greedy_any(model, tok, r.prompt, k), rephrase=r.rephrase,
                                locality=r.locality, locality_target=_greedy_any(model, tok, r.locality, k)))
    return reqs


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_prediction_metrics_and_drawdown_match_one_row_at_a_time(arch, gen):
    """A tiny BART/T5: reliability, ES, NS (token share and exact), target_accuracy, the locality
    predictions and DD ("input" and "token") after a weight change equal an unpadded one-row computation
    (encoder: the prompt; decoder teacher-forced on the target's labels shifted right; special tokens not
    scored: BART's <s>, </s>, T5's </s>; a target with a leading space, whose space token is scored),
    at batch sizes 1, 3 and above the row count."""
    model, tok = _speaking_any(arch, gen)
    reqs = _requests_any(model, tok, gen) + [EditRequest("Its name is ", " Bob Smith", rephrase="Called",
                                                         locality="The sky is", locality_target="blue sky")]
    rows = {"rel": [(r.prompt, r.target) for r in reqs], "es": [(r.rephrase, r.target) for r in reqs],
            "ns": [(r.locality, r.locality_target) for r in reqs]}
    want = {(field, exact): [_any_accuracy(model, tok, p, t, exact) for p, t in pairs]
            for field, pairs in rows.items() for exact in (False, True)}
    assert 0 < sum(want[("rel", False)]) < len(reqs)  # some right, some wrong
    base = [_any_predictions(model, tok, r.locality, r.locality_target)[0] for r in reqs]
    weight = model.get_submodule("model.decoder.layers.1.fc1" if arch == "bart"
                                 else "decoder.block.1.layer.2.DenseReluDense.wi").weight
    noise = torch.randn(weight.shape, generator=gen) * weight.detach().std()
    with _noise_added(weight, noise):
        edited = [_any_predictions(model, tok, r.locality, r.locality_target)[0] for r in reqs]
    want_dd = _oracle_dd(edited, base)
    for batch_size in (1, 3, len(reqs) + 2):
        for exact in (False, True):
            got = {"rel": reliability(model, tok, reqs, batch_size, exact),
                   "es": edit_success(model, tok, reqs, batch_size, exact),
                   "ns": neighbourhood_success(model, tok, reqs, batch_size, exact)}
            for field, value in got.items():
                assert value == pytest.approx(sum(want[(field, exact)]) / len(reqs), rel=1e-12, abs=1e-15), (field, batch_size)
            accuracy = target_accuracy(model, tok, [p for p, _ in rows["es"]], [t for _, t in rows["es"]], batch_size, exact)
            assert accuracy.tolist() == want[("es", exact)], batch_size
        predicted = locality_predictions(model, tok, reqs, batch_size)
        assert all(torch.equal(p, b) for p, b in zip(predicted, base)), batch_size
        with _noise_added(weight, noise):
            for reduction, value in want_dd.items():
                assert drawdown(model, tok, reqs, predicted, batch_size, reduction) == pytest.approx(value, abs=1e-15)


_MEASURED_LAYERS = {
    "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"],
    "llama": ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"],
    # An encoder layer and the LM head: edits of the decoder MLPs often moved no argmax of the tiny BART and T5.
    "bart": ["model.encoder.layers.1.fc1", "lm_head"],
    "t5": ["encoder.block.1.layer.1.DenseReluDense.wi", "lm_head"],
}


@pytest.mark.parametrize("method", ["ft", "ft_kl", "mend", "raeditor", "proeditor"])
@pytest.mark.parametrize("arch,dtype", [("gpt2", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float16),
                                        ("bart", torch.float32), ("t5", torch.float32)])
def test_measure_edit_scores_each_methods_own_edit_and_restores_the_model(arch, dtype, method, gen):
    """measure_edit with FT, FT+KL, MEND, RaEditor (seeded split) or ProEditor on a tiny causal LM (fp32,
    bf16, fp16) or seq2seq LM: ES, reliability, NS, DD and LMP equal the one-row computation on the model
    as it is while the edit is live (read by `during`; unedited predictions taken first; a 16-bit model
    scored in its own dtype, one row a batch where padding could move its rounding), the live weights are
    bit for bit what the same method's apply of the requests without their locality fields gives (FT+KL:
    not those of the requests with them, its KL then fitted to them), the edited layers changed, and after
    the run every weight is bit-identical to before."""
    import dataclasses
    import warnings

    from dcedit_kernels.evaluate import measure_edit, without_locality
    from dcedit_kernels.model_editor import ModelEditor
    from test_model_editor import assert_bit_identical, randomize_editors, snapshot

    if method == "ft_kl" and arch in ("bart", "t5"):
        pytest.skip("FT+KL is for causal LMs (ModelEditor refuses a seq2seq model)")
    layers = _MEASURED_LAYERS[arch]
    if method.startswith("ft"):
        kwargs = dict(ft_steps=3, ft_lr=3e-2, **(dict(kl_weight=100.0) if method == "ft_kl" else {}))
    else:
        kwargs = dict(rank=4, edit_lr=0.2, seed=7, **({"n_editors": 2} if method == "raeditor" else {}))
    editor_seed = seed_from(gen)

    def editor():  # the same method, editors and (RaEditor) random split each time
        me = ModelEditor(model, tok, layers, method=method, **kwargs)
        if not method.startswith("ft"):
            randomize_editors(me, torch.Generator().manual_seed(editor_seed))
        return me

    def during(m):
        seen["weights"] = snapshot(m)
        seen["metrics"] = _rows_metrics(m, tok, reqs, base)

    # An edit that moves no score would let scoring the unedited model pass: draw the model and the
    # requests again until the edit moves one (T5's FT moved none in about 1 draw of 30).
    for _ in range(10):
        model, tok = _speaking_any(arch, gen, dtype)
        reqs = _requests_any(model, tok, gen)
        reqs[0] = dataclasses.replace(reqs[0], rephrase=None)
        reqs[1] = dataclasses.replace(reqs[1], locality=None, locality_target=None)
        before = snapshot(model)
        base = [_any_predictions(model, tok, r.locality, r.locality_target)[0] for r in reqs if r.locality]
        unedited = _rows_metrics(model, tok, reqs, base)
        seen = {}
        batch_size = 1 if dtype != torch.float32 else int(torch.randint(1, len(reqs) + 2, (1,), generator=gen))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained-editor and 16-bit rounding warnings
            run = measure_edit(editor(), reqs, batch_size=batch_size, during=during)
        assert_bit_identical(before, model)
        for metric, value in seen["metrics"].items():
            assert run[metric] == pytest.approx(value, rel=1e-12, abs=1e-15), (metric, batch_size)
        if seen["metrics"] != unedited:
            break
    assert seen["metrics"] != unedited  # the edit moved some score: the check has teeth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as above
        me = editor()
        for requests in ([without_locality(reqs)] + ([reqs] if method == "ft_kl" else [])):
            with me.edited(requests):
                own = snapshot(model)
            if requests is reqs:
                assert any(not torch.equal(own[k], v) for k, v in seen["weights"].items())
            else:  # bit for bit the weights measure_edit scored
                assert all(torch.equal(own[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))
                           for k, v in seen["weights"].items())
    changed = {k.rsplit(".", 1)[0] for k, v in before.items() if not torch.equal(v, seen["weights"][k])}
    assert changed == set(layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_is_scored_on_its_own_predictions(dtype, gen):
    """A tiny GPT-2 in bf16/fp16 whose head gives the letters near-tied logits around 1000 (the final
    norm's bias along one direction, the head's letter rows along it plus small noise): its argmax in
    its own dtype often differs from that of the same weights in fp32 (asserted).  Scored one row a batch
    (no padding to move its rounding), target_accuracy, reliability, the locality predictions (with and
    without a target) and DD equal the one-row computation of the 16-bit model, not of an upcast one."""
    import copy
    import dataclasses

    model, tok = tiny_model("gpt2", seed=seed_from(gen))
    hidden = model.config.n_embd
    letters = sorted({i for i in tok(" ".join("abcdefghijklmnopqrstuvwxyz"))["input_ids"]} - set(tok.all_special_ids))
    direction = randn((hidden,), gen)
    direction /= direction.norm()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(0.1)
        model.transformer.ln_f.bias.copy_(4 * direction)
        model.lm_head.weight.zero_()
        noise = randn((len(letters), hidden), gen)
        noise -= (noise @ direction)[:, None] * direction  # no letter ahead by a constant: ties near 1000
        model.lm_head.weight[letters] = 250 * direction + 30 / hidden ** 0.5 * noise
    model = model.to(dtype)
    upcast = copy.deepcopy(model).float()
    reqs = _mixed_requests(model, tok, gen)
    reqs = [dataclasses.replace(r, locality=r.locality or "hello there") for r in reqs]
    rows = [(r.prompt, r.target) for r in reqs] + [(r.locality, r.locality_target) for r in reqs] + \
           [(r.locality, None) for r in reqs]
    own = [_row_predictions(model, tok, p, t)[0] for p, t in rows]
    wider = [_row_predictions(upcast, tok, p, t)[0] for p, t in rows]
    assert any(not torch.equal(a, b) for a, b in zip(own, wider))  # the test tells the two apart
    n = len(reqs)
    accuracy = target_accuracy(model, tok, [r.prompt for r in reqs], [r.target for r in reqs], batch_size=1)
    assert accuracy.tolist() == [_row_accuracy(model, tok, r.prompt, r.target) for r in reqs]
    assert reliability(model, tok, reqs, 1) == pytest.approx(float(accuracy.mean()), rel=1e-12)
    no_target = [dataclasses.replace(r, locality_target=None) for r in reqs]
    for requests, want, wider_want in ((reqs, own[n:2 * n], wider[n:2 * n]), (no_target, own[2 * n:], wider[2 * n:])):
        predicted = locality_predictions(model, tok, requests, batch_size=1)
        assert all(torch.equal(p, w) for p, w in zip(predicted, want))
        assert drawdown(model, tok, requests, predicted, batch_size=1) == 0.0
        changed = sum(float((a != b).any()) for a, b in zip(want, wider_want)) / n
        assert drawdown(model, tok, requests, wider_want, batch_size=1) == pytest.approx(changed, abs=1e-15)


def test_scoring_functions_name_a_model_tokenizer_or_texts_that_are_not_ones(gen):
    """The scoring metrics' model, tokenizer, texts and base predictions, given as something else
    (a model name for the model, None): a ValueError naming the argument, as ModelEditor's.  They
    were AttributeError ("'str' object has no attribute 'modules'") and TypeError ("'NoneType'
    object is not callable", "... is not iterable"), naming nothing (found by an argument sweep)."""
    from test_model_editor import random_requests

    model, tok = tiny_model("llama", seed=seed_from(gen))
    reqs = random_requests(gen, 3)
    base = locality_predictions(model, tok, reqs)
    calls = {
        "reliability": lambda m, t: reliability(m, t, reqs),
        "edit_success": lambda m, t: edit_success(m, t, reqs),
        "neighbourhood_success": lambda m, t: neighbourhood_success(m, t, reqs),
        "locality_predictions": lambda m, t: locality_predictions(m, t, reqs),
        "drawdown": lambda m, t: drawdown(m, t, reqs, base),
        "target_accuracy": lambda m, t: target_accuracy(m, t, ["a b"], ["c"]),
    }
    for name, call in calls.items():
        for bad in ("gpt2", None, 3):
            with pytest.raises(ValueError, match=rf"^model must be a torch.nn.Module, got {type(bad).__name__}"):
                call(bad, tok)
            with pytest.raises(ValueError, match=rf"^tokenizer must be a Hugging Face tokenizer .* got {type(bad).__name__}"):
                call(model, bad)
    for bad in (None, 3):
        with pytest.raises(ValueError, match=rf"^prompts must be a sequence of str, got {type(bad).__name__}"):
            target_accuracy(model, tok, bad, ["c"])
        with pytest.raises(ValueError, match=rf"^targets must be a sequence of str, got {type(bad).__name__}"):
            target_accuracy(model, tok, ["a b"], bad)
        with pytest.raises(ValueError, match=rf"^base_predictions must be a sequence of tensors .* got {type(bad).__name__}"):
            drawdown(model, tok, reqs, bad)
    assert drawdown(model, tok, reqs, tuple(base)) == 0.0


def test_scoring_functions_refuse_an_exact_flag_that_is_not_a_bool(gen):
    """exact was read for its truth: exact="False" scored whole-target matches, silently (found by
    an argument sweep).  Anything but a bool is a ValueError naming it, before any scoring."""
    from dcedit_kernels.metrics import _neighbourhood_success_and_drawdown
    from test_model_editor import random_requests

    model, tok = tiny_model("llama", seed=seed_from(gen))
    reqs = random_requests(gen, 3)
    base = locality_predictions(model, tok, reqs)
    calls = (lambda e: reliability(model, tok, reqs, exact=e), lambda e: edit_success(model, tok, reqs, exact=e),
             lambda e: neighbourhood_success(model, tok, reqs, exact=e),
             lambda e: target_accuracy(model, tok, ["a b"], ["c d"], exact=e),
             lambda e: _neighbourhood_success_and_drawdown(model, tok, reqs, base, exact=e))
    for call in calls:
        for bad in ("False", 1, None, torch.tensor(True)):
            with pytest.raises(ValueError, match=r"^exact must be a bool, got "):
                call(bad)
        call(True), call(False)


def test_a_ctrl_c_while_the_first_scoring_call_switches_to_eval_leaves_nothing_counted(monkeypatch):
    """A Ctrl-C inside `_eval_mode`'s counting block is raised at that block's exit: before the
    `try`, it left the call counted for good (the model in eval mode after it and after every
    later scoring call, and held by the count's modes list)."""
    import os
    import signal

    from dcedit_kernels import metrics

    model, tok = tiny_model("gpt2", seed=0)
    model.train()
    real = metrics.module_modes

    def modes_then_ctrl_c(m):
        out = real(m)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(metrics, "module_modes", modes_then_ctrl_c)
    with ctrl_c_raises():  # whatever SIGINT's handler is here (SIG_IGN in a background job: no raise)
        reliability(model, tok, [EditRequest("ab", "cd")])
    monkeypatch.setattr(metrics, "module_modes", real)
    assert model.training and model not in metrics._EVAL_USERS
    reliability(model, tok, [EditRequest("ab", "cd")])
    assert model.training


@pytest.mark.parametrize("target", ["巴黎", "😀", "\u200b"])
def test_a_seq2seq_target_the_tokenizer_cannot_spell_is_a_value_error(target, gen):
    """T5 spells "巴黎" as ['▁', '<unk>']: scored without its special tokens only the word-start piece
    was left, so any unspellable target scored as that piece (reliability 1 under an edit whose
    model generates "").  Now a ValueError naming the request, as for a target of special tokens."""
    model, tok = tiny_model("t5", seed=seed_from(gen))
    with pytest.raises(ValueError, match=r"^requests\[1\]\.target .* spells none of its characters"):
        reliability(model, tok, [EditRequest("The sky is", "blue"), EditRequest("Say", target)])


def test_a_target_that_writes_the_unknown_tokens_own_text_is_scored():
    """GPT-2's and SmolLM2's unknown token is their "<|endoftext|>" (the eos): a target writing that
    text spells it, as "<|im_end|>" spells its own token, and is scored, not refused as unspellable."""
    model, tok = tiny_model("gpt2", seed=0)
    assert tok.unk_token == "<|endoftext|>"
    for target in ("<|endoftext|>", "\n<|endoftext|>"):
        assert 0.0 <= float(reliability(model, tok, [EditRequest("The sky is", target)])) <= 1.0


def test_scoring_runs_its_passes_without_grad():
    """`_eval_mode` is "eval mode and no grad while scoring": a model whose parameters require
    grad is scored with grad off (no autograd graph held over a batch's activations)."""
    model, tok = tiny_model("gpt2", seed=0)
    assert any(p.requires_grad for p in model.parameters())
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(torch.is_grad_enabled()))
    try:
        reliability(model, tok, [EditRequest("The sky is", "blue")], batch_size=1)
    finally:
        handle.remove()
    assert seen and not any(seen)


def test_a_ctrl_c_right_after_the_switch_to_eval_leaves_nothing_counted():
    """The Ctrl-C lands after the model is entered in the count and switched to eval (in
    model.eval()), not before (the existing test's module_modes): still raised at the counting
    block's exit, so the call is counted and uncounted, and the model trains again."""
    import os
    import signal

    from dcedit_kernels import metrics

    model, tok = tiny_model("gpt2", seed=0)
    model.train()
    real_eval = model.eval

    def eval_then_ctrl_c():
        out = real_eval()
        os.kill(os.getpid(), signal.SIGINT)
        return out

    model.eval = eval_then_ctrl_c
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            reliability(model, tok, [EditRequest("ab", "cd")])
    finally:
        signal.signal(signal.SIGINT, handler)
        del model.eval
    assert model.training and model not in metrics._EVAL_USERS
