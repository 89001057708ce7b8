"""torch.export programs: untrusted archives are screened before loading, and unflattened programs get
their Conv/BatchNorm/Sequential types back so they fold and quantize like the source model."""

import json
import warnings
import zipfile

import pytest
import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.io.pt2 import load
from qcore.simulate import find_layers, fold_batchnorm


class Residual(nn.Module):
    """Not a chain (the input is used twice): must stay a graph module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Sequential(nn.Conv2d(8, 8, 3, groups=4, padding=1, bias=False), nn.BatchNorm2d(8)))
        self.block = Residual()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return net, path


def test_restored_types_fold_and_compute_like_the_source(program):
    net, path = program
    _, module = load(path, allow_pickle=False)
    types = {n: type(m).__name__ for n, m in module.named_modules()}
    assert [types[n] for n in ("stem", "stem.0", "stem.1", "stem.3", "stem.3.0", "stem.3.1")] == \
        ["Sequential", "Conv2d", "BatchNorm2d", "Sequential", "Conv2d", "BatchNorm2d"]
    assert types["block"] == "InterpreterModule" and types["block.conv"] == "Conv2d"
    conv = module.get_submodule("stem.3.0")
    assert (conv.groups, conv.bias, conv.padding) == (4, None, (1, 1))
    assert module.get_submodule("stem.0").stride == (2, 2)
    assert list(find_layers(module)) == ["stem.0", "stem.3.0", "block.conv", "head"]
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(module(x), expected, rtol=0, atol=1e-5)
        assert fold_batchnorm(module) == [("stem.0", "stem.1"), ("stem.3.0", "stem.3.1")]
        assert torch.allclose(module(x), expected, rtol=0, atol=1e-4)


def _archive(path, program: dict, extra: dict | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/archive_format", "pt2")
        zf.writestr("evil/models/model.json", json.dumps(program))
        for name, data in (extra or {}).items():
            zf.writestr(f"evil/{name}", data)
    return path


@pytest.mark.parametrize("program, extra, message", [
    ({"graph": {"nodes": [{"target": "builtins.exec", "inputs": [], "outputs": []}]}}, None, "calls 'builtins.exec'"),
    ({"graph": {"nodes": [{"target": "torch.ops.aten.add.Tensor", "inputs": [], "outputs": []}]},
      "range_constraints": {"s0": {"expr_str": "__import__('os').system('touch x')"}}}, None,
     "has a symbolic shape expression that is not plain arithmetic"),
    ({}, {"data/weights/model_weights_config.json": json.dumps({"config": {"w": {"use_pickle": True}}})},
     "stores 'w' as a pickled object"),
    ({}, {"data/aotinductor/model.so": b"\x7fELF"}, "contains compiled AOTInductor code"),
    ({"guards_code": "import os"}, None, "contains guard code"),
])
def test_untrusted_archives_are_refused_before_loading(tmp_path, program, extra, message):
    with pytest.raises(QcoreError, match=message) as e:
        load(_archive(tmp_path / "evil.pt2", program, extra), allow_pickle=False)
    assert "--trust-pickle" in str(e.value) and "\n" not in str(e.value)
