"""What a sparse method declares: how ``sparsify`` builds its plan and how ``apply_plan`` runs it.

Each method module (``teal``, ``wina``, ``cats``, ``coreinfer``, ``hot``, ``moe``) ends with one
``METHOD = SparseMethod(...)``; :mod:`.registry` lists the modules once. To add a method, write
its module (plan tensors, a layer runtime, a builder) and add the module to ``registry.MODULES``
(and a row to docs/sparse.md): ``sparsify``, ``apply_plan``, plan loading and ``bench`` read the
registry; the command line lists the names itself (``cli/sparsify.py``, so that ``--help`` imports
no torch), and a test checks that the two agree.

Shapes: plan tensors are keyed ``"<name>.<layer>"``; a runtime's ``forward(role, x, original)``
gets x (..., d_model) for ``up``/``gate`` and z (..., d_ff) for ``down``, and ``original(x)`` is
the dense projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# (neurons, options, atlas, sample, plan) -> {"<name>.<layer>": tensor}; atlas and sample (a
# CalibrationSample, from a corpus) are None when not given, plan has its options already
Build = Callable[..., dict]
# (plan, layer, phase) -> an object with forward(role, x, original), or None: the layer stays dense
Runtime = Callable[..., Any]


def needs_nothing(options, atlas, corpus) -> None:
    """The default check: the method calibrates from the weights alone."""


def nothing_more(options) -> dict:
    """The default calibration pass: the FFN's inputs only."""
    return {}


def never(options) -> bool:
    return False


def always(options) -> bool:
    return True


def picked(options, keys: tuple[str, ...]) -> dict:
    """The fields ``keys`` of a SparsifyOptions, in the dataclass's order (as plan.json records them)."""
    return {key: value for key, value in asdict(options).items() if key in keys}


@dataclass(frozen=True)
class SparseMethod:
    name: str  # the plan's "method" and the CLI's choice
    build: Build  # the plan's tensors
    runtime: Runtime  # one layer of a plan at inference
    options: tuple[str, ...] = ("seed",)  # SparsifyOptions fields recorded in plan.json "options"
    check: Callable[[Any, Any, Any], None] = needs_nothing  # (options, atlas, corpus): refuse what is missing
    uses_corpus: Callable[[Any], bool] = never  # (options): whether a given corpus is read (a calibration pass)
    needs_decoding: str = ""  # why the method needs a decode phase ("" = it does not); such methods refuse encoders
    needs_gate: str = ""  # why the method needs a gated MLP ("" = it does not); such methods refuse ungated families
    record: Callable[[Any, int], dict] | None = None  # (options, num_layers) -> plan options, when not just `options`
    calibration: Callable[[Any], dict] = nothing_more  # (options) -> extra keyword arguments of calibration_pass

    def plan_options(self, options, num_layers: int) -> dict:
        """What plan.json records of ``options`` (a SparsifyOptions)."""
        if self.record is not None:
            return self.record(options, num_layers)
        return picked(options, self.options)
