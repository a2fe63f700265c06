"""Sparse inference from what the atlas learned: calibrated plans, fast FFN kernels, benchmarks.

    >>> from neuronatlas.sparse import sparsify, apply_plan, load_plan       # doctest: +SKIP
    >>> plan = sparsify("hot", model, tokenizer, 0.5, atlas=atlas)            # doctest: +SKIP
    >>> with apply_plan(model, plan):                                         # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=32)

Methods: ``teal``, ``wina``, ``coreinfer``, ``hot``, ``moe``; see docs/sparse.md.
"""

from .plan import METHODS, SparsePlan, load_plan
from .sparsify import SparsifyOptions, sparsify
from .wrap import SparseModel, apply_plan

__all__ = ["METHODS", "SparseModel", "SparsePlan", "SparsifyOptions", "apply_plan", "load_plan", "sparsify"]
