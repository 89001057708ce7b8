"""The digits zoo models: an MLP and a CNN (with BatchNorm) for scikit-learn's 8x8 digits.

Data: the file ``sklearn.datasets.load_digits`` reads (1,797 images shipped with scikit-learn, pixel values
0..16; read directly, since importing scikit-learn also imports pandas and scipy: seconds of a cold CLI), scaled to [0, 1] and shaped ``(N, 1, 8, 8)``; labels 0..9. One seeded permutation splits
it into train (1,237) / calibration (200) / test (360) -- the same on every machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from qcore.model.workload import Data

WEIGHTS_DIR = Path(__file__).parent / "weights"
SPLIT_SEED = 0
N_TEST, N_CALIB = 360, 200


class DigitsMLP(nn.Module):
    """(N, 1, 8, 8) -> flatten 64 -> 128 -> 64 -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) -> three 3x3 conv+BN+ReLU blocks (16, 32, 64 channels, one 2x2 max-pool),
    global average pool -> 64 -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


ARCHITECTURES = {"digits-mlp": DigitsMLP, "digits-cnn": DigitsCNN}


def digits_table():
    """scikit-learn's ``datasets/data/digits.csv.gz`` as a (1797, 65) float64 array: 64 pixels (row-major
    8x8, 0..16), then the label -- what ``load_digits`` parses, found without importing scikit-learn."""
    import gzip
    import importlib.util

    import numpy as np

    folder = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    with gzip.open(folder / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        return np.loadtxt(f, delimiter=",")


@lru_cache(maxsize=1)
def splits() -> dict[str, Data]:
    """{"train", "calibration", "test"} splits of the digits data (seeded, fixed)."""
    d = digits_table()
    x = torch.tensor(d[:, :-1], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d[:, -1], dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, calib, train = perm[:N_TEST], perm[N_TEST:N_TEST + N_CALIB], perm[N_TEST + N_CALIB:]
    return {name: Data((x[idx],), y[idx]) for name, idx in (("train", train), ("calibration", calib), ("test", test))}


def load_model(name: str) -> nn.Module:
    """The trained zoo model ``name`` from its shipped safetensors file."""
    from safetensors.torch import load_file

    model = ARCHITECTURES[name]()
    model.load_state_dict(load_file(WEIGHTS_DIR / f"{name}.safetensors"))
    return model.eval()
