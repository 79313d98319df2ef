import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when dcedit_kernels imports its
# Triton modules: set it before anything imports them.  Without a GPU the kernels run on CPU
# tensors under the interpreter.
if os.environ.get("DCEDIT_TEST_CUDA", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def gen():
    """A fresh, logged seed per test: inputs are random every run, failures reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
