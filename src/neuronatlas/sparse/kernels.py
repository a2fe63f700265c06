"""FFN kernels that skip work, on weights laid out so that only the kept bytes are read.

Batch-1 decode is memory-bound: the time of a projection is the bytes of weight it reads. So:

- fixed masks are compacted once into smaller dense weights (``compact_rows``/``compact_columns``)
  and run through the ordinary ``F.linear``;
- per-token masks on the *input* of a projection (TEAL, WINA) read only the rows of the
  transposed weight Wᵀ (in, out) of the kept input channels, as a weighted ``embedding_bag``
  (``sparse_input_matvec``); per-token ``index_select`` of weight rows copies them and was
  3-4x slower than dense;
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


def sparse_input_matvec(x: torch.Tensor, weight_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x * mask) @ weight_t`` for one token, reading only the kept rows of ``weight_t``.

    x, mask: (in,); weight_t: (in, out) row-major, so row i holds input channel i's weights.
    Returns (out,). One weighted bag: the rows are summed in one pass without being copied.
    """
    kept = mask.nonzero().squeeze(1)  # (k,)
    if kept.numel() == 0:
        return weight_t.new_zeros(weight_t.shape[1])
    summed = F.embedding_bag(kept[None], weight_t, mode="sum", per_sample_weights=x[kept][None].to(weight_t.dtype))
    return summed[0]


def masked_input_matmul(x: torch.Tensor, weight_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x * mask) @ weight_t`` for many tokens: x, mask (N, in); the reference the kernel must equal."""
    return (x * mask).to(weight_t.dtype) @ weight_t


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
