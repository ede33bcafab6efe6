"""Fixtures of the integration tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; restored after the test (not set at import: that made
    the whole suite single-threaded). Modules opt in with pytestmark."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
