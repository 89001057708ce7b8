"""The workshop's model: which zoo model the lessons use, and the calibration set that differs from the real inputs.

``TEACHING_MODEL`` is digits-cnn: int8 changes its accuracy by at most one test image, int4 per tensor costs
about 2 points and int3 per tensor about 17 (``Workload.evaluate`` on its 360 test images), so every lesson's
chart moves. Its inputs lie in [0, 1] like digits-mlp's, so a calibration set drawn like the test set gives
static and dynamic activation ranges that look the same; ``dim_calibration`` makes them differ the way a real
deployment does when the calibration images were not like the ones the model meets: the same 200 calibration
images at ``DIM_FACTOR`` of their brightness (pixels in [0, 0.5]) while the evaluation images stay as they are.
Static ranges fixed on the dim images then clip the real ones; dynamic ranges are measured on each real batch.
"""

from __future__ import annotations

from dataclasses import replace

from qcore.model.workload import Workload, content_hash

TEACHING_MODEL = "digits-cnn"
DIM_FACTOR = 0.5  # calibration images at half brightness


def dim_calibration(w: Workload, factor: float = DIM_FACTOR) -> Workload:
    """``w`` with every calibration input multiplied by ``factor`` (the evaluation data unchanged); a workload of
    its own (its ``content_hash`` covers the factor, so caches keyed on it never mix the two)."""
    x, *rest = w.calibration.inputs
    dim = replace(w.calibration, inputs=(x * factor, *rest))
    return replace(w, name=f"{w.name} (calibrated on images at {factor:.0%} brightness)", calibration=dim,
                   description=w.description + f" Calibration images dimmed to {factor:.0%} brightness.",
                   content_hash=content_hash("dim-calibration", w.content_hash, str(factor)), notes=list(w.notes))
