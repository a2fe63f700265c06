"""Sparse inference from what the atlas learned: calibrated plans, fast FFN kernels, benchmarks.

    >>> from neuronatlas.sparse import sparsify, apply_plan, load_plan       # doctest: +SKIP
    >>> plan = sparsify("hot", model, tokenizer, 0.5, atlas=atlas)            # doctest: +SKIP
    >>> with apply_plan(model, plan):                                         # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=32)

Methods (:data:`METHOD_NAMES`): ``teal``, ``wina``, ``cats``, ``coreinfer``, ``hot``, ``moe``, one module
each, listed in :mod:`.registry`; to add one see :mod:`.method` and docs/sparse.md.
"""

from .method import SparseMethod
from .plan import SparsePlan, check_sparsity, load_plan
from .registry import METHOD_NAMES, METHODS
from .sparsify import SparsifyOptions, sparsify
from .wrap import SparseModel, apply_plan

__all__ = ["METHODS", "METHOD_NAMES", "SparseMethod", "SparseModel", "SparsePlan", "SparsifyOptions", "apply_plan",
           "check_sparsity", "load_plan", "sparsify"]
