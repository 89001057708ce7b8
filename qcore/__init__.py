"""qcore: the Quantization Explorer engine (formats, ranges, recipes, simulation, metrics)."""

from .errors import QcoreError
from .formats import FORMATS
from .quantize import QuantizedTensor, fake_quantize, quantize
from .recipe import PRESETS, Recipe, TensorSpec, load_recipe, preset

__all__ = ["FORMATS", "PRESETS", "QcoreError", "QuantizedTensor", "Recipe", "TensorSpec",
           "fake_quantize", "load_recipe", "preset", "quantize"]
