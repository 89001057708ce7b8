import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)
settings.register_profile("qcore", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("qcore")


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
