"""WINA: keep input channel i of a projection when |x_i| * ||W[:, i]||_2 is among the largest.

The same per-token machinery, scopes and allocations as TEAL (:mod:`.teal`), with each
projection's score weighted by the L2 norms of its weight's columns, so a small input on a
channel whose weights are large still counts. Plan tensors: ``quantiles.<role>.<layer>`` of the
weighted score (and ``allocation.<layer>`` with TEAL's greedy allocation on that score).
"""

from __future__ import annotations

from .method import SparseMethod, always
from .teal import OPTIONS, build_tables, calibration, check_options, threshold_runtime


def build(neurons, options, atlas, sample, plan) -> dict:
    return build_tables(neurons, options, atlas, sample, weighted=True)


def check(options, atlas, corpus) -> None:
    check_options("wina", options, atlas, corpus)


def runtime(plan, layer, phase):
    return threshold_runtime(plan, layer, weighted=True, phase=phase)


METHOD = SparseMethod("wina", build, runtime, options=OPTIONS, check=check, uses_corpus=always, calibration=calibration)
