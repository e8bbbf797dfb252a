"""Evaluation tests run torch on one thread: their ops are tiny, and on a shared 2-core machine
two OpenMP threads per op cost 3-20x more than one. `fake_data` swaps in the synthetic data."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_data(monkeypatch):
    """Evaluation reads eval_fakes' synthetic datasets (see `eval_fakes.use_fake_data`)."""
    import eval_fakes

    eval_fakes.use_fake_data(monkeypatch)
