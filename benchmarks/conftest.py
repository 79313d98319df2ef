import os

import pytest
import torch

from measure import describe_device, measure_device_ceilings

DEVICE = os.environ.get("DCEDIT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.startswith("cuda")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def ceilings():
    """Copy bandwidth and matmul rate measured in this run: the roofline of every case."""
    bw, flops = measure_device_ceilings(DEVICE)
    return {"device": describe_device(DEVICE), "copy_GBps": bw / 1e9, "matmul_TFLOPs": flops / 1e12}
