"""Tensors only: number formats, granularity, range methods, quantize/dequantize, metrics."""
