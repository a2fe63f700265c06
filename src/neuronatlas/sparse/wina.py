"""WINA: keep input channel i of a projection when |x_i| * ||W[:, i]||_2 is among the largest.

The same per-token machinery and calibration as TEAL (:mod:`.teal`), with each projection's
score weighted by the L2 norms of its weight's columns, so a small input on a channel whose
weights are large still counts. Plan tensors: ``quantiles.<role>.<layer>`` of the weighted score.
"""

from __future__ import annotations

from .teal import threshold_runtime


def runtime(plan, layer, phase):
    return threshold_runtime(plan, layer, weighted=True)
