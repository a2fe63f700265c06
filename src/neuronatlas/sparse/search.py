"""PPL-p% sparsity ("Sparsing Law"): the highest sparsity whose perplexity stays within p% of dense.

Plans keep their calibration for every sparsity (:meth:`SparsePlan.at_sparsity`), so the search
only re-targets the plan and measures perplexity: a bisection over [0, ``high``], assuming
perplexity grows with sparsity.
"""

from __future__ import annotations

from ..errors import NeuronAtlasError
from ..models import check_causal
from .bench import perplexity
from .plan import SparsePlan
from .wrap import SparseModel


def ppl_p_sparsity(model, plan: SparsePlan, windows, p: float = 1.0, high: float = 0.95, steps: int = 7) -> dict:
    """{"sparsity", "ppl", "ppl_dense", "tried": [(sparsity, ppl), ...]} for a rise of at most ``p`` percent."""
    if p <= 0:
        raise NeuronAtlasError(f"the perplexity budget must be a positive percentage, not {p}")
    check_causal(model.config, "the PPL-p% search", needs="next-token perplexity")  # the CLI checks before calibrating
    dense = perplexity(model, windows)
    budget = dense * (1 + p / 100)
    low, best, tried = 0.0, (0.0, dense), []
    for _ in range(steps):
        middle = (low + high) / 2
        value = perplexity(model, windows, SparseModel(model, plan.at_sparsity(middle)))
        tried.append((middle, value))
        if value <= budget:
            low, best = middle, (middle, value)
        else:
            high = middle
    return {"sparsity": best[0], "ppl": best[1], "ppl_dense": dense, "p": p, "tried": tried}
