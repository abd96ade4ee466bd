import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two intra-op threads on a shared 2-core machine oversubscribe it (10x slower); results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
