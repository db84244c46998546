import logging

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster on small runners, and it makes the tests'
    float arithmetic independent of the machine's core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def server_logs(caplog):
    """Capture every record of the server's loggers (DEBUG and up)."""
    caplog.set_level(logging.DEBUG, logger="fedsmm")
    return caplog
