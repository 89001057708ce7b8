"""PTQ algorithms beyond round-to-nearest, as pure tensor math (imports only ``numerics`` and ``errors``).

Weight rounding -- each takes a weight ``(out, in)`` (a Conv weight flattened to ``(C_out, C_in*kh*kw)``), what
the layer saw on calibration data (a Hessian ``X^T X`` or input rows ``X``) and a ``TensorSpec``, and returns a
``QuantizedTensor`` in exactly the layout ``numerics.quantize.quantize(weight, spec)`` returns (same blocks,
scales, zero-points), so every exporter writes it unchanged; collecting the data is ``qcore.model.rounding``'s job:

- ``gptq``     : GPTQ (Frantar et al. 2022), Hessian-based sequential rounding with error feedback;
- ``adaround`` : AdaRound (Nagel et al. 2020), learned up/down rounding of each weight.
- ``clip``     : the clipping range of each group searched on the layer's output error (AWQ's clip search),
                 the grid GPTQ rounds onto with ``"gptq": {"clip": 20}``.

Model-level transforms -- per-channel scales and bias shifts computed from statistics; finding where they fold
and applying them is ``qcore.model.transforms``' job:

- ``smoothquant``     : SmoothQuant (Xiao et al. 2023), migrating activation outliers into the weights;
- ``awq``             : AWQ (Lin et al. 2024), activation-aware per-channel weight scaling;
- ``cle``             : cross-layer equalization (Nagel et al. 2019);
- ``bias_correction`` : empirical bias correction (Nagel et al. 2019).
"""
