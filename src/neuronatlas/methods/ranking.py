"""Average precision and AUROC of many score columns at once, for one or many boolean targets.

Each column of scores (R rows, C columns) is sorted once (:class:`Ranking`); that ranking serves
every label and every shuffle of the labels, so a permutation null costs one pass over the hits,
not another sort. Same values as ``sklearn.metrics.average_precision_score`` / ``roc_auc_score``.
"""

from __future__ import annotations

import torch


class Ranking:
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


def ranked_average_precision(ranking: Ranking, positive: torch.Tensor) -> torch.Tensor:
    """(C,) float64 AP of each ranked column for the boolean ``positive`` (R,); NaN without positives."""
    total = int(positive.sum())
    if total == 0:
        return torch.full((ranking.columns,), float("nan"), dtype=torch.float64)
    hits = ranking.hits(positive)
    precision = hits.cumsum(0) / torch.arange(1, ranking.rows + 1, dtype=torch.float64)[:, None]
    precision_at_end = precision.gather(0, ranking.group_end)  # a tie group shares the precision at its last row
    return (hits * precision_at_end).sum(0) / total


def ranked_auroc(ranking: Ranking, positive: torch.Tensor) -> torch.Tensor:
    """(C,) float64 AUROC of each ranked column (Mann-Whitney, ties one half); NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = ranking.rows - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((ranking.columns,), float("nan"), dtype=torch.float64)
    # descending rows gs..ge hold ascending ranks R - ge .. R - gs (1-based): their mean for the tie group
    mean_rank = ranking.rows - (ranking.group_start + ranking.group_end).double() / 2
    rank_sum = (ranking.hits(positive) * mean_rank).sum(0)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


SCORERS = {"ap": ranked_average_precision, "auroc": ranked_auroc}
CHUNK_ELEMENTS = 1 << 24  # scores sorted at once (rows x columns)


def column_scores(matrices, targets: dict, metric: str = "ap") -> dict:
    """{key: (N,) float64 score of every column} for each boolean target (R,) of ``targets``;
    ``matrices`` yields (R, D_i) blocks (e.g. one per layer), concatenated in order into N columns.
    Each block is ranked once, in chunks of columns, for all targets."""
    score_fn = SCORERS[metric]
    out = {key: [] for key in targets}
    for matrix in matrices:
        chunk = max(1, CHUNK_ELEMENTS // max(len(matrix), 1))
        for start in range(0, matrix.shape[1], chunk):
            ranking = Ranking(matrix[:, start : start + chunk])
            for key, positive in targets.items():
                out[key].append(score_fn(ranking, positive))
    return {key: torch.cat(parts) for key, parts in out.items()}
