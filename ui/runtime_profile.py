"""The Export page's "Why isn't it faster?" section: export the recipe to a temporary ONNX file and profile it
in the chosen runtime (``qcore.export.profile``), on the first 8 evaluation samples, 1 thread."""

import tempfile
from pathlib import Path

from qcore.export import export_qdq
from qcore.export.profile import openvino_profile, ort_profile
from qcore.export.sessions import feed

RUNTIMES = {"ONNX Runtime": ort_profile, "OpenVINO (its default precision)": openvino_profile}
CAPTION = ("Measured on this machine by the runtime's own profiler (ONNX Runtime: enable_profiling; OpenVINO: "
           "PERF_COUNT), ms per run at batch 8 on 1 thread, per op type of the graph the runtime executes. Only the "
           "int8 bars run in integer kernels; everything else computes in float (or moves data), whatever the recipe, "
           "and is what quantization cannot speed up. Why each layer runs as it does is in the export's layer list.")


def profile(w, recipe, runtime: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        export_qdq(w, recipe, path)
        return RUNTIMES[runtime](path, feed(w, w.evaluation.subset(slice(0, 8))), 1, 10)
