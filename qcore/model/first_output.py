"""``FirstOutput``: a model that returns several tensors, seen as one that returns its first.

Uploaded programs (a face detector's boxes and scores, say) may return a tuple; the engine scores,
sweeps and exports one output. The wrapper shares the wrapped model's children, parameters and buffers
(the same dicts), so every layer keeps its name (``conv1``, not ``inner.conv1``) and a module swapped
into the wrapper (BatchNorm folding, recurrent cells) is the one the wrapped model runs.
"""

from __future__ import annotations

import torch
from torch import nn


class FirstOutput(nn.Module):
    def __init__(self, inner: nn.Module, outputs: int):
        super().__init__()
        self.__dict__["inner"] = inner  # not a child: its children are ours (below)
        self._modules, self._parameters, self._buffers = inner._modules, inner._parameters, inner._buffers
        self.outputs = outputs  # how many the wrapped model returns

    def forward(self, *args):
        out = self.inner(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    def train(self, mode: bool = True):
        self.inner.train(mode)
        return super().train(mode)


def single_output(model: nn.Module, inputs: tuple) -> tuple[nn.Module, str | None]:
    """``(model, None)`` if ``model(*inputs)`` is one tensor (or fails: the caller reports that), else
    ``(FirstOutput(model), note)`` when it returns a tuple or list of tensors."""
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception:
        return model, None
    if isinstance(out, (tuple, list)) and len(out) > 1 and all(isinstance(o, torch.Tensor) for o in out):
        shapes = ", ".join(str(tuple(o.shape[1:])) for o in out)
        return FirstOutput(model, len(out)), (f"the model returns {len(out)} outputs (per sample {shapes}); the first "
                                              "is scored, swept and exported")
    return model, None
