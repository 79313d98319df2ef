"""Causal LM families beyond the tiny GPT-2 and Llama of the other tests, built as tiny random
models (odd MLP widths, no downloads): the capture, editor training, the fused edit and its undo,
FT+KL and the scored-logits metrics run on each.

Two of them call their MLP in ways the capture once refused:
- OPT flattens its decoder layer's tokens to (rows·L, hidden) before fc1/fc2;
- Falcon adds the attention output to its MLP output in place (`mlp_output += attention_output`),
  which autograd refuses on the leaf that the frozen capture puts in place of that output.
RWKV's KV cache, written in place, broke the backward of an edit below its last block until the
backpropagated forwards ran without it (`tokenize.no_kv_cache`).
"""

import pytest
import torch
import transformers

from helpers import rel_err
from test_model_editor import random_requests
from test_train import lowrank_and_dense_logits

from dcedit_kernels import ModelEditor, TrainConfig, metrics
from dcedit_kernels.capture import compute_factors
from dcedit_kernels.models import tiny_model, tiny_tokenizer
from dcedit_kernels.scored_logits import full_logits
from dcedit_kernels.tokenize import bidirectional_lm, no_kv_cache, tokenize_causal

# (config class, model class, the MLP's output projection of block {}, config arguments)
ARCHS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, "model.layers.{}.mlp.down_proj",
              dict(hidden_size=24, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, "model.layers.{}.mlp.down_proj",
               dict(hidden_size=24, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=6, final_logit_softcapping=30.0)),  # soft-capping after the head
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                 dict(hidden_size=24, intermediate_size=37, num_attention_heads=4)),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM, "model.decoder.layers.{}.fc2",
            dict(hidden_size=24, ffn_dim=37, num_attention_heads=4, word_embed_proj_dim=24, dropout=0.0)),
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM, "model.layers.{}.mlp.fc2",
            dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, partial_rotary_factor=0.5)),
    "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM, "transformer.h.{}.mlp.dense_4h_to_h",
               dict(hidden_size=24, num_attention_heads=4, new_decoder_architecture=False)),
    "gptj": (transformers.GPTJConfig, transformers.GPTJForCausalLM, "transformer.h.{}.mlp.fc_out",
             dict(n_embd=24, n_head=4, rotary_dim=4, n_inner=37)),
    "bloom": (transformers.BloomConfig, transformers.BloomForCausalLM, "transformer.h.{}.mlp.dense_4h_to_h",
              dict(hidden_size=24, n_head=4)),
    # Recurrent: RWKV hands a state from block to block and its KV cache is written in place.
    "rwkv": (transformers.RwkvConfig, transformers.RwkvForCausalLM, "rwkv.blocks.{}.feed_forward.value",
             dict(hidden_size=24, attention_hidden_size=24, intermediate_size=37, context_length=64)),
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM, "backbone.layers.{}.mixer.out_proj",
              dict(hidden_size=24, state_size=4, expand=2, conv_kernel=3)),
}
# Gemma 3n: four AltUp streams from block to block, merged only before the final norm (its
# `hidden_states[-1]` is (streams, B, L, H)); per-layer inputs; block 0's MLP keeps only its
# top activations (activation sparsity, as the real model's first ten blocks).  Not in every
# supported transformers (4.45 has no Gemma 3n).
if hasattr(transformers, "Gemma3nTextConfig"):
    ARCHS["gemma3n"] = (
        transformers.Gemma3nTextConfig, transformers.Gemma3nForCausalLM, "model.layers.{}.mlp.down_proj",
        dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             layer_types=["sliding_attention", "full_attention"], sliding_window=8,
             hidden_size_per_layer_input=8, vocab_size_per_layer_input=354, num_kv_shared_layers=0,
             laurel_rank=4, activation_sparsity_pattern=[0.95, 0.0]))


def build(arch, gen):
    """(model, tokenizer, the two blocks' MLP output layers): float64, eval mode, 2 blocks."""
    config_cls, model_cls, pattern, kwargs = ARCHS[arch]
    tok = tiny_tokenizer("llama")
    layers_key = "n_layer" if arch in ("gptj", "bloom") else "num_hidden_layers"
    config = config_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **{layers_key: 2}, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = model_cls(config)
    return model.double().eval(), tok, [pattern.format(0), pattern.format(1)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_frozen_capture_reproduces_weight_grad(arch, gen):
    """Σ η μᵀ of the frozen capture equals the weights' gradient from a plain backward."""
    model, tok, layers = build(arch, gen)
    # Three random rows are all one length about once in 200 draws (measured over seeds 0-399):
    # draw again then, so the padding this test is about is always there.
    while True:
        reqs = random_requests(gen, 3)
        batch = tokenize_causal(tok, [r.prompt for r in reqs], [r.target for r in reqs])
        if (batch["attention_mask"] == 0).any():
            break
    assert (batch["attention_mask"] == 0).any(), "rows of different lengths must pad"
    factors, loss = compute_factors(model, batch, layers)
    model.zero_grad()
    model(**batch, **no_kv_cache(model)).loss.backward()  # RWKV's cache, written in place, breaks it
    for name in layers:  # nn.Linear (out×in) in every one of these families
        err = rel_err(factors[name].gradient(), model.get_submodule(name).weight.grad)
        assert err < 1e-10, f"{arch} {name}: rel err {err:.3e}"


@pytest.mark.parametrize("key", ["labels", "input_ids", "inputs_embeds"])
def test_flattened_layers_split_a_call_without_a_mask_into_rows(key, gen):
    """A call without an attention mask (no padding: rows of one length) gives one edit per row
    in every captured module, OPT's flattened fc2 (rows·L tokens) as the unflattened lm_head: the
    row layout comes from the call's labels, else its input_ids or inputs_embeds.  OPT's fc2 read
    its rows·L tokens as one edit ([0, 15] for 3 rows of 5 tokens) while lm_head gave [0, 5, 10,
    15]; the summed gradient was right either way."""
    model, tok, layers = build("opt", gen)
    rows, L = int(torch.randint(2, 5, (1,), generator=gen)), int(torch.randint(3, 7, (1,), generator=gen))
    ids = torch.randint(5, len(tok), (rows, L), generator=gen)
    call = {"labels": {"input_ids": ids, "labels": ids}, "input_ids": {"input_ids": ids},
            "inputs_embeds": {"inputs_embeds": model.get_input_embeddings()(ids).detach()}}[key]
    # Without labels a loss of the caller's own.
    loss = {} if key == "labels" else {"loss_fn": lambda out, batch: out.logits.pow(2).mean()}
    names = [layers[0], "lm_head"]
    factors, _ = compute_factors(model, call, names, **loss)
    masked, _ = compute_factors(model, {**call, "attention_mask": torch.ones(rows, L, dtype=torch.long)}, names, **loss)
    for name in names:
        assert factors[name].edit_offsets.tolist() == list(range(0, rows * L + 1, L)), name
        assert torch.equal(factors[name].edit_offsets, masked[name].edit_offsets), name
        assert rel_err(factors[name].gradient(per_edit=True), masked[name].gradient(per_edit=True)) < 1e-12, name


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_train_edit_and_undo(arch, gen):
    """MoEditor trains a step (the edited pass through `lowrank_edited`), edits, scores the same
    with and without the gathered head, and undoes bit for bit; FT+KL with chunked locality
    texts (the reference recomputed through `functional_call`) too."""
    model, tok, layers = build(arch, gen)
    reqs = random_requests(gen, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editors = [ModelEditor(model, tok, layers, method="moeditor", n_editors=2, rank=3, capture_batch_size=2),
               ModelEditor(model, tok, layers, method="ft_kl", ft_steps=2, ft_lr=1e-2, capture_batch_size=2)]
    # lr_lr below edit_lr: Adam's first step moves each α by exactly lr_lr, so at the default (1e-4,
    # = -α's start) an α whose gradient points to 0 lands on 0, and a seed where every α did so
    # (gemma2, seed 2165535070) made an edit that changed nothing (README, "α starts at -edit_lr").
    result = editors[0].fit(reqs[:4], None, TrainConfig(steps=1, batch_size=2, lr_lr=3e-5, progress=False))
    assert result.steps == 1
    for me in editors:
        handle = me.apply(reqs)
        assert any(not torch.equal(before[f"{n}.weight"], me.modules[n].weight) for n in layers)
        es = metrics.edit_success(model, tok, reqs)
        with full_logits():
            assert metrics.edit_success(model, tok, reqs) == es
        handle.undo()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["opt", "falcon"])
def test_lowrank_edited_matches_dense_per_row(arch, gen):
    """The training pass's per-row edited layers on flattened (OPT) and in-place-added (Falcon)
    MLP outputs: each row's logits are those of its own dense shifted weights (float64)."""
    model, _, layers = build(arch, gen)
    for p in model.parameters():
        p.requires_grad_(False)
    got, want, _, _ = lowrank_and_dense_logits(model, {n: model.get_submodule(n) for n in layers}, gen, E=4, B=5)
    assert rel_err(got.detach(), want.detach()) < 1e-10


def moeditor_features(model, tok, layer, gen):
    """(features, batch) of a MoEditor capture over 3 random requests; an apply and undo of them
    leaves every weight as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    me = ModelEditor(model, tok, [layer], method="moeditor", n_editors=2, rank=3)
    reqs = random_requests(gen, 3)
    batch = me.tokenize([r.prompt for r in reqs], [r.target for r in reqs])
    _, feats, _ = me.capture(batch)
    me.apply(reqs).undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return feats, batch


def prompt_means(hidden, batch):
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100)
    return torch.stack([hidden[e][prompt[e]].mean(0) for e in range(hidden.shape[0])])


def last_hidden_means(model, batch):
    """The prompt means of the model's `hidden_states[-1]` over `batch` (no cache, no grad)."""
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True, use_cache=False).hidden_states[-1]
    return prompt_means(hidden, batch)


@pytest.mark.skipif("gemma3n" not in ARCHS, reason="this transformers has no Gemma 3n")
def test_gemma3n_edit_features_are_its_merged_last_state(gen):
    """Gemma 3n's `hidden_states[-1]` is its four AltUp streams; the gate's features are the mean,
    over each prompt, of the merged and normed state its head reads (`last_hidden_state`)."""
    model, tok, layers = build("gemma3n", gen)
    feats, batch = moeditor_features(model, tok, layers[1], gen)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             **no_kv_cache(model)).last_hidden_state
    assert rel_err(feats, prompt_means(hidden, batch)) < 1e-6  # the features are fp32


def test_features_have_the_head_inputs_width(gen):
    """OPT-350m projects its last hidden state to a narrower width before the head (`project_out`):
    the gate's features are of that width (a gate of the config's hidden_size refused them)."""
    tok = tiny_tokenizer("llama")
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=24, ffn_dim=37, num_attention_heads=4,
                                    word_embed_proj_dim=16, num_hidden_layers=2, pad_token_id=tok.pad_token_id,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.OPTForCausalLM(config).double().eval()
    feats, batch = moeditor_features(model, tok, "model.decoder.layers.1.fc2", gen)
    assert feats.shape == (3, 16)
    assert rel_err(feats, last_hidden_means(model, batch)) < 1e-6  # fp32 features


def test_features_of_a_model_with_a_list_of_heads(gen):
    """MusicGen's head is a list of per-codebook heads, never called as one module: the features
    come from `hidden_states[-1]`, as before the head's input was recorded."""
    tok = tiny_tokenizer("llama")
    config = transformers.MusicgenDecoderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=37, num_codebooks=1,
                                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = transformers.MusicgenForCausalLM(config).double().eval()
    feats, batch = moeditor_features(model, tok, "model.decoder.layers.1.fc2", gen)
    assert feats.shape == (3, 32)
    assert rel_err(feats, last_hidden_means(model, batch)) < 1e-6


class RemoteCodeForCausalLM(transformers.LlamaPreTrainedModel):
    """A causal LM of its own class, as a trust_remote_code model is: transformers' causal-LM
    mapping does not list it (nor any class it derives from)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = transformers.LlamaModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).last_hidden_state
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(hidden))


def test_target_tokens_of_a_causal_lm_the_mapping_does_not_list(gen):
    """tokens="target" keeps the positions that predict the target tokens, for a causal LM whose class
    transformers does not list too: the capture once guessed the label shift from the class and kept
    the target tokens' own positions (the LM head's gradient 0.2 off), while the loss was causal."""
    model, tok = tiny_model("llama", seed=int(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float64)
    remote = RemoteCodeForCausalLM(model.config).double().eval()
    remote.load_state_dict(model.state_dict())
    reqs = random_requests(gen, 3)
    me = ModelEditor(remote, tok, ["lm_head"], method="mend", tokens="target")
    batch = me.tokenize([r.prompt for r in reqs], [r.target for r in reqs])
    factors, _, _ = me.capture(batch)
    remote.zero_grad()
    logits = remote(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, gold = torch.log_softmax(logits[:, :-1], -1), batch["labels"][:, 1:]
    scored = gold != -100
    (-(logp.gather(-1, gold.clamp(min=0)[..., None])[..., 0] * scored).sum() / scored.sum()).backward()
    assert rel_err(factors["lm_head"].gradient(), remote.lm_head.weight.grad) < 1e-10


@pytest.mark.parametrize("kind", ["masked_lm", "lm_head_not_decoder", "lm_head_decoder"])
def test_a_model_whose_tokens_see_later_tokens_is_refused(kind, gen):
    """BERT's masked LM, and BertLMHeadModel without is_decoder (what AutoModelForCausalLM, hence
    load_model and the CLI, load from a BERT checkpoint), attend both ways: the causal edit loss read
    the target from the input and every method "edited" them.  ModelEditor refuses them; BertLMHeadModel
    with is_decoder=True is a causal LM and edits."""
    model, tok = tiny_model("bert", seed=int(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float64)
    if kind != "masked_lm":
        config = transformers.BertConfig(**{**model.config.to_dict(), "is_decoder": kind == "lm_head_decoder"})
        model = transformers.BertLMHeadModel(config).double().eval()
    layers = ["bert.encoder.layer.1.output.dense"]
    if kind == "lm_head_decoder":
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ModelEditor(model, tok, layers, method="ft", ft_steps=1).apply(random_requests(gen, 2)).undo()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    for method in ("mend", "ft"):
        with pytest.raises(ValueError, match="model must be a causal or encoder-decoder LM; Bert.*attend to the "
                                             "tokens after them"):
            ModelEditor(model, tok, layers, method=method)


def test_xlm_is_judged_by_its_own_causal_flag(gen):
    """XLMWithLMHeadModel is both transformers' causal and masked LM for "xlm", and its attention is
    causal when config.causal is True (XLM has its own flag; its config has no is_decoder): that model
    passes, and with causal=False bidirectional_lm names config.causal."""
    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=gen)))
    for causal in (True, False):
        config = transformers.XLMConfig(vocab_size=20, emb_dim=8, n_layers=1, n_heads=2, causal=causal)
        why = bidirectional_lm(transformers.XLMWithLMHeadModel(config))
        if causal:
            assert why is None
        else:
            assert why == "XLMWithLMHeadModel has config.causal=False: its tokens attend to the tokens after them"
