"""Registers the `slow` marker and leaves slow tests out unless selected with `-m slow` or FASTFLOW_SLOW=1."""

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long statistical validation, left out of the default run")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("FASTFLOW_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or FASTFLOW_SLOW=1")
    for item in items:
        if "slow" in item.keywords and HERE in Path(item.fspath).parents:
            item.add_marker(skip)
