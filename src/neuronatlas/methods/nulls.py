"""Permutation nulls and false-discovery control, shared by every find method that scores labels.

A method scores every neuron on the real labels, then on ``permutations`` shuffles of the labels
(document level: all rows of one document keep one label, seeded). Each neuron's p-value:

1. stack its real score and its P null scores, (P + 1,), and standardise them by their own mean
   and standard deviation (so neurons of different scales share one null; a neuron whose scores do
   not vary gets p = 1);
2. p = (1 + #{null z >= real z, over all neurons and shuffles}) / (1 + #null z): the real z against
   the pooled null z of every neuron (one label at a time), so 20 shuffles give p-values far below
   1/21. Under the null the real score is one more draw among the P + 1, so p is uniform.

q-values: Benjamini-Hochberg over every (neuron, label) pair tested. A method keeps only pairs with
q < ``fdr`` (0.05). A label with fewer than ``min_docs`` documents is too small to tell a finding
from chance: :func:`supported_labels` leaves it out (the set's ``null.refused_labels`` and its
summary name it and its count), and refuses the run when the user asked for it by name or no label
is left (:func:`check_support`).
See docs/find-statistics.md for what each method shuffles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NeuronAtlasError

DEFAULT_PERMUTATIONS = 20
DEFAULT_FDR = 0.05
DEFAULT_MIN_DOCS = 20


@dataclass(frozen=True)
class NullOptions:
    """How the null runs: ``permutations`` None takes the method's default (20 where cheap)."""

    permutations: int | None = None
    fdr: float = DEFAULT_FDR
    seed: int = 0
    min_docs: int = DEFAULT_MIN_DOCS

    def __post_init__(self):
        if self.permutations is not None and self.permutations < 1:
            raise NeuronAtlasError(f"permutations must be at least 1 (got {self.permutations}); 20 is the default")
        if not 0 < self.fdr <= 1:
            raise NeuronAtlasError(f"fdr must be in (0, 1] (got {self.fdr}); 0.05 is the default")
        if self.min_docs < 1:
            raise NeuronAtlasError(f"min docs must be at least 1 (got {self.min_docs})")

    def count(self, default: int = DEFAULT_PERMUTATIONS) -> int:
        return default if self.permutations is None else self.permutations


def check_support(counts: dict, min_docs: int, what: str = "documents") -> None:
    """Refuse the first label with fewer than ``min_docs`` documents, naming it and its count."""
    for label, count in counts.items():
        if count < min_docs:
            raise NeuronAtlasError(
                f"label {label!r} has {count} {what}, fewer than --min-docs {min_docs}: too few to tell "
                "a finding from chance; add documents of it, leave it out, or lower --min-docs"
            )


def supported_labels(counts: dict, min_docs: int, what: str = "documents", asked=(),
                     total: int | None = None) -> tuple[list, dict]:
    """(the labels of ``counts`` with at least ``min_docs`` documents, {label: count} of the others).
    A label in ``asked`` (named by the user) below it, or no label left, is refused as by :func:`check_support`;
    so is a label tested against the rest of ``total`` documents when that rest is below it."""
    refused = {label: count for label, count in counts.items() if count < min_docs}
    named = {label: count for label, count in refused.items() if label in asked}
    if named or len(refused) == len(counts):
        check_support(named or refused, min_docs, what)
    kept = [label for label in counts if label not in refused]
    for label in kept if total is not None else ():
        if total - counts[label] < min_docs:
            raise NeuronAtlasError(
                f"label {label!r} has {counts[label]} of the {total} {what}: the other labels have "
                f"{total - counts[label]}, fewer than --min-docs {min_docs}, too few to test it against; "
                "add documents of other labels, or lower --min-docs")
    return kept, refused


def shuffled_labels(labels: list, groups: np.ndarray | None, generator: np.random.Generator) -> list:
    """``labels`` (R,) with the documents' labels permuted; rows of one group (document) share one label."""
    if groups is None:
        return [labels[i] for i in generator.permutation(len(labels))]
    groups = np.asarray(groups)
    unique, first = np.unique(groups, return_index=True)
    doc_labels = [labels[i] for i in first]
    moved = [doc_labels[i] for i in generator.permutation(len(unique))]
    where = np.searchsorted(unique, groups)
    return [moved[i] for i in where]


def pooled_p(real: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """(N,) float64 p-values of ``real`` (N,) against ``null`` (P, N), higher = stronger; see the module."""
    stack = torch.cat([real[None], null]).double()  # (P + 1, N)
    finite = torch.isfinite(stack).all(0)
    mean = stack.mean(0)
    spread = stack.std(0, unbiased=False)
    varies = finite & (spread > 1e-12 * mean.abs().clamp(min=1e-300))
    z = (stack - mean) / spread.where(varies, torch.ones_like(spread))  # (P + 1, N)
    pool = z[1:, varies].flatten().sort().values
    above = len(pool) - torch.searchsorted(pool, z[0].contiguous(), right=False)  # null z >= real z
    p = (1 + above.double()) / (1 + len(pool))
    return torch.where(varies, p, torch.ones_like(p))


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """(M,) q-values of (M,) p-values: min over j >= i of p_(j) * M / j, capped at 1."""
    count = p.numel()
    if count == 0:
        return p.double()
    order = p.double().argsort()
    ranked = p.double()[order] * count / torch.arange(1, count + 1, dtype=torch.float64)
    ranked = ranked.flip(0).cummin(0).values.flip(0).clamp(max=1)
    q = torch.empty_like(ranked)
    q[order] = ranked
    return q


def q_values(p_by_label: dict) -> dict:
    """{label: (N,) q}: Benjamini-Hochberg over every (neuron, label) pair of ``p_by_label`` together."""
    labels = list(p_by_label)
    if not labels:
        return {}
    q = benjamini_hochberg(torch.cat([p_by_label[label].double() for label in labels]))
    return dict(zip(labels, q.split([len(p_by_label[label]) for label in labels])))


def label_null(matrices, row_labels: list, groups, labels: list, metric: str, options: NullOptions,
               two_sided: bool = False) -> dict:
    """The one-vs-rest ``metric`` (ap or auroc) of every column on the real row labels and on
    ``options.count()`` document-level shuffles of them.

    ``matrices``: a function returning an iterable of (R, D_i) float tensors (columns concatenated
    into N); ``groups`` (R,): the document of each row (None: one row per document).
    {"real": {label: (N,)}, "p": {label: (N,)}, "null_best": {label: float}, "permutations": P}.
    """
    from .ranking import column_scores

    permutations = options.count()
    generator = np.random.default_rng(options.seed)
    shuffles = [shuffled_labels(row_labels, groups, generator) for _ in range(permutations)]
    targets = {}
    for label in labels:
        targets[(label, -1)] = torch.tensor([x == label for x in row_labels], dtype=torch.bool)
        for j, shuffled in enumerate(shuffles):
            targets[(label, j)] = torch.tensor([x == label for x in shuffled], dtype=torch.bool)
    scores = column_scores(matrices(), targets, metric)
    out = {"real": {}, "p": {}, "null_best": {}, "permutations": permutations}
    for label in labels:
        null = torch.stack([scores[(label, j)] for j in range(permutations)])  # (P, N)
        real = scores[(label, -1)]
        out["real"][label] = real
        if two_sided:
            real, null = (real - 0.5).abs(), (null - 0.5).abs()
        out["p"][label] = pooled_p(real, null)
        out["null_best"][label] = best(null.flatten()) if not two_sided else 0.5 + best(null.flatten())
    return out


def best(values: torch.Tensor) -> float | None:
    """The largest finite value, None when there is none."""
    finite = values[torch.isfinite(values)]
    return float(finite.max()) if len(finite) else None


def null_block(method: str, shuffles: str, permutations: int, options: NullOptions, per_label: dict,
               test: str = "pooled standardised permutation p, Benjamini-Hochberg q", refused: dict | None = None) -> dict:
    """The set's ``null``: what was shuffled, how often, and per label the real best, the null's best
    and the chance level (``per_label``: {label: {"best", "null_best", "chance"}}); ``refused``: the
    labels left out for too few documents, with their counts (see :func:`supported_labels`)."""
    reals = [entry["best"] for entry in per_label.values() if entry.get("best") is not None]
    nulls = [entry["null_best"] for entry in per_label.values() if entry.get("null_best") is not None]
    chances = {entry.get("chance") for entry in per_label.values()}
    return {
        "method": method, "shuffles": shuffles, "permutations": permutations, "seed": options.seed,
        "fdr": options.fdr, "test": test,
        "best": max(reals) if reals else None, "null_best": max(nulls) if nulls else None,
        "chance": chances.pop() if len(chances) == 1 else None, "per_label": per_label,
        "min_docs": options.min_docs, "refused_labels": dict(refused or {}),
    }
