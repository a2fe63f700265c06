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

METRICS = ("ap", "auroc", "prob_diff")
POOLS = ("mean", "max")
DEFAULT_TOP_K = 50
_CHUNK_ELEMENTS = 1 << 24  # scores sorted at once (docs x neurons)


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AP of each column of ``scores`` (R, C) as a score for the boolean ``positive`` (R,); (C,) float64.

    sklearn's definition: sort by score, descending; at each distinct score the precision of all
    documents scoring at least that much, weighted by the recall it adds.
    """
    return _average_precision(_Ranking(scores), positive)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of each column of ``scores`` (R, C) for ``positive`` (R,); (C,) float64.

    Mann-Whitney: (sum of the positives' ranks − P(P+1)/2) / (P·N), tied scores taking their mean rank.
    """
    return _auroc(_Ranking(scores), positive)


class _Ranking:
    """Each column of scores (R, C) sorted once, descending, with the tie groups: shared by all labels."""

    def __init__(self, scores: torch.Tensor):
        rows = scores.shape[0]
        sorted_scores, self.order = scores.sort(dim=0, descending=True, stable=True)  # (R, C)
        index = torch.arange(rows)[:, None].expand_as(sorted_scores)
        same_as_next = sorted_scores[:-1] == sorted_scores[1:]  # (R - 1, C)
        starts = torch.ones_like(sorted_scores, dtype=torch.bool)
        starts[1:] = ~same_as_next
        ends = torch.ones_like(sorted_scores, dtype=torch.bool)
        ends[:-1] = ~same_as_next
        self.group_start = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
        self.group_end = torch.where(ends, index, torch.full_like(index, rows)).flip(0).cummin(0).values.flip(0)
        self.rows, self.columns = rows, scores.shape[1]

    def hits(self, positive: torch.Tensor) -> torch.Tensor:
        return positive.to(torch.float64)[self.order]  # (R, C) 1 where the document at that rank is positive


def _average_precision(ranking: _Ranking, positive: torch.Tensor) -> torch.Tensor:
    total = int(positive.sum())
    if total == 0:
        return torch.full((ranking.columns,), float("nan"), dtype=torch.float64)
    hits = ranking.hits(positive)
    precision = hits.cumsum(0) / torch.arange(1, ranking.rows + 1, dtype=torch.float64)[:, None]
    precision_at_end = precision.gather(0, ranking.group_end)  # a tie group shares the precision at its last row
    return (hits * precision_at_end).sum(0) / total


def _auroc(ranking: _Ranking, positive: torch.Tensor) -> torch.Tensor:
    n_pos = int(positive.sum())
    n_neg = ranking.rows - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((ranking.columns,), float("nan"), dtype=torch.float64)
    # descending rows gs..ge hold ascending ranks R - ge .. R - gs (1-based): their mean for the tie group
    mean_rank = ranking.rows - (ranking.group_start + ranking.group_end).double() / 2
    rank_sum = (ranking.hits(positive) * mean_rank).sum(0)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def selectivity_scores(atlas, label: str, metric: str = "ap", pool: str = "mean", signal: str = "z") -> list[torch.Tensor]:
    """Per layer, (D,) float64 scores of every neuron for ``label`` against the other labels."""
    return label_scores(atlas, [label], metric, pool, signal)[label]


def label_scores(atlas, labels: list[str], metric: str = "ap", pool: str = "mean",
                 signal: str = "z") -> dict[str, list[torch.Tensor]]:
    """{label: per layer (D,) float64 scores, one label against the rest}; one sort per neuron for all labels."""
    for label in labels:
        _check(atlas, metric, pool, label)
    if metric == "prob_diff":
        return {label: _prob_diff(atlas, label, signal) for label in labels}
    documents = atlas.docpool
    rows = torch.from_numpy(documents.tokens > 0)
    kept_labels = [x for x, keep in zip(documents.labels, rows.tolist()) if keep]
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
    score_fn = _average_precision if metric == "ap" else _auroc
    out = {label: [] for label in labels}
    for layer in range(atlas.num_layers):
        matrix = torch.from_numpy(documents.matrix(pool, layer))[rows]  # (R, D) float32
        chunk = max(1, _CHUNK_ELEMENTS // max(len(matrix), 1))
        parts = {label: [] for label in labels}
        for start in range(0, matrix.shape[1], chunk):
            ranking = _Ranking(matrix[:, start : start + chunk])
            for label in labels:
                parts[label].append(score_fn(ranking, positives[label]))
        for label in labels:
            out[label].append(torch.cat(parts[label]))
    return out


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
                   top_k: int | None = None, threshold: float | None = None, signal: str = "z") -> NeuronSet:
    """The neurons most selective for each label (or just ``label``), one against the rest.

    Keeps per label the ``top_k`` highest scores (default 50 when no ``threshold`` is given), or every
    neuron scoring at least ``threshold``, or with both the top_k among those. ``signal`` applies to
    prob_diff only (the document sample holds z). A neuron may appear under several labels.
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
    neurons, stats = [], {}
    scores = label_scores(atlas, labels, metric, pool, signal)
    for name in labels:
        per_layer = scores[name]
        flat = torch.cat(per_layer)
        layer_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(per_layer)])
        index_of = torch.cat([torch.arange(len(s)) for s in per_layer])
        valid = ~flat.isnan()
        if threshold is not None:
            valid &= flat >= threshold
        candidates = valid.nonzero().flatten()
        order = candidates[flat[candidates].argsort(descending=True, stable=True)]
        if top_k is not None:
            order = order[:top_k]
        neurons += [Neuron(int(layer_of[i]), int(index_of[i]), float(flat[i]), name) for i in order.tolist()]
        finite = flat[~flat.isnan()]
        stats[name] = {"max": float(finite.max()) if len(finite) else None,
                       "median": float(finite.median()) if len(finite) else None}
        if metric != "prob_diff":
            sample = atlas.docpool.labels
            stats[name]["documents"] = sum(1 for x, t in zip(sample, atlas.docpool.tokens) if x == name and t > 0)
            stats[name]["chance"] = stats[name]["documents"] / int((atlas.docpool.tokens > 0).sum())
    params = {
        "metric": metric, "pool": pool if metric != "prob_diff" else None, "label": label, "top_k": top_k,
        "threshold": threshold, "signal": signal if metric == "prob_diff" else "z",
        "documents": int((atlas.docpool.tokens > 0).sum()) if metric != "prob_diff" else None,
        "per_label": stats,
        "score": {"ap": "average precision of the pooled document response for the label vs the rest",
                  "auroc": "AUROC of the pooled document response for the label vs the rest",
                  "prob_diff": "P(active | label) - P(active | other labels), token level"}[metric],
    }
    return NeuronSet(f"selectivity-{metric}", model_info(atlas.meta), neurons, params)
