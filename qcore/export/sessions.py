"""Running an exported file in ONNX Runtime: sessions, input feeds (``input_0..``), outputs over a data set."""

from __future__ import annotations

import numpy as np
import torch


def input_names(workload) -> list[str]:
    return [f"input_{i}" for i in range(len(workload.calibration.inputs))]


def session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    # idle worker threads sleep instead of spinning: a spinning pool would steal the cores from the
    # other model timed right after it in an interleaved round
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def feed(workload, data) -> dict:
    """All of ``data`` as one ONNX Runtime input dict (one batch of len(data) samples)."""
    return {n: t.numpy() for n, t in zip(input_names(workload), data.inputs)}


def feeds(workload, data) -> list[dict]:
    """``data`` as ONNX Runtime input dicts in batches of workload.batch_size."""
    names = input_names(workload)
    return [{n: t.numpy() for n, t in zip(names, b)} for b in data.batches(workload.batch_size)]


def run_onnx(sess, workload, data) -> torch.Tensor:
    """Outputs of an ONNX Runtime session over ``data`` (batches of workload.batch_size), float32."""
    return torch.from_numpy(np.concatenate([sess.run(None, f)[0] for f in feeds(workload, data)])).float()
