"""A decode step's thresholded projections on a CPU in float32, as one compiled call per input group.

For a few tokens x (B, in), a threshold and optional per-channel scales (WINA), the kernel keeps
channel i of token b when ``|x[b, i]| * scale[i] > threshold`` and sums ``x[b, i] * table[i]`` over
the kept rows of the (in, out) table: only those rows are read. It does in one call what the torch
path does in six (abs, compare, nonzero, gather, ``embedding_bag``, sum of pieces), whose fixed cost
(~70 µs) was more than a dense product of SmolLM2's 576 x 576 projections (17 µs): there TEAL's
decode ran slower than dense. The sum reads four rows a pass (the accumulator is loaded and
stored once per four rows); when the rows read are many, each token's kept rows are split into as
many pieces as threads, summed into partial outputs, then added up.

When the tokens' kept rows together outnumber ``limit`` (the table's rows: batched decode at low
sparsity) nothing is summed and the caller takes the masked dense product, which reads fewer bytes.

:func:`kept_row_products` is the other side, CATS's up projection: for each token the dot products
of the kept *output* rows of a (out, in) weight with x, 0 for the others, reading only those rows.
:func:`row_products` does every row: the compacted weights of hot neurons and CoreInfer. For a
decode step's few tokens it beats torch's matrix-vector product on weights streamed from memory
(SmolLM2's compacted 768 x 576 at one token: 117 µs against 189 µs). It reads each row once for
all the tokens, but its dot products do not block for the cache as a matrix product does: from
about 8 tokens torch's product is as fast (``MAX_PRODUCT_TOKENS``).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch


def supports(table: torch.Tensor) -> bool:
    """Whether the kernel can run on ``table``: a contiguous float32 tensor on the CPU."""
    return table.device.type == "cpu" and table.dtype == torch.float32 and table.is_contiguous()


PARALLEL_FROM = 1 << 16  # weights read (kept rows x out) from which the sum is split over threads:
# below, waking the other threads (~8 µs) costs more than it saves. In a decode step the rows come
# from memory, not cache (the step streams every weight), and a 576 x 576 table at 50% (166k weights)
# took ~100 µs alone: from 2^16 instead of 2^18, SmolLM2's TEAL 50% decode on 2 threads went from
# 1.07-1.11x to 1.17-1.19x dense (2^15 and 2^17 the same within noise)


def thresholded_rows(x: torch.Tensor, threshold: float, scale: torch.Tensor | None, table: torch.Tensor,
                     limit: int) -> torch.Tensor | None:
    """(B, out): token b's sum of ``x[b, i] * table[i]`` over the channels i it keeps, x (B, in), table
    (in, out); None (nothing computed) when the tokens keep more than ``limit`` rows together."""
    values = _as_numpy(x)
    weights = _ONES if scale is None else scale.float().contiguous().numpy()
    out = np.empty((len(values), table.shape[1]), np.float32)
    kept, counts = np.empty(values.shape, np.int64), np.zeros(len(values), np.int64)
    pieces = torch.get_num_threads()
    done = _serial_rows(values, np.float32(threshold), weights, scale is not None, table.numpy(), limit,
                        PARALLEL_FROM if pieces > 1 else np.iinfo(np.int64).max, kept, counts, out)
    if done == TOO_MANY:
        return None
    if done == TOO_LARGE:
        _match_numba_threads(pieces)
        _parallel_rows(values, kept, counts, table.numpy(), pieces, out)
    return torch.from_numpy(out)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """x as float32 numpy: a decode step's x is float32 and contiguous, so .numpy() alone (~2 µs a
    call less in a step, 200 calls)."""
    if x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        return x.numpy()
    return x.detach().float().contiguous().numpy()


_SET = threading.local()  # the numba thread count this module last set on the calling thread


def _match_numba_threads(pieces: int) -> None:
    """numba's threads (per calling thread) as torch's, set only when those change: asking numba
    each call cost ~4 µs in a decode step (2% of SmolLM2's on 2 threads)."""
    if getattr(_SET, "pieces", None) != pieces:
        numba.set_num_threads(min(pieces, numba.config.NUMBA_NUM_THREADS))
        _SET.pieces = pieces


_ONES = np.ones(1, np.float32)  # the scales of TEAL (none); WINA passes its column norms
DONE, TOO_MANY, TOO_LARGE = 0, 1, 2


@numba.njit(nogil=True, cache=True)
def _serial_rows(values, threshold, weights, weighted, table, limit, parallel_from, kept, counts, out):  # pragma: no cover (compiled)
    """Each token's kept rows into ``kept``/``counts``; then their sums into ``out`` on this thread
    (DONE), or nothing when they are more than ``limit`` rows (TOO_MANY) or at least
    ``parallel_from`` weights (TOO_LARGE: for :func:`_parallel_rows`)."""
    for b in range(values.shape[0]):
        for i in range(values.shape[1]):
            if abs(values[b, i]) * (weights[i] if weighted else np.float32(1)) > threshold:
                kept[b, counts[b]] = i
                counts[b] += 1
    if counts.sum() > limit:
        return TOO_MANY
    if counts.sum() * table.shape[1] >= parallel_from:
        return TOO_LARGE
    for b in range(values.shape[0]):
        out[b] = 0
        _accumulate(values[b], kept[b], 0, counts[b], table, out[b])
    return DONE


@numba.njit(parallel=True, nogil=True, cache=True)
def _parallel_rows(values, kept, counts, table, pieces, out):  # pragma: no cover (compiled)
    """The sums of :func:`_serial_rows`, each token's kept rows split into ``pieces`` threads' partial sums."""
    tokens = values.shape[0]
    partial = np.zeros((tokens * pieces, table.shape[1]), np.float32)
    for task in numba.prange(tokens * pieces):
        b, piece = task // pieces, task % pieces
        _accumulate(values[b], kept[b], counts[b] * piece // pieces, counts[b] * (piece + 1) // pieces, table, partial[task])
    for b in range(tokens):
        out[b] = partial[b * pieces]
        for piece in range(1, pieces):
            out[b] += partial[b * pieces + piece]


@numba.njit(inline="always", fastmath=True)
def _accumulate(values, kept, start, stop, table, accumulated):  # pragma: no cover (compiled)
    """accumulated (out,) += values[i] * table[i] for the kept rows i = kept[start:stop], four rows
    a pass so that the accumulator is loaded and stored once per four rows read."""
    r = start
    while r + 4 <= stop:
        i0, i1, i2, i3 = kept[r], kept[r + 1], kept[r + 2], kept[r + 3]
        w0, w1, w2, w3 = values[i0], values[i1], values[i2], values[i3]
        row0, row1, row2, row3 = table[i0], table[i1], table[i2], table[i3]
        for c in range(table.shape[1]):
            accumulated[c] += w0 * row0[c] + w1 * row1[c] + w2 * row2[c] + w3 * row3[c]
        r += 4
    for r in range(r, stop):
        row, weight = table[kept[r]], values[kept[r]]
        for c in range(table.shape[1]):
            accumulated[c] += weight * row[c]


# ---- kept output rows (CATS: the up projection's rows of the neurons the gate keeps) ----


def kept_row_products(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, limit: int) -> torch.Tensor | None:
    """(B, R): ``weight[r] · x[b]`` where ``keep[b, r]``, else 0, reading only the kept rows of the
    (R, in) ``weight``; x (B, in), keep (B, R) bool. None (nothing computed) when the tokens keep
    more than ``limit`` rows together (the dense product then reads fewer bytes)."""
    kept = int(keep.sum())
    if kept > limit:
        return None
    return _products(x, weight, keep.contiguous().numpy(), kept)


MAX_PRODUCT_TOKENS = 4  # row_products' tokens at most: at 8 it was 0.9-1.3x torch's, at 16 0.75-1x
MIN_PRODUCT_WEIGHTS = 1 << 16  # and its weights at least: a smaller weight sits in the cache, where the call's
# fixed cost rules (192 x 128: 5.8 µs against torch's 4.2); from 384 x 256 on it is 1.0-1.1x warm, 2-2.7x cold


def products_pay(weight: torch.Tensor | None) -> bool:
    """Whether :func:`row_products` beats ``F.linear`` on ``weight`` for a decode step's few tokens."""
    return weight is not None and supports(weight) and weight.numel() >= MIN_PRODUCT_WEIGHTS


def row_products(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, R) = x @ weightᵀ, x (B, in), weight (R, in) contiguous float32 on the CPU: every row's
    dot products with the B tokens, each row read once."""
    return _products(x, weight, None, weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., in) of a few tokens, by :func:`row_products`."""
    out = row_products(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _products(x: torch.Tensor, weight: torch.Tensor, keep: np.ndarray | None, kept: int) -> torch.Tensor:
    values = _as_numpy(x)
    out = np.zeros((len(values), weight.shape[0]), np.float32)
    mask = _ALL if keep is None else keep
    pieces = torch.get_num_threads()
    if pieces > 1 and kept * weight.shape[1] >= PARALLEL_FROM:
        _match_numba_threads(pieces)
        _parallel_products(values, weight.numpy(), mask, keep is not None, out)
    else:
        _serial_products(values, weight.numpy(), mask, keep is not None, out)
    return torch.from_numpy(out)


_ALL = np.ones((1, 1), np.bool_)  # the mask of row_products (not read: every row is kept)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _serial_products(values, weight, keep, masked, out):  # pragma: no cover (compiled)
    for r in range(weight.shape[0]):
        for b in range(values.shape[0]):
            if not masked or keep[b, r]:
                out[b, r] = _dot(weight[r], values[b])


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _parallel_products(values, weight, keep, masked, out):  # pragma: no cover (compiled)
    for r in numba.prange(weight.shape[0]):
        for b in range(values.shape[0]):
            if not masked or keep[b, r]:
                out[b, r] = _dot(weight[r], values[b])


@numba.njit(inline="always", fastmath=True)
def _dot(row, x):  # pragma: no cover (compiled)
    total = np.float32(0)
    for i in range(row.shape[0]):
        total += row[i] * x[i]
    return total
