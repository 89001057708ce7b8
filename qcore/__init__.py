"""qcore: the Quantization Explorer engine. The app (``app.py``, ``pages/``, ``ui/``) and the CLI only call it.

Packages, in the order a reader learns quantization from them:

- ``numerics``  tensors only: number formats and their traits, granularity (how a tensor is cut into
                blocks), range methods (where the clip goes), ``TensorSpec``, quantize/dequantize, metrics;
- ``algorithms`` PTQ algorithms as pure tensor math: GPTQ and AdaRound weight rounding; SmoothQuant, AWQ, CLE
  and bias correction;
- ``recipe``    the JSON that says how every layer is quantized: presets, validation, resolution to one
                plan per layer, links and the Mixed precision table;
- ``model``     a model under a recipe: layers and BatchNorm folding, hooks, calibration, simulation,
                sizes in bytes, ``Workload``;
- ``io``        untrusted files in (model loaders by extension, ONNX/.pt2 readers, data, the sandbox);
- ``analysis``  what to choose: explanations, summaries, the sensitivity sweep, search, rooflines;
- ``export``    files and runtimes out: ONNX and safetensors exports, ONNX Runtime benchmarks;
- ``figures``   Plotly figures: plain data in, a figure out;
- ``jobs``      heavy work (sweeps, searches, evaluations) as background jobs: in-process or RQ workers;
- top level     ``errors``, ``limits`` (bounds on untrusted input), ``hardware`` (this CPU, reference
                profiles), ``zoo`` (built-in models), ``report``, ``cli``.

Dependency rules (``tests/test_architecture.py`` checks them): ``numerics`` imports nothing of qcore
but ``errors``; ``algorithms`` only ``numerics`` and ``errors``; ``recipe`` only ``numerics``; ``model`` only
``numerics``, ``recipe`` and ``algorithms``; ``io``,
``analysis`` and ``export`` build on those (and the top-level ``errors``/``limits``/``hardware``) and
never import each other; ``jobs`` sits above them (it runs their functions) and nothing below imports
it; ``figures`` import nothing of qcore; nothing in qcore imports Streamlit.
"""

from qcore.errors import QcoreError
from qcore.numerics.formats import FORMATS
from qcore.numerics.quantize import QuantizedTensor, fake_quantize, quantize
from qcore.recipe import PRESETS, Recipe, load_recipe, preset
from qcore.numerics.spec import TensorSpec

__all__ = ["FORMATS", "PRESETS", "QcoreError", "QuantizedTensor", "Recipe", "TensorSpec",
           "fake_quantize", "load_recipe", "preset", "quantize"]
