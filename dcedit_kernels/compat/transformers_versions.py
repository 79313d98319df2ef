"""What differs between the transformers versions the package supports (4.45 and later).

Measured with transformers 4.57.6 against 5.24 on this package's test suite:
- `from_pretrained` takes the dtype as `dtype` from 4.56 on, as `torch_dtype` before (4.45
  passes an unknown `dtype` on to the config: the model loaded in fp32 whatever was asked);
- 4.x loads a gguf file's Llama tokenizer as a LlamaTokenizerFast that adds a BOS token whatever
  the file's `tokenizer.ggml.add_bos_token` says (SmolLM2's says False; 5.x follows it), so
  every prompt started with `<|im_start|>` and the demo's completions changed.
"""

from __future__ import annotations

from pathlib import Path

import transformers

VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s keyword for the dtype in this version."""
    return {"dtype": dtype} if VERSION >= (4, 56) else {"torch_dtype": dtype}


def gguf_add_bos(path: Path) -> bool | None:
    """The gguf file's `tokenizer.ggml.add_bos_token`, or None when it has none (or `gguf` is
    not installed: transformers needs it to read the file anyway)."""
    try:
        import gguf
    except ImportError:
        return None
    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None or not field.data:
        return None
    return bool(field.parts[field.data[0]][0])


def follow_gguf_bos(tokenizer, path: Path) -> None:
    """Turn off the BOS token a 4.x tokenizer adds where the gguf file says not to add one."""
    if gguf_add_bos(path) is False and getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor
