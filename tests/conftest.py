import os
import random
import uuid
import warnings

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when dcedit_kernels imports its
# Triton modules: set it before anything imports them.  Without a GPU the kernels run on CPU
# tensors under the interpreter.
if os.environ.get("DCEDIT_TEST_CUDA", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The devices a test taking `device` runs on: the CPU and, where one is present, CUDA; under
# DCEDIT_TEST_CUDA=1 (benchmarks/run_gpu.sh, on the lent GPU machine) CUDA alone: the CPU copies
# run in CI, and the GPU machine's few minutes are its CUDA tests'.
if os.environ.get("DCEDIT_TEST_CUDA", "0") == "1" and torch.cuda.is_available():
    DEVICES = ["cuda"]
else:
    DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def test_seed():
    """A fresh, logged seed per test: inputs are random every run, failures reproducible
    (DCEDIT_TEST_SEED=<the logged seed> runs a test on the same draw again).  It also seeds torch's
    global generator, so that a test drawing from it (an unseeded editor's initial weights, say)
    repeats too: before, only tests taking `gen` did, and the others drew what the tests run
    before them had left."""
    seed = int(os.environ.get("DCEDIT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    # Another stream than `gen`'s: a tensor drawn from each must not come out equal.
    torch.manual_seed(seed ^ 0x9E3779B97F4A7C15)
    # And Python's: test_demo's tests draw model seeds and counts from `random`, which nothing seeded,
    # so the logged seed did not replay them, and each test drew where the tests before it had left off.
    random.seed(seed)
    return seed


@pytest.fixture(autouse=True)
def editor_cache_of_its_own(monkeypatch, tmp_path_factory):
    """Each test's trained editors go to a cache folder of its own ($DCEDIT_CACHE_DIR; a test that
    sets the variable keeps its own).  report.py --no-cache only skips loading: it still caches the
    editors it trains, and test_report's whole reports on the tiny Llama wrote them into the user's
    ~/.cache/dcedit_kernels, a file pair for each editor on every run."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "editor_cache" / uuid.uuid4().hex))


@pytest.fixture
def gen(test_seed):
    """A generator seeded with the test's seed (`test_seed`)."""
    return torch.Generator().manual_seed(test_seed)


def _float64_causal_mask_in_float64():
    """transformers 4.45 builds GPT-2's (sdpa) and BART's causal masks in
    `AttentionMaskConverter._make_causal_mask` as `torch.full(shape, finfo(dtype).min)` in the
    default dtype (float32), cast to `dtype` after; torch 2.13 refuses float64's minimum in float32
    ("value cannot be converted to type float without overflow"), so every padded forward of a
    float64 model of those families raised (4.57's GPT-2 and BART no longer call it).  Where that
    helper raises, it runs with float64 as the default dtype for a float64 mask: the mask
    transformers means to build, the other dtypes untouched."""
    try:
        from transformers.modeling_attn_mask_utils import AttentionMaskConverter
    except ImportError:  # a transformers without the module (its removal is announced for 5.x)
        return
    make = AttentionMaskConverter._make_causal_mask
    # transformers 5 deprecates the helper with a FutureWarning on each call: the probe is ours, not a
    # test's, and must not fail `pytest -W error::FutureWarning` as it loads this file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            make((1, 2), torch.float64, torch.device("cpu"))
            return
        except RuntimeError:
            pass

    def in_float64(input_ids_shape, dtype, *args, **kwargs):
        if dtype != torch.float64:
            return make(input_ids_shape, dtype, *args, **kwargs)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return make(input_ids_shape, dtype, *args, **kwargs)
        finally:
            torch.set_default_dtype(previous)

    AttentionMaskConverter._make_causal_mask = staticmethod(in_float64)


_float64_causal_mask_in_float64()
