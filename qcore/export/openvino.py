"""Running an exported ONNX file in OpenVINO on this CPU (beside ONNX Runtime, ``sessions``).

``openvino_session(path, threads, precision)`` compiles the same file (``openvino.Core().compile_model``)
and returns an object with ONNX Runtime's calling convention (``run(None, feed) -> [outputs]``,
``get_inputs()``), so ``sessions.run_onnx`` and ``bench`` use either runtime unchanged.

Execution precision: OpenVINO's CPU plugin runs the float parts of a model in the precision of its
``INFERENCE_PRECISION_HINT``, whose default on a CPU with AMX / AVX-512 BF16 is **bf16** -- an FP32 file
then does not compute in FP32. ``precision="f32"`` asks for true FP32; ``"default"`` leaves the plugin's
choice. Either way ``session.precision`` is what the compiled model reports it uses, and every number
measured with it should carry that label (``precision_label``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcore.errors import QcoreError

PRECISIONS = ("default", "f32", "bf16")  # INFERENCE_PRECISION_HINT choices offered ("default": the plugin's)


@dataclass(frozen=True)
class _Input:
    name: str
    shape: list


class OpenVinoSession:
    """A compiled OpenVINO model behind ONNX Runtime's ``InferenceSession`` interface (the parts used here).

    precision : the float precision the CPU plugin executes in ("f32" | "bf16" | "f16"), as it reports it
    """

    def __init__(self, compiled):
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).removeprefix("<Type: '").rstrip("'>")
        self.precision = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(self.precision, self.precision)

    def get_inputs(self) -> list[_Input]:
        out = []
        for port in self.compiled.inputs:
            dims = port.get_partial_shape()
            out.append(_Input(port.get_any_name(), [d.get_length() if d.is_static else None for d in dims]))
        return out

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        result = self._request.infer(feed)
        return [np.asarray(result[port]) for port in self.compiled.outputs]


def openvino_session(path: str, threads: int, precision: str = "default") -> OpenVinoSession:
    """``path`` (an .onnx file or an OpenVINO IR .xml) compiled for the CPU with ``threads`` inference threads,
    latency mode, and ``precision`` ("default" | "f32" | "bf16": ``INFERENCE_PRECISION_HINT``)."""
    if precision not in PRECISIONS:
        raise QcoreError(f"unknown OpenVINO precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    try:
        import openvino as ov
    except ImportError:
        raise QcoreError("OpenVINO is not installed; pip install openvino (see requirements.txt), or use "
                         "--runtime onnxruntime") from None
    # DYNAMIC_QUANTIZATION_GROUP_SIZE 0: the CPU plugin would otherwise quantize the activations of
    # MatMuls with compressed weights to int8 on the fly, which the file's recipe does not do
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    return OpenVinoSession(ov.Core().compile_model(path, "CPU", config))


def precision_label(sess) -> str:
    """What a session computes its float ops in, for every number measured with it."""
    if isinstance(sess, OpenVinoSession):
        return f"OpenVINO CPU, float ops in {sess.precision} (INFERENCE_PRECISION_HINT)"
    return "ONNX Runtime CPU, float ops in f32"


def save_ir(onnx_path: str, xml_path: str) -> str:
    """The ONNX file converted to OpenVINO's IR (``xml_path`` and its .bin beside it): what OpenVINO loads
    without converting at every start. Returns ``xml_path``."""
    import openvino as ov

    ov.save_model(ov.convert_model(onnx_path), xml_path, compress_to_fp16=False)
    return xml_path


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__
