"""qcore: the Quantization Explorer engine (formats, ranges, recipes, simulation, metrics)."""

from qcore.errors import QcoreError
from qcore.numerics.formats import FORMATS
from qcore.numerics.quantize import QuantizedTensor, fake_quantize, quantize
from qcore.recipe import PRESETS, Recipe, load_recipe, preset
from qcore.numerics.spec import TensorSpec

__all__ = ["FORMATS", "PRESETS", "QcoreError", "QuantizedTensor", "Recipe", "TensorSpec",
           "fake_quantize", "load_recipe", "preset", "quantize"]
