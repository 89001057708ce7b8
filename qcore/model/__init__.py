"""A model under a recipe: layers, BatchNorm folding, calibration, simulation, sizes, workloads."""
