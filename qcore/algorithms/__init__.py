"""PTQ algorithms: pure tensor math that chooses better quantized weights than rounding to nearest.

- ``gptq``     : GPTQ (Frantar et al. 2022), Hessian-based sequential rounding with error feedback;
- ``adaround`` : AdaRound (Nagel et al. 2020), learned up/down rounding of each weight.

Each takes a weight ``(out, in)`` (a Conv weight flattened to ``(C_out, C_in*kh*kw)``), what the layer
saw on calibration data (a Hessian ``X^T X`` or input rows ``X``) and a ``TensorSpec``, and returns a
``QuantizedTensor`` in exactly the layout ``numerics.quantize.quantize(weight, spec)`` returns (same
blocks, scales, zero-points), so every exporter writes it unchanged. They import only ``numerics``
and ``errors``; collecting the data from a model is ``qcore.model.rounding``'s job.
"""
