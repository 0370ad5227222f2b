"""Shared test setup: GPU tests skip themselves without CUDA; every test starts from a fixed seed.

Tests run single-threaded: their tensors are small, and on a shared 2-core machine extra intra-op
threads only contend (OpenMP spin-waits made a 4 s fit take minutes under load).
"""

import pytest
import torch

from fastflow import set_num_threads

set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
