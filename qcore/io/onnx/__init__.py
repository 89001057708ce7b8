"""ONNX files in: an untrusted ``.onnx`` file -> ``LoadedModel`` whose model is an ``OnnxModule``
(``qcore.model.onnx_graph``: the executable graph, with the operators of ``qcore.model.onnx_ops``).

- ``file``: the file and its external weight file, checked (``load_onnx_file``);
- ``proto``: every tensor of a ``ModelProto``, tensors and attributes read as torch values;
- ``branches``: an ``If`` with a constant condition (a bound scalar input) inlined into the graph;
- ``convert``: ``ModelProto`` -> ``OnnxModule``; the declared inputs (``input_shapes``);
- ``layers``: the weighted nodes (Gemm/MatMul -> Linear, Conv -> Conv1d/2d, Gather -> Embedding);
- ``names``: layer names from the source module paths;
- ``fold``: the budgets constant folding at import stays within.
"""
