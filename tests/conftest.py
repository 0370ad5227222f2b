"""Shared test setup: GPU tests skip themselves without CUDA (and Triton runs interpreted); every test starts
from a fixed seed.

Tests run single-threaded: their tensors are small, and on a shared 2-core machine extra intra-op
threads only contend (OpenMP spin-waits made a 4 s fit take minutes under load).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastflow import set_num_threads  # noqa: E402

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
