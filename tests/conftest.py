"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's models are tiny: one intra-op thread is faster than two contended ones on a small CI
    machine, and makes the timings in tests/benchmarks comparable between runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
