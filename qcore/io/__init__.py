"""Files in, workloads out: every file here is untrusted input.

- ``limits``: every bound on untrusted input (bytes, counts, seconds) and the checks that enforce it;
- ``models``: a model file -> ``LoadedModel`` (dispatch by extension; TorchScript, state dicts);
- ``pt2`` / ``onnx``: torch.export archives and ONNX graphs -> ``nn.Module`` (packages, one module per job);
- ``data``: data files, synthetic inputs, the calibration/evaluation split;
- ``workload``: ``load_workload``, the one entry point that turns (model, data) into a ``Workload``.
"""
