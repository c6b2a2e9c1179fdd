"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny problems: intra-op threads only add contention on a loaded machine. One thread for the module, restored
    after it (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
