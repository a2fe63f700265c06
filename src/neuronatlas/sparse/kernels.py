"""FFN kernels that skip work, on weights laid out so that only the kept bytes are read.

Batch-1 decode is memory-bound: the time of a projection is the bytes of weight it reads. So:

- fixed masks are compacted once into smaller dense weights (``compact_rows``/``compact_columns``)
  and run through the ordinary ``F.linear``;
- per-token masks on the *input* of a projection (TEAL, WINA) read only the rows of the
  transposed weight Wᵀ (in, out) of the kept input channels, as a weighted ``embedding_bag``
  (``sparse_input_matvec``, ``weighted_row_sums``: the kept rows split into as many bags as
  threads); per-token ``index_select`` of weight rows copies them and was 3-4x slower than dense;
- experts are contiguous row blocks of permuted weights, run as slices (views, no copy).

``benchmarks/sparse_kernels.py`` measures every layout against dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compact_rows(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(k, in) contiguous copy of the kept rows of a (out, in) weight."""
    return weight.index_select(0, keep).contiguous()


def compact_columns(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(out, k) contiguous copy of the kept columns of a (out, in) weight."""
    return weight.index_select(1, keep).contiguous()


def sparse_input_matvec(x: torch.Tensor, weight_t: torch.Tensor, mask: torch.Tensor, pieces: int | None = None) -> torch.Tensor:
    """``(x * mask) @ weight_t`` for one token, reading only the kept rows of ``weight_t``.

    x, mask: (in,); weight_t: (in, out) row-major, so row i holds input channel i's weights.
    Returns (out,).
    """
    kept = mask.nonzero().squeeze(1)  # (k,)
    return weighted_row_sums(weight_t, [kept], [x[kept]], pieces)[0]


def weighted_row_sums(table: torch.Tensor, rows: list[torch.Tensor], weights: list[torch.Tensor],
                      pieces: int | None = None) -> torch.Tensor:
    """(G, out): group g's sum of ``weights[g][j] * table[rows[g][j]]``, rows read in place, never copied.

    table: (R, out); rows[g], weights[g]: (k_g,). One weighted ``embedding_bag`` does every group:
    ``embedding_bag`` runs one bag on one thread, so each group's rows are split into ``pieces``
    bags (default: torch's thread count) summed afterwards; with a single bag a decode step used
    one of the cores and gained 1.25x over dense instead of ~2x at 50%.
    """
    pieces = pieces or torch.get_num_threads()
    offsets, start = [], 0
    for kept in rows:
        offsets += [start + kept.numel() * piece // pieces for piece in range(pieces)]
        start += kept.numel()
    indices = rows[0] if len(rows) == 1 else torch.cat(rows)
    values = weights[0] if len(weights) == 1 else torch.cat(weights)
    summed = F.embedding_bag(indices, table, torch.tensor(offsets, device=table.device), mode="sum",
                             per_sample_weights=values.to(table.dtype))  # (G * pieces, out)
    return summed.view(len(rows), pieces, -1).sum(1)


def expert_runs(experts: list[int], bounds: list[int]) -> list[tuple[int, int]]:
    """Neuron ranges [start, stop) of sorted expert ids, adjacent experts merged into one run.

    ``bounds[e]:bounds[e + 1]`` are expert e's neurons in the permuted layout.
    """
    runs: list[tuple[int, int]] = []
    for expert in sorted(experts):
        start, stop = bounds[expert], bounds[expert + 1]
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs
