import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with several intra-op threads, thread hand-off dominates (a 16x32
    matmul took 15 ms instead of 15 us on a 2-core runner). One thread, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
