"""Apply a sparse plan to a loaded Hugging Face model, so ``forward`` and ``generate()`` skip work.

    >>> sparse = apply_plan(model, load_plan("PLAN"))      # doctest: +SKIP
    >>> with sparse:                                        # projections swapped in, KV cache as usual
    ...     model.generate(**inputs, max_new_tokens=32)     # doctest: +SKIP

Each FFN projection module of each layer (and each attention projection a runtime names in its
``roles``: TEAL/WINA with ``scope="all"``) is replaced by a :class:`~.ffn.Projection` whose
layer *runtime* (one per method) computes it; leaving the ``with`` block (or ``detach()``) puts
the family's modules back, so dense and sparse runs alternate in one process at no cost.

A model-level pre-hook tells the runtimes the shape of each call: a call with more than one new
token per sequence is a *prefill* (CoreInfer chooses the prompt's core neurons there), a call with
one token is a *decode step*. ``continuation()`` marks multi-token calls that continue the same
prompt (perplexity of a continuation after a prefill).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from ..errors import NeuronAtlasError
from ..models import locate_neurons
from . import row_kernel
from .attention import sparse_layers
from .ffn import ModuleSwap, Projection, layer_roles
from .hugepages import Arena
from .plan import SparsePlan
from .registry import check_support
from .thresholds import ThresholdRuntime


@dataclass
class Phase:
    """What the current forward call is, shared by every layer runtime of one model."""

    batch: int = 1  # sequences in the call
    tokens: int = 1  # new tokens per sequence in the call
    continuing: bool = False  # multi-token calls continue the last prompt (no new prompt)
    prompt: int = 0  # counts prompts: runtimes rebuild per-prompt state when it changes
    clusters: list[int] = field(default_factory=list)  # CoreInfer's similarity-guided cluster per sequence
    kernel_calls: Counter = field(default_factory=Counter)  # TEAL/WINA decode calls: "rows" read, or "dense" fallback

    @property
    def prefill(self) -> bool:
        return self.tokens > 1 and not self.continuing


class SparseModel:
    """A model with a plan's projections ready to swap in; use as a context manager."""

    def __init__(self, model: nn.Module, plan: SparsePlan):
        neurons = locate_neurons(model)
        method = check_support(plan.method, model.config)
        if plan.widths != neurons.widths:
            raise NeuronAtlasError(
                f"plan widths {plan.widths} do not match the model's FFN widths {neurons.widths}; "
                "run `neuronatlas sparsify` for this model"
            )
        self.model, self.plan, self.phase = model, plan, Phase()
        layers = sparse_layers(model)
        self.runtimes = [method.runtime(plan, layer, self.phase) for layer in layers]
        self.tables_moved = False  # into huge pages, at the first decode step (see _read_call)
        replacements = {}
        for layer, runtime in zip(layers, self.runtimes):
            if runtime is None:  # this layer stays dense
                continue
            # the FFN's projections, or those the runtime names (TEAL/WINA: attention's too)
            for role, module in getattr(runtime, "roles", layer_roles(layer)).items():
                replacements[module] = Projection(runtime, role, module)
        self._swap = ModuleSwap(model, replacements)
        self._hook = None

    def attach(self) -> SparseModel:
        if self._hook is None:
            self._swap.attach()
            self._hook = self.model.register_forward_pre_hook(self._read_call, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._swap.detach()

    def __enter__(self) -> SparseModel:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def continuation(self):
        """Multi-token calls inside continue the last prompt: its per-prompt choices are kept."""
        self.phase.continuing = True
        try:
            yield self
        finally:
            self.phase.continuing = False

    def _read_call(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        self.phase.batch, self.phase.tokens = int(ids.shape[0]), int(ids.shape[1]) if ids.dim() > 1 else 1
        if self.phase.tokens == 1 and not self.tables_moved:
            # only decode steps read the row tables: prefills and perplexity never pay for the move (in
            # this VM fresh memory cost ~3 s for SmolLM2's 425 MB of tables, once per process)
            tables_in_huge_pages(self.runtimes)
            self.tables_moved = True
        if self.phase.prefill:
            self.phase.prompt += 1
        return None


def tables_in_huge_pages(runtimes: list) -> None:
    """Move the row tables of the thresholded projections (TEAL, WINA) into one huge-page arena (see
    hugepages.py), a group at a time, so that each group's old tables go as its copies arrive."""
    groups = {id(group): group for runtime in runtimes if isinstance(runtime, ThresholdRuntime)
              for group in runtime.groups.values()}
    groups = [group for group in groups.values() if all(row_kernel.supports(table) for table in group.row_tables())]
    arena = Arena.sized_for([table for group in groups for table in group.row_tables()])
    if arena is not None:
        for group in groups:
            group.use_row_tables([arena.copy(table) for table in group.row_tables()])


def apply_plan(model: nn.Module, plan: SparsePlan, check_fingerprint: bool = True) -> SparseModel:
    """A :class:`SparseModel` for ``model`` (not yet attached: use ``with`` or ``attach()``)."""
    if check_fingerprint:
        plan.check_model(model)
    return SparseModel(model, plan)
