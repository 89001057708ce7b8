"""Running an exported file: sessions (ONNX Runtime, or OpenVINO through ``qcore.export.openvino``), input
feeds (``input_0..``), outputs over a data set. Every input is batched along its own axis (``Data.batch_axes``:
an LSTM state (2, batch, 128) on axis 1), as the file declares it; scalar inputs are constants in the file."""

from __future__ import annotations

import numpy as np
import torch

from qcore.errors import QcoreError


def input_names(workload) -> list[str]:
    return [f"input_{i}" for i in range(len(workload.calibration.inputs))]


RUNTIMES = ("onnxruntime", "openvino")


def session(path: str, threads: int, runtime: str = "onnxruntime", precision: str = "default"):
    """A session running ``path`` on the CPU with ``threads`` threads in ``runtime``; ``precision``: OpenVINO's
    INFERENCE_PRECISION_HINT ("default" | "f32" | "bf16"; ONNX Runtime computes float ops in f32 only)."""
    if runtime == "openvino":
        from qcore.export.openvino import openvino_session

        return openvino_session(path, threads, precision)
    if runtime != "onnxruntime":
        raise QcoreError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    # idle worker threads sleep instead of spinning: a spinning pool would steal the cores from the
    # other model timed right after it in an interleaved round
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def feed(workload, data) -> dict:
    """All of ``data`` as one ONNX Runtime input dict (one batch of len(data) samples, each input in its layout)."""
    return {n: t.numpy() for n, t in zip(input_names(workload), data.inputs)}


def fixed_batch(sess, axis: int = 0) -> int | None:
    """The batch size a session's file is declared at (its first input's dimension ``axis``, that input's batch
    axis), None if dynamic."""
    first = sess.get_inputs()[0].shape[axis]
    return first if isinstance(first, int) and first > 0 else None  # some exporters write 0 or -1 for "any"


def run_onnx(sess, workload, data) -> torch.Tensor:
    """Outputs of an ONNX Runtime session over ``data``, float32: in batches of workload.batch_size, or of
    the file's declared batch when it has one (the last batch filled up with its own first samples, whose
    outputs are dropped)."""
    fixed = fixed_batch(sess, data.axis(0))
    size, outs = fixed or workload.batch_size, []
    for start in range(0, len(data), size):
        n = min(size, len(data) - start)
        fill = start + (torch.arange(size) % n if fixed else torch.arange(n))
        outs.append(sess.run(None, feed(workload, data.subset(fill)))[0][:n])
    return torch.from_numpy(np.concatenate(outs)).float()
