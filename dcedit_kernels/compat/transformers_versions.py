"""What differs between the transformers versions the package supports (4.45 and later).

Measured with transformers 4.57.6 and 4.45.2 against 5.24 on this package's test suite:
- `from_pretrained` takes the dtype as `dtype` from 4.56 on, as `torch_dtype` before (4.45
  passes an unknown `dtype` on to the config: the model loaded in fp32 whatever was asked);
- 4.x loads a gguf file's Llama tokenizer as a LlamaTokenizerFast that adds a BOS token whatever
  the file's `tokenizer.ggml.add_bos_token` says (SmolLM2's says False; 5.x follows it), so
  every prompt started with `<|im_start|>` and the demo's completions changed; and, given no
  `legacy` (a gguf file has no tokenizer_config.json), it logs a warning on the first load of a
  process (`gguf_tokenizer_kwargs` says 4.x's default, `legacy=True`);
- 4.45 reads a gguf file without an `output.weight` tensor (SmolLM2's: its head is the token
  embedding) as an untied model and leaves `lm_head.weight` at its random initialisation (later
  versions set `tie_word_embeddings` from the file's tensors).

Left to transformers (seen on 4.45.2 with torch 2.13, not worked around in the package):
- a float64 GPT-2 (sdpa) or BART on a padded batch raises "value cannot be converted to type
  float without overflow" in `AttentionMaskConverter._make_causal_mask`, which fills a float32
  tensor with float64's minimum (the tests patch it: tests/conftest.py; 4.57 no longer calls it);
- before 4.46, Llama's (and Qwen2's, Gemma 2's, Phi's...) forward returns fp32 logits whatever the
  model's dtype, so a float64 model's losses are fp32 roundings;
- before 4.53 (Llama) and 4.54 (GPT-2), a left-padded row's padding positions, which see no real
  key, attend to every position alike under the additive mask (on CPU), so where the last padding
  position is scored (Hugging Face's usual labels on a left-padded batch) every padding position
  gets gradient, and capture's tokens="all" (the real and the scored positions) misses it: rel err
  0.87 of the attention weights' gradient on 4.45.0 (`tokenize` pads on the right: not affected).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from pathlib import Path

import transformers

VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s keyword for the dtype in this version."""
    return {"dtype": dtype} if VERSION >= (4, 56) else {"torch_dtype": dtype}


def _gguf_reader(path: Path):
    """A `gguf.GGUFReader` of the file, or None when `gguf` is not installed (transformers needs
    it to read the file anyway)."""
    try:
        import gguf
    except ImportError:
        return None
    return gguf.GGUFReader(str(path))


def gguf_add_bos(path: Path) -> bool | None:
    """The gguf file's `tokenizer.ggml.add_bos_token`, or None when it has none (or `gguf` is
    not installed)."""
    reader = _gguf_reader(path)
    field = None if reader is None else reader.fields.get("tokenizer.ggml.add_bos_token")
    if field is None or not field.data:
        return None
    return bool(field.parts[field.data[0]][0])


def follow_gguf_bos(tokenizer, path: Path) -> None:
    """Turn off the BOS token a 4.x tokenizer adds where the gguf file says not to add one."""
    if getattr(tokenizer, "add_bos_token", False) and gguf_add_bos(path) is False:  # the file read only then
        tokenizer.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor


def gguf_tokenizer_kwargs() -> dict:
    """`AutoTokenizer.from_pretrained`'s keywords for a gguf file in this version: 4.x's
    LlamaTokenizerFast, given no `legacy` (a gguf file has no tokenizer_config.json to say it), logs
    a warning on every first load ("You are using the default legacy behaviour...", which says a
    gguf load may ignore it) and takes `legacy=True`; said outright, the same tokenizer comes
    without the message.  5.x's tokenizers do not ask."""
    return {"legacy": True} if VERSION < (5, 0) else {}


def gguf_ties_head(path: Path) -> bool:
    """True when the gguf file has no `output.weight` tensor: the LM head is the token embedding
    (False without `gguf`, as `gguf_add_bos`)."""
    reader = _gguf_reader(path)
    return reader is not None and all(tensor.name != "output.weight" for tensor in reader.tensors)


def gguf_model_kwargs(path: Path) -> dict:
    """`from_pretrained`'s config overrides for the gguf file in this version: 4.x ties the head
    where the file has no `output.weight` (5.x reads it so itself); and a dense model wherever
    transformers could keep the weights packed (`_gguf_dense`)."""
    kwargs = {"tie_word_embeddings": True} if VERSION < (5, 0) and gguf_ties_head(path) else {}
    dense = _gguf_dense()
    if dense is not None:
        kwargs["quantization_config"] = dense
    return kwargs


def _gguf_dense():
    """`GgufConfig(dequantize=True)` where transformers has it (5.17 and 5.25 do), else None.

    Those versions load a quantized gguf file with its weights left packed in GGUF blocks, computed
    by a matmul kernel from the hub (the `kernels` package), wherever one is published for the
    device; only without one do they de-quantize.  Packed layers hold no dense weight to edit, so
    which model a user got would depend on the machine.  Asked for, the dense model comes
    everywhere, with the weights the fallback gives (SmolLM2, bf16, CPU, transformers 5.25: every
    tensor torch.equal), without the fallback's GGUF quantizer on the model and without its warning
    that a packed bf16 load is slower than fp32."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return None
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return None
    return GgufConfig(dequantize=True)


_GGUF_PATCH = threading.Lock()
_GGUF_PATCHED_HERE = threading.local()  # `.open`: this thread's block is open (a nested block shares it)


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, each gguf file is parsed once and gguf's tensor-name maps are built once.

    transformers 5.24 parses the file three times to load one model (the tokenizer, the config,
    the weights), and builds gguf's TensorNameMap again for every submodule (397 times for
    SmolLM2).  Measured on SmolLM2-135M (2 cores, gguf 0.19), load_model in fresh processes with
    transformers imported first, 3 alternating pairs: 16.6-18.0 s, 6.6-7.4 s with this; the same
    weights (torch.equal).  It swaps `gguf.GGUFReader` and `gguf.get_tensor_name_map` for
    memoised ones (transformers imports both inside its functions, so it finds them), under a
    lock (two threads loading would otherwise restore each other's swap); a version that reads
    them otherwise is simply not sped up.  A block inside a block of the same thread (load_model
    inside a caller's block) shares the outer one's memos and swap; it waited on the outer block's
    lock for ever before.  A file replaced within the block is parsed anew (its reader is keyed by the
    file's inode, size and mtime as well as its path).
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    if getattr(_GGUF_PATCHED_HERE, "open", False):  # this thread's block is open: its swap serves
        yield
        return
    with _GGUF_PATCH:
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers = {}

        def reader(path, mode="r"):  # a reader only reads its memory map: one can serve every caller
            # The file's identity too: a caller's block around two load_model calls, the file replaced
            # between them, read the first file's memory map for the second (stale flags and weights).
            try:
                stat = os.stat(path)
            except OSError:  # the real reader says what is wrong with the path
                return real_reader(path, mode)
            key = (os.fspath(path), mode, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if key not in readers:
                readers[key] = real_reader(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
        _GGUF_PATCHED_HERE.open = True
        try:
            yield
        finally:
            _GGUF_PATCHED_HERE.open = False
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
