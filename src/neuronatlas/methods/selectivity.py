"""Label-selective neurons: how well one neuron's response tells one label from the rest.

For every neuron and label ``L`` (one against the rest), one of three scores:

* ``ap`` — average precision (Liu et al. 2025, "relation-specific neurons") of the neuron's pooled
  response to a document (``pool="mean"`` or ``"max"`` of z over its tokens) as a score for "the
  document has label L", over the atlas's document sample. Same value as
  ``sklearn.metrics.average_precision_score(y, score)``: AP = Σ_n (R_n − R_{n−1}) P_n over the
  distinct score thresholds, tied scores forming one step.
* ``auroc`` — the area under the ROC curve of the same scores (ties count one half), as
  ``sklearn.metrics.roc_auc_score``.
* ``prob_diff`` — token level, from the atlas's per-label counts: P(z > threshold | label L) −
  P(z > threshold | other labels). Needs no document sample.

AP's chance level is the share of label-L documents (0.2 for five balanced labels); AUROC's is 0.5.
Both are computed for all neurons at once: each neuron's column of responses is sorted once (in
chunks of columns) and that ranking serves every label.
"""

from __future__ import annotations

import torch

from ..errors import NeuronAtlasError
from ..neuronset import Neuron, NeuronSet, model_info
from .nulls import NullOptions, best, label_null, null_block, q_values, supported_labels
from .ranking import Ranking, column_scores, ranked_auroc, ranked_average_precision

METRICS = ("ap", "auroc", "prob_diff")
POOLS = ("mean", "max")
DEFAULT_TOP_K = 50


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AP of each column of ``scores`` (R, C) as a score for the boolean ``positive`` (R,); (C,) float64.

    sklearn's definition: sort by score, descending; at each distinct score the precision of all
    documents scoring at least that much, weighted by the recall it adds.
    """
    return ranked_average_precision(Ranking(scores), positive)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of each column of ``scores`` (R, C) for ``positive`` (R,); (C,) float64.

    Mann-Whitney: (sum of the positives' ranks − P(P+1)/2) / (P·N), tied scores taking their mean rank.
    """
    return ranked_auroc(Ranking(scores), positive)


def selectivity_scores(atlas, label: str, metric: str = "ap", pool: str = "mean", signal: str = "z") -> list[torch.Tensor]:
    """Per layer, (D,) float64 scores of every neuron for ``label`` against the other labels."""
    return label_scores(atlas, [label], metric, pool, signal)[label]


def sample_labels(atlas) -> list[str]:
    """The label of each document of the atlas's sample that has tokens (the rows scored)."""
    documents = atlas.docpool
    return [x for x, tokens in zip(documents.labels, documents.tokens.tolist()) if tokens > 0]


def docpool_layers(atlas, pool: str = "mean"):
    """Per layer, (R, D) float32 scores of the sampled documents with tokens that order them as their
    pooled z does (rank codes, or values): all AP and AUROC need."""
    documents = atlas.docpool
    rows = torch.from_numpy(documents.tokens > 0)
    return (torch.from_numpy(documents.scores(pool, layer))[rows] for layer in range(atlas.num_layers))


def label_scores(atlas, labels: list[str], metric: str = "ap", pool: str = "mean",
                 signal: str = "z") -> dict[str, list[torch.Tensor]]:
    """{label: per layer (D,) float64 scores, one label against the rest}; one sort per neuron for all labels."""
    for label in labels:
        _check(atlas, metric, pool, label)
    if metric == "prob_diff":
        return {label: _prob_diff(atlas, label, signal) for label in labels}
    kept_labels = sample_labels(atlas)
    positives = {}
    for label in labels:
        positive = torch.tensor([x == label for x in kept_labels], dtype=torch.bool)
        if not positive.any() or positive.all():
            raise NeuronAtlasError(
                f"the atlas's document sample has {'no' if not positive.any() else 'only'} documents of label "
                f"{label!r} (sample labels: {', '.join(sorted(set(kept_labels)))}); "
                f"{metric} needs documents of the label and of others"
            )
        positives[label] = positive
    flat = column_scores(docpool_layers(atlas, pool), positives, metric)
    return {label: list(flat[label].split(atlas.widths)) for label in labels}


def docpool_null(atlas, labels: list[str], metric: str, pool: str, options: NullOptions) -> dict:
    """:func:`neuronatlas.methods.nulls.label_null` on the atlas's document sample (one row per document)."""
    return label_null(lambda: docpool_layers(atlas, pool), sample_labels(atlas), None, labels, metric, options)


def sample_counts(atlas) -> dict[str, int]:
    """{label: sampled documents with tokens}."""
    counts: dict[str, int] = {}
    for label in sample_labels(atlas):
        counts[label] = counts.get(label, 0) + 1
    return counts


def _prob_diff(atlas, label: str, signal: str) -> list[torch.Tensor]:
    k = atlas.label_index(label)
    tokens = atlas.tokens_per_label.double()
    mine, rest = tokens[k], tokens.sum() - tokens[k]
    if mine == 0 or rest == 0:
        raise NeuronAtlasError(f"label {label!r} has {'no' if mine == 0 else 'all the'} tokens of the atlas; "
                               "prob_diff needs tokens of the label and of others")
    out = []
    for layer in range(atlas.num_layers):
        active = atlas.stat("active", layer, signal).double()  # (K, D)
        out.append(active[k] / mine - (active.sum(0) - active[k]) / rest)
    return out


def _check(atlas, metric: str, pool: str, label: str | None) -> None:
    if metric not in METRICS:
        raise NeuronAtlasError(f"unknown metric {metric!r}; use ap, auroc or prob_diff")
    if pool not in POOLS:
        raise NeuronAtlasError(f"unknown pool {pool!r}; use mean or max")
    if len(atlas.labels) < 2:
        raise NeuronAtlasError(
            f"selectivity needs an atlas profiled with at least two labels (this one has: {', '.join(atlas.labels)}); "
            "profile again with --label-field naming the documents' label"
        )
    if label is not None:
        atlas.label_index(label)  # raises for an unknown label
    if metric in ("ap", "auroc") and (atlas.docpool is None or len(atlas.docpool) == 0):
        raise NeuronAtlasError(
            f"metric {metric} needs the atlas's per-document sample, which this atlas lacks; profile again with "
            "--doc-sample N (e.g. 256), or use --metric prob_diff"
        )


def find_selective(atlas, label: str | None = None, metric: str = "ap", pool: str = "mean",
                   top_k: int | None = None, threshold: float | None = None, signal: str = "z",
                   null: NullOptions | None = None) -> NeuronSet:
    """The neurons most selective for each label (or just ``label``), one against the rest.

    Keeps per label the ``top_k`` highest scores (default 50 when no ``threshold`` is given), or every
    neuron scoring at least ``threshold``, or with both the top_k among those. ``signal`` applies to
    prob_diff only (the document sample holds z). A neuron may appear under several labels.
    With ``null`` (the CLI's default) only neurons with q < ``null.fdr`` are candidates: see
    :func:`selectivity_null`.
    """
    _check(atlas, metric, pool, label)
    if top_k is not None and top_k < 1:
        raise NeuronAtlasError(f"top-k must be at least 1 (got {top_k})")
    if top_k is None and threshold is None:
        top_k = DEFAULT_TOP_K
    if signal not in atlas.signals:
        raise NeuronAtlasError(f"this atlas has no {signal!r} signal (it has: {', '.join(atlas.signals)})")
    labels = atlas.labels if label is None else [label]
    if metric != "prob_diff":
        sampled = set(atlas.docpool.labels)
        labels = [name for name in labels if name in sampled or label is not None]
    tested = None
    if null is not None:
        tested = selectivity_null(atlas, labels, metric, pool, null, asked=[label] if label else [])
        labels = [name for name in labels if name in tested["q"]]  # those with too few documents are left out
    neurons, stats = [], {}
    scores = label_scores(atlas, labels, metric, pool, signal)
    for name in labels:
        flat = torch.cat(scores[name])
        q = tested["q"][name] if tested is not None else None
        neurons += _kept(atlas.widths, flat, name, threshold, top_k, q, null)
        stats[name] = _label_stats(atlas, flat, name, metric)
    params = {
        "metric": metric, "pool": pool if metric != "prob_diff" else None, "label": label, "top_k": top_k,
        "threshold": threshold, "signal": signal if metric == "prob_diff" else "z",
        "documents": int((atlas.docpool.tokens > 0).sum()) if metric != "prob_diff" else None,
        "per_label": stats,
        "score": {"ap": "average precision of the pooled document response for the label vs the rest",
                  "auroc": "AUROC of the pooled document response for the label vs the rest",
                  "prob_diff": "P(active | label) - P(active | other labels), token level"}[metric],
    }
    return NeuronSet(f"selectivity-{metric}", model_info(atlas.meta), neurons, params, params["signal"],
                     tested["block"] if tested is not None else None, list(labels))


def _kept(widths: list[int], flat: torch.Tensor, name: str, threshold, top_k, q, null) -> list[Neuron]:
    """One label's kept neurons: valid, above the threshold, q below the FDR, the top k by score."""
    layer_of = torch.cat([torch.full((width,), i) for i, width in enumerate(widths)])
    index_of = torch.cat([torch.arange(width) for width in widths])
    valid = ~flat.isnan()
    if threshold is not None:
        valid &= flat >= threshold
    if q is not None:
        valid &= q < null.fdr
    candidates = valid.nonzero().flatten()
    order = candidates[flat[candidates].argsort(descending=True, stable=True)]
    if top_k is not None:
        order = order[:top_k]
    return [Neuron(int(layer_of[i]), int(index_of[i]), float(flat[i]), name,
                   None if q is None else float(q[i])) for i in order.tolist()]


def _label_stats(atlas, flat: torch.Tensor, name: str, metric: str) -> dict:
    finite = flat[~flat.isnan()]
    stats = {"max": float(finite.max()) if len(finite) else None,
             "median": float(finite.median()) if len(finite) else None}
    if metric != "prob_diff":
        stats["documents"] = sample_counts(atlas).get(name, 0)
        stats["chance"] = stats["documents"] / int((atlas.docpool.tokens > 0).sum())
    return stats


def selectivity_null(atlas, labels: list[str], metric: str, pool: str, options: NullOptions, asked=()) -> dict:
    """{"q": {label: (N,) BH q}, "block": the set's null}: the metric again on shuffled sample labels.
    Labels with fewer than ``min_docs`` sampled documents are left out (no q), or refused when ``asked`` names them.

    AP and AUROC shuffle the labels of the atlas's document sample. prob_diff is token level and the
    atlas keeps only per-label token sums, so its neurons are tested at document level instead: the
    AUROC of the document mean of z, real sample labels against shuffled ones.
    """
    if atlas.docpool is None or len(atlas.docpool) == 0:
        raise NeuronAtlasError("the permutation null needs the atlas's document sample (profile with --doc-sample N); "
                               "pass --no-null to skip it")
    counts = sample_counts(atlas)
    total = sum(counts.values())
    labels, refused = supported_labels({name: counts.get(name, 0) for name in labels}, options.min_docs,
                                       "documents in the atlas's sample", asked=asked, total=total)
    test_metric, test_pool = (metric, pool) if metric != "prob_diff" else ("auroc", "mean")
    result = docpool_null(atlas, labels, test_metric, test_pool, options)
    per_label = {name: {"best": best(result["real"][name]), "null_best": result["null_best"][name],
                        "chance": counts[name] / total if test_metric == "ap" else 0.5} for name in labels}
    shuffles = "the document labels of the atlas's document sample"
    if metric == "prob_diff":
        shuffles += " (tested by the AUROC of each document's mean z)"
    block = null_block(f"selectivity-{test_metric}", shuffles, result["permutations"], options, per_label,
                       refused=refused)
    return {"q": q_values(result["p"]), "block": block}
