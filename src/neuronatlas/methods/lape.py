"""LAPE: language (label) activation probability entropy (Tang et al. 2024, "Language-Specific Neurons").

1. p[k, l, j] = share of label-k tokens on which neuron (l, j) is active (``atlas.activation_probability``).
2. q = p / sum_k p;  H = -sum_k q log q  (0 log 0 = 0).
3. tau = the ``percentile`` point of ALL p values pooled over layers, neurons and labels: the k-th
   smallest of the n values with k = round(n * percentile), as the authors' code does with kthvalue.
   A neuron whose p never exceeds tau gets H = +inf and is never kept (unless ``filter=False``).
   A neuron never active on any label has no q and is never kept, with or without the filter.
4. Keep the round(top_rate * N) neurons of all N neurons with the lowest H (at least one; fewer when
   fewer are not excluded). Entropies equal to 12 decimals are ties, broken by (layer, index).
5. Assign each kept neuron to every label with p > tau_assign; with ``filter=False`` a neuron with no
   label above it goes to its argmax label (the first on ties); with the filter it gets no label (the
   paper's code drops it; only possible when tau_assign > tau). tau_assign is the ``assign_percentile``
   point of the same pooled values; by default the same percentile, as in the paper (the authors' code
   has two ratios, filter_rate and activation_bar_ratio, both 0.95).

Like the paper, the signal is the gate signal act(gate(x)) > 0 of gated families (z for the others),
and the validation (``evaluate``) sets the same signal to zero, which zeroes z = act(gate(x)) * up(x).

score = H: lower means more specific to its label(s).

The null (``null=``, on by default in the CLI; not in the paper: ``--no-null`` gives the paper's
set): the atlas keeps only per-label token counts, and its document sample keeps each document's
mean and max of z, not per-document activation probabilities, so LAPE itself cannot be re-run on
shuffled documents. Instead every (neuron, label) pair is tested on the document sample: the AUROC
of the document mean of z for the label against the rest, real sample labels against
``permutations`` shuffles of them (pooled standardised p, Benjamini-Hochberg q over all pairs). A
kept neuron keeps only the labels with q < fdr; a neuron with none left is dropped. The test reads
z even when LAPE selected on the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NeuronAtlasError
from ..neuronset import Neuron, NeuronSet, model_info
from . import layer_of, resolve_signal
from .nulls import NullOptions, best, null_block, q_values, supported_labels

TIE_DECIMALS = 12


@dataclass
class LapeSelection:
    kept: torch.Tensor  # (n,) flat neuron indices, lowest entropy first
    entropy: torch.Tensor  # (N,) float64, +inf where excluded
    tau: float
    assigned: torch.Tensor  # (K, n) bool: kept neuron i belongs to label k
    excluded: int  # neurons with H = +inf
    tau_assign: float = float("nan")  # the bar of step 5 (tau unless assign_percentile differs)


def pooled_quantile(p: torch.Tensor, percentile: float) -> float:
    """The k-th smallest of all values, k = round(n * percentile), as the authors' kthvalue."""
    flat = p.reshape(-1)
    k = min(max(int(round(flat.numel() * percentile)), 1), flat.numel())
    return float(flat.kthvalue(k).values)  # kthvalue works on any size (torch.quantile stops at 16M)


def lape_select(p: torch.Tensor, top_rate: float = 0.01, percentile: float = 0.95, filter: bool = True,
                assign_percentile: float | None = None) -> LapeSelection:
    """LAPE on a (K, N) matrix of activation probabilities (labels x all neurons, layers concatenated)."""
    p = p.double()
    num_labels, total = p.shape
    # Step 2: entropy over labels of the normalised probabilities (in place: p may be ~10M values).
    mass = p.sum(0)  # (N,)
    q = p / mass.clamp(min=torch.finfo(torch.float64).tiny)
    entropy = q.xlogy_(q).sum(0).neg_()  # xlogy(0, 0) = 0
    del q
    entropy[mass <= 0] = float("inf")  # never active: no distribution over labels
    # Step 3: tau over all values pooled.
    tau = pooled_quantile(p, percentile)
    tau_assign = tau if assign_percentile in (None, percentile) else pooled_quantile(p, assign_percentile)
    if filter:
        entropy[p.amax(0) <= tau] = float("inf")
    # Step 4: the lowest entropies, ties broken by position (a stable sort over the flat order).
    key = torch.round(entropy, decimals=TIE_DECIMALS)
    order = torch.sort(key, stable=True).indices
    finite = int(torch.isfinite(key).sum())
    wanted = max(int(round(total * top_rate)), 1)
    kept = order[: min(wanted, finite)]
    # Step 5: every label above tau_assign; without the filter, the argmax label when none is.
    chosen = p[:, kept]  # (K, n)
    assigned = chosen > tau_assign
    if not filter and kept.numel():  # with the filter, one with no label above tau_assign has none (the paper's)
        none = ~assigned.any(0)
        top = chosen.argmax(0)
        assigned[top[none], none.nonzero().flatten()] = True
    return LapeSelection(kept, entropy, tau, assigned, int((~torch.isfinite(entropy)).sum()), tau_assign)


def probabilities(atlas, signal: str) -> torch.Tensor:
    """(K, N) float64 activation probabilities of all neurons, layers concatenated.

    The same values as ``atlas.activation_probability`` per layer, written into one buffer.
    """
    widths = atlas.widths
    p = torch.empty((len(atlas.labels), sum(widths)), dtype=torch.float64)
    start = 0
    for layer, width in enumerate(widths):
        p[:, start : start + width].copy_(atlas.stat("active", layer, signal))
        start += width
    return p.div_(atlas.tokens_per_label.clamp(min=1).double()[:, None])


def check_labelled(atlas, method: str) -> None:
    labels = atlas.labels
    if len(labels) < 2:
        raise NeuronAtlasError(
            f"{method} needs an atlas profiled with labels (at least two, e.g. languages via --label-field); "
            f"this atlas has only the label {labels[0] if labels else 'none'!r}"
        )


def find_lape(atlas, top_rate: float = 0.01, percentile: float = 0.95, signal: str | None = None,
              filter: bool = True, null: NullOptions | None = None,
              assign_percentile: float | None = None) -> NeuronSet:
    """Label-specific neurons of an atlas by LAPE; see the module docstring for the definition.

    >>> lape = find_lape(load_atlas("atlas"), top_rate=0.01)  # doctest: +SKIP
    """
    check_labelled(atlas, "LAPE")
    if not 0 < top_rate <= 1:
        raise NeuronAtlasError(f"top rate must be in (0, 1] (got {top_rate}); 0.01 keeps 1% of all neurons")
    if not 0 < percentile < 1:
        raise NeuronAtlasError(f"percentile must be in (0, 1) (got {percentile}); 0.95 is the paper's")
    if assign_percentile is not None and not 0 < assign_percentile < 1:
        raise NeuronAtlasError(f"assign percentile must be in (0, 1) (got {assign_percentile}); 0.95 is the paper's")
    signal = resolve_signal(atlas, signal)
    p = probabilities(atlas, signal)
    selection = lape_select(p, top_rate, percentile, filter, assign_percentile)
    layers, indices = layer_of(atlas.widths)(selection.kept)
    labels = atlas.labels
    tested = lape_null(atlas, labels, null) if null is not None else None  # pairs of labels it left out: not kept
    neurons = []
    for column in torch.argsort(selection.kept).tolist():  # (layer, index) order
        layer, index = int(layers[column]), int(indices[column])
        flat = int(selection.kept[column])
        score = float(selection.entropy[flat])
        for k in selection.assigned[:, column].nonzero().flatten().tolist():
            if tested is not None and labels[k] not in tested["q"]:
                continue
            q = None if tested is None else float(tested["q"][labels[k]][flat])
            if q is None or q < null.fdr:
                neurons.append(Neuron(layer, index, score, labels[k], q))
    params = {
        "top_rate": top_rate, "percentile": percentile, "signal": signal, "filter": filter,
        "assign_percentile": percentile if assign_percentile is None else assign_percentile,
        "tau": selection.tau, "tau_assign": selection.tau_assign, "kept": int(selection.kept.numel()),
        "total_neurons": int(p.shape[1]),
        "excluded": selection.excluded, "labels": labels, "score": "entropy over labels (lower = more specific)",
    }
    return NeuronSet("lape", model_info(atlas.meta), neurons, params, signal,
                     None if tested is None else tested["block"],
                     [label for label in labels if tested is None or label in tested["q"]])


def lape_null(atlas, labels: list[str], options: NullOptions) -> dict:
    """{"q": {label: (N,) q}, "block": the set's null}: see the module docstring."""
    from .selectivity import docpool_null, sample_counts

    if atlas.docpool is None or len(atlas.docpool) == 0:
        raise NeuronAtlasError("LAPE's permutation null needs the atlas's document sample (profile with --doc-sample N, "
                               "the default keeps 256 per label); pass --no-null to skip it")
    counts = sample_counts(atlas)
    labels, refused = supported_labels({label: counts.get(label, 0) for label in labels}, options.min_docs,
                                       "documents in the atlas's sample", total=sum(counts.values()))
    result = docpool_null(atlas, labels, "auroc", "mean", options)
    per_label = {label: {"best": best(result["real"][label]), "null_best": result["null_best"][label], "chance": 0.5}
                 for label in labels}
    block = null_block("lape", "the document labels of the atlas's document sample (each kept neuron-label pair "
                       "tested by the AUROC of the document mean of z)", result["permutations"], options, per_label,
                       refused=refused)
    return {"q": q_values(result["p"]), "block": block}
