"""torch.export programs: untrusted archives are screened before loading, and unflattened programs get
their Conv/BatchNorm/Sequential types back so they fold and quantize like the source model."""

import json
import warnings
import zipfile

import pytest
import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.io.pt2.file import load
from qcore.model.simulate import find_layers, fold_batchnorm


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


def _edited(src, dst, edit):
    """``dst``: the archive ``src`` with ``edit(program, files)`` applied (program: models/model.json parsed;
    files: {path below the archive root: bytes})."""
    with zipfile.ZipFile(src) as zf:
        root = zf.namelist()[0].split("/")[0] + "/"
        files = {n[len(root):]: zf.read(n) for n in zf.namelist()}
    program = json.loads(files["models/model.json"])
    edit(program, files)
    files["models/model.json"] = json.dumps(program).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in files.items():
            zf.writestr(root + name, data)
    return dst


def _call_exec(program, files):
    program["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.exec"


def _eval_in_shape(program, files):
    size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
    size["as_expr"]["expr_str"] = "__import__('os').system('touch x')"


def _pickled_weight(program, files):
    config = json.loads(files["data/weights/model_weights_config.json"])
    config["config"]["head.bias"]["use_pickle"] = True
    files["data/weights/model_weights_config.json"] = json.dumps(config).encode()


def _compiled_code(program, files):
    files["data/aotinductor/model/model.so"] = b"\x7fELF"


@pytest.mark.parametrize("edit, message", [
    (_call_exec, "calls 'builtins.exec'"),
    (_eval_in_shape, "has a symbolic shape expression that is not plain arithmetic"),
    (_pickled_weight, "stores 'head.bias' as a pickled object"),
    (_compiled_code, r"contains compiled code \(AOTInductor\)"),
])
def test_untrusted_archives_are_refused_before_loading(program, tmp_path, edit, message):
    with pytest.raises(QcoreError, match=message) as e:
        load(_edited(program[1], tmp_path / "evil.pt2", edit), allow_pickle=False)
    assert "--trust-pickle" in str(e.value) and "\n" not in str(e.value)


def test_guard_code_is_dropped_not_run(program, tmp_path):
    """torch never gets guard code from an untrusted archive (the loader checks input shapes itself)."""
    def edit(prog, files):
        prog["guards_code"] = ["__import__('os').system('touch never')"]
    ep, module = load(_edited(program[1], tmp_path / "guarded.pt2", edit), allow_pickle=False)
    assert ep._guards_code == [] and tuple(module(torch.randn(3, 3, 8, 8)).shape) == (3, 5)


def test_the_raw_tensor_dtype_codes_are_torchs():
    """The screen's own dtype table (it avoids importing torch's serializer before screening) agrees with it."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE, _SERIALIZE_TO_TORCH_LAYOUT

    from qcore.io.pt2.archive import DTYPES, STRIDED

    assert all(_SERIALIZE_TO_TORCH_DTYPE[code] == dtype for code, dtype in DTYPES.items())
    assert _SERIALIZE_TO_TORCH_LAYOUT[STRIDED] == torch.strided
