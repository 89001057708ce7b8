"""``export(workload, recipe, "onnx" | "safetensors", out) -> ExportReport``: write the file, then measure it.

The file's size on disk next to the recipe's theoretical size, the task metrics measured by running the
file in ONNX Runtime on the evaluation data next to the simulated ones, how each layer executes, and one
line per gap between them (``differences``, explained by ``policy``).

ONNX: ``export_qdq`` writes the simulated model itself (the engine's codes, scales, zero-points and
calibrated input ranges; no other tool re-quantizes anything). Every recipe the engine accepts exports;
a layer ONNX Runtime cannot execute in low precision runs in float on the exact dequantized values, and
its row says so and why.
safetensors: ``quantized_safetensors`` (codes, scales, zero-points, static input ranges and the recipe);
``qcore.export.safetensors.load_safetensors`` rebuilds the identical simulated model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qcore.errors import QcoreError
from qcore.export.onnx import export_qdq
from qcore.export.policy import SIZE_TOLERANCE, metric_differences, size_differences
from qcore.export.safetensors import export_safetensors
from qcore.export.sessions import run_onnx, session
from qcore.hardware import cpu_features
from qcore.recipe import Recipe, preset


@dataclass
class ExportReport:
    """What ``export`` wrote; every number says where it comes from.

    path, format                : the file, "onnx" | "safetensors"
    file_size_bytes             : the file on disk (os.path.getsize)
    theoretical_size_bytes      : the recipe's size (``workload.size``): codes at their bit width + scales +
                                  zero-points + every other tensor in float
    fp32_theoretical_size_bytes : the FP32 model's parameters and buffers
    fp32_file_size_bytes        : the FP32 model written by the same ONNX exporter (onnx only, else None)
    metric                      : the task's headline metric
    metrics                     : {"onnxruntime": task metrics of the file run in ONNX Runtime on the evaluation
                                  data (onnx only), "simulated": task metrics of ``workload.simulate(recipe)``,
                                  "openvino": the same file run in OpenVINO when asked for (``runtime``)}
    layers                      : per quantizable layer {layer, kind, weights, activations, executes, reason,
                                  stored_bytes, theoretical_bytes} (onnx only)
    differences                 : one line per gap: where the bytes go when the file is more than 10 % off the
                                  theoretical size (the sizes and the gap are ``summary_lines``' first line),
                                  ONNX Runtime vs simulated headline metric beyond one evaluation sample
    notes                       : other remarks (layers running in float, CPU caveats)
    """

    path: str
    format: str
    file_size_bytes: int
    theoretical_size_bytes: int
    fp32_theoretical_size_bytes: int
    fp32_file_size_bytes: int | None
    metric: str
    metrics: dict
    layers: list[dict] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """What the file is, each number labelled (the Export page and ``export`` print exactly these lines)."""
        return summary_lines(self.to_dict())


def summary_lines(report: dict) -> list[str]:
    """``ExportReport.to_dict()`` -> labelled lines: file on disk vs theoretical size (the only statement of
    either, with the relative gap), the headline metric of the file run in ONNX Runtime vs the simulation, why
    they differ, which layers run in float in ONNX Runtime."""
    headline = report["metric"]
    file_b, theory_b = report["file_size_bytes"], report["theoretical_size_bytes"]
    lines = [f"file on disk: {file_b:,} bytes ({file_b / theory_b - 1:+.0%} against the theoretical size {theory_b:,} "
             f"bytes; FP32 {report['fp32_theoretical_size_bytes']:,} bytes)"]
    measured, simulated = report["metrics"].get("onnxruntime"), report["metrics"].get("simulated", {})
    if measured and headline in measured:
        lines.append(f"{headline}: {measured[headline]:.4f} measured by running this file in ONNX Runtime on the "
                     f"evaluation data; {simulated.get(headline, float('nan')):.4f} simulated")
    elif headline in simulated:
        lines.append(f"{headline}: {simulated[headline]:.4f} simulated (this format is not run by a runtime here)")
    if headline in report["metrics"].get("openvino", {}):
        lines.append(f"{headline}: {report['metrics']['openvino'][headline]:.4f} measured by running this file in "
                     "OpenVINO on the evaluation data (its precision is in the notes)")
    lines += list(report.get("differences", [])) + list(report.get("notes", []))
    by_reason: dict[str, list[str]] = {}  # one line per reason, naming every layer it applies to
    for r in report.get("layers", []):
        if r.get("executes") == "float (dequantized)":
            by_reason.setdefault(r["reason"], []).append(r["layer"])
    lines += [f"{', '.join(names)} run{'s' if len(names) == 1 else ''} in float in ONNX Runtime: {reason}"
              for reason, names in by_reason.items()]
    return lines


@contextlib.contextmanager
def _onnx_exportable(workload):
    """ONNX export of the user's model: a TorchScript model cannot be traced by the exporter, and an uploaded
    model the exporter cannot convert (an operator without an ONNX function) is the model's problem, not a
    bug: either is one QcoreError line (CLI and app alike). A zoo model failing stays a traceback."""
    from torch.onnx import OnnxExporterError

    if workload.source == "torchscript":
        raise QcoreError(f"{workload.name} is a TorchScript model, which the ONNX exporter cannot trace, so an ONNX "
                         "export (or bench, which runs one) is not possible; export safetensors instead, or save the "
                         "model with torch.export.save (.pt2)")
    try:
        yield
    except OnnxExporterError as e:
        if workload.source == "zoo":
            raise
        cause = e
        while cause.__cause__ is not None:  # the exporter wraps the operator it could not convert
            cause = cause.__cause__
        text = str(cause).strip().splitlines()
        reason = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {text[0][:200]}" if text else type(cause).__name__)
        raise QcoreError(f"{workload.name} could not be converted to ONNX ({reason}), so an ONNX export (or bench, "
                         "which runs one) is not possible; replace that operator in the model, or export safetensors "
                         "instead") from None


def export(workload, recipe: Recipe, fmt: str, out: str, runtime: str = "onnxruntime",
           precision: str = "default") -> ExportReport:
    """Write ``workload``'s model under ``recipe`` to ``out`` as ``fmt`` and measure the file (see the
    module docstring and ``ExportReport``). ``fmt`` "openvino": the ONNX file converted to OpenVINO's IR
    (``out`` ends in .xml, the weights go to the .bin beside it), measured as the ONNX file it came from.
    ``runtime`` "openvino" also runs the file in OpenVINO (``precision``: its INFERENCE_PRECISION_HINT)."""
    if fmt not in ("onnx", "safetensors", "openvino"):
        raise QcoreError(f"unknown export format {fmt!r}; use onnx, safetensors or openvino")
    if fmt == "openvino":
        if not str(out).endswith(".xml"):
            raise QcoreError(f"an OpenVINO IR is an .xml file (its weights go to the .bin beside it); got --out {out}")
        from qcore.export.openvino import save_ir

        onnx_out = str(out)[:-len(".xml")] + ".onnx"
        report = export(workload, recipe, "onnx", onnx_out, runtime, precision)
        save_ir(onnx_out, str(out))
        os.remove(onnx_out)
        bin_bytes = os.path.getsize(str(out)[:-len(".xml")] + ".bin")
        report.notes.append(f"OpenVINO IR: {out} ({os.path.getsize(out):,} bytes) + its .bin ({bin_bytes:,} bytes); "
                            "sizes and metrics above are of the ONNX file it was converted from")
        report.path, report.format = str(out), fmt
        return report
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise QcoreError(f"the directory {parent} does not exist; create it or choose another --out")
    out = str(out)
    kv_notes = [] if recipe.kv_cache is None else [
        f"the recipe's KV-cache quantization ({recipe.kv_cache.format}, {recipe.kv_cache.granularity}) is simulated only: "
        "the file's attention keeps keys and values in float, so the file, its size and both metrics here are the "
        "recipe's without kv_cache"]
    recipe = dataclasses.replace(recipe, kv_cache=None)
    head = workload.task.headline
    size = workload.size(recipe)
    simulated = workload.evaluate(recipe).quantized.metrics
    if fmt == "safetensors":
        export_safetensors(workload, recipe, out)
        report = ExportReport(out, fmt, os.path.getsize(out), size["size_bytes"], size["fp32_bytes"], None, head,
                              {"simulated": simulated}, notes=kv_notes)
        if abs(report.file_size_bytes / size["size_bytes"] - 1) > SIZE_TOLERANCE:
            report.differences.append(  # the sizes and the gap: summary_lines' first line
                "safetensors stores codes below 8 bits packed but zero-points as int8, plus a JSON header (tensor "
                "index, recipe)")
        return report
    with _onnx_exportable(workload):
        written = export_qdq(workload, recipe, out)
    theory = {r["name"]: r["size_bytes"] for r in size["layers"]}
    layers = [{**row, "theoretical_bytes": theory[row["layer"]]} for row in written.layers]
    measured = workload.task.metrics(run_onnx(session(out, os.cpu_count() or 1), workload, workload.evaluation),
                                     workload.reference_outputs, workload.evaluation.labels)
    report = ExportReport(out, fmt, os.path.getsize(out), size["size_bytes"], size["fp32_bytes"],
                          _fp32_onnx_bytes(workload), head, {"onnxruntime": measured, "simulated": simulated},
                          layers, notes=list(written.notes) + kv_notes)
    if runtime == "openvino":
        from qcore.export.openvino import precision_label

        ov = session(out, os.cpu_count() or 1, runtime, precision)
        report.metrics["openvino"] = workload.task.metrics(run_onnx(ov, workload, workload.evaluation),
                                                           workload.reference_outputs, workload.evaluation.labels)
        report.notes.append(f"the file run in {precision_label(ov)}")
    report.differences = (size_differences(workload, recipe, report)
                          + metric_differences(head, measured[head], simulated[head], len(workload.evaluation), layers))
    in_float = [r["layer"] for r in layers if r["executes"] == "float (dequantized)"]
    if in_float:
        report.notes.append(f"{len(in_float)} of {len(layers)} layers run in float in ONNX Runtime on their exact "
                            f"dequantized weights ({', '.join(in_float)}): see each layer's reason")
    if any(r["executes"] == "int8 kernel" for r in layers) and not _has_int8_dot_product():
        report.notes.append("this CPU has no VNNI/AMX int8 dot-product instructions: ONNX Runtime's int8 kernels use "
                            "AVX2 (vpmaddubsw), whose 16-bit intermediate sums can saturate")
    if any("int8 compute" in r["activations"] for r in layers) and not _has_int8_dot_product():
        report.notes.append("int8 compute on a CPU without VNNI/AMX: ONNX Runtime runs MatMulNBits accuracy_level 4 "
                            "with its AVX2 int8 kernel where MLAS has one for this bit width and block, and otherwise "
                            "falls back to float32 compute (GetAccuracyLevel), which the simulation does not model")
    return report


def _fp32_onnx_bytes(workload) -> int:
    """Size of the FP32 model as written by the same exporter (its float graph is cached per workload)."""
    with tempfile.TemporaryDirectory() as tmp:
        return export_qdq(workload, preset("fp32"), os.path.join(tmp, "fp32.onnx")).size_bytes


def _has_int8_dot_product() -> bool:
    features = set(cpu_features())
    return "avx2" not in features or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & features)
