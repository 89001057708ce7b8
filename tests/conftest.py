import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)
settings.register_profile("qcore", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("qcore")


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (restored after): many tiny forwards (token-by-token decoding,
    training steps) are dominated by OpenMP threads waiting for each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_mlp():
    from qcore import zoo

    return zoo.load("digits-mlp")


@pytest.fixture(scope="session")
def digits_cnn():
    from qcore import zoo

    return zoo.load("digits-cnn")


@pytest.fixture(scope="session")
def minilm():
    from qcore import zoo

    return zoo.load("minilm-l6")


@pytest.fixture(scope="session")
def tiny_lm():
    from qcore import zoo

    return zoo.load("tiny-lm")
