"""One layer's statistics in one pass over its activations, on the CPU (numba kernels).

The torch code of :class:`~neuronatlas.stats.SignalStats` reads a batch's (N, D) activations some
twenty times: the moments per label and again per position bucket, the histogram, the candidates
of each exemplar list, each an operation of its own with its temporaries. On a CPU those passes
cost more than the forward pass of a small model. :func:`layer_pass` reads each activation once
and does all of it, one span of neurons per task; :func:`enter_candidates` then merges the few
tokens that can enter an exemplar list into it, with their windows. The results are those of the torch code: the same counts,
minima, maxima, histograms and exemplars (ties by row), sums to float64 rounding.

Set ``NEURONATLAS_STATS_KERNEL=0`` to use the torch code on the CPU too (comparisons, debugging).
"""

from __future__ import annotations

import os

import numba
import numpy as np

SPAN = 128  # neurons per task at most: a span of a row and its accumulators stay in the L1/L2 cache
ENTER_CHUNK = 64  # neurons per task when merging candidates into the exemplar lists
DISABLE_VARIABLE = "NEURONATLAS_STATS_KERNEL"


def enabled() -> bool:
    """Whether CPU statistics use these kernels (on unless ``NEURONATLAS_STATS_KERNEL=0``)."""
    return os.environ.get(DISABLE_VARIABLE, "1") != "0"


def get_threads() -> int:
    return numba.get_num_threads()


def span_width(width: int) -> int:
    """Neurons per task for a layer of ``width``: at most SPAN, and as many tasks as a multiple of the
    kernel threads, so no thread waits on another's extra span (384 neurons on 2 threads: 4 spans
    of 96, not 3 of 128, 1.5x faster)."""
    threads = max(1, numba.get_num_threads())
    spans = threads * -(-width // (threads * SPAN))
    return max(1, -(-width // spans))


def set_threads(threads: int) -> None:
    """The calling thread's kernel threads (numba's setting is per thread, like torch's)."""
    if threads > 0:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


@numba.njit(parallel=True, nogil=True, cache=True)
def layer_pass(values, bits, labels, threshold, active, total, total_sq, low, high,
               buckets, bucket_active, bucket_total, bucket_total_sq, bucket_low, bucket_high,
               hist, table, edges, signs, floors, counts, rows, span):  # pragma: no cover (compiled)
    """Add the rows of ``values`` (M, D) float32 whose label is not -1.

    labels (M,) int64 -> moments (K, D): active int64, total / total_sq float64, low / high float32.
    buckets (M,) -> the same moments per bucket (P, D) (P = 0: none). hist (D, bins) int64 (D = 0:
    none) binned by ``table`` (2**16,) int32 on the top 16 bits of ``bits`` (the values' bit
    pattern), else by ``edges``. For each exemplar list e (signs (E,): 1 top, -1 bottom), a row
    is a candidate of neuron d when not sign * value < floors[e, d]; the first cap candidates' rows
    (ascending) go in rows[e, d] (E, D, cap), counts[e, d] counts them all (over cap: too many).

    Each task takes ``span`` neurons (:func:`span_width`) through every row, so that the row's values
    stay in cache for the four loops: the moments (vectorised), the bucket moments, the histogram,
    the candidates.
    """
    width = values.shape[1]
    with_buckets = bucket_active.shape[0] > 0
    with_hist = hist.shape[0] > 0
    for task in numba.prange((width + span - 1) // span):
        first, stop = task * span, min(width, task * span + span)
        # the span's histogram (bins, span): neighbouring neurons mostly share a bin, so one line
        counted = np.zeros((hist.shape[1], stop - first), dtype=np.int32)
        for m in range(values.shape[0]):
            label = labels[m]
            if label < 0:
                continue
            row = values[m, first:stop]
            _moments(row, threshold, active[label, first:stop], total[label, first:stop],
                     total_sq[label, first:stop], low[label, first:stop], high[label, first:stop])
            if with_buckets:
                bucket = buckets[m]
                _moments(row, threshold, bucket_active[bucket, first:stop], bucket_total[bucket, first:stop],
                         bucket_total_sq[bucket, first:stop], bucket_low[bucket, first:stop],
                         bucket_high[bucket, first:stop])
            if with_hist:
                row_bits = bits[m, first:stop]
                for j in range(stop - first):
                    index = table[(row_bits[j] >> 16) + 32768]
                    if index < 0:  # an interval that holds an edge, or inf / NaN
                        index = np.searchsorted(edges, row[j], side="right")
                    counted[index, j] += 1
            for e in range(floors.shape[0]):
                _candidates(row, m, signs[e], floors[e, first:stop], counts[e, first:stop], rows[e, first:stop])
        if with_hist:
            hist[first:stop] += counted.T


@numba.njit(inline="always")
def _moments(row, threshold, active, total, total_sq, low, high):  # pragma: no cover (compiled)
    """Add one row (n,) to one label's accumulators (n,): a loop the compiler vectorises."""
    for j in range(len(row)):
        x = row[j]
        wide = np.float64(x)
        active[j] += x > threshold
        total[j] += wide
        total_sq[j] += wide * wide
        before = low[j]
        low[j] = x if (x < before or x != x) else before  # NaN sticks, as in torch.minimum
        before = high[j]
        high[j] = x if (x > before or x != x) else before


@numba.njit(inline="always")
def _candidates(row, m, sign, floors, counts, rows):  # pragma: no cover (compiled)
    """Note row ``m`` for each neuron where not sign * value < floor (NaN is a candidate, as in
    torch.topk). A count over the whole span first, a loop the compiler vectorises: once the lists
    are full most rows hold no candidate in a span, and only those that do take the branchy loop
    (4.5x faster on tiny-llama's activations than testing 16 neurons at a time)."""
    hits = 0
    for j in range(len(row)):
        hits += not sign * row[j] < floors[j]
    if hits == 0:
        return
    cap = rows.shape[1]
    for j in range(len(row)):
        if not sign * row[j] < floors[j]:
            seen = counts[j]
            if seen < cap:
                rows[j, seen] = m
            counts[j] = seen + 1


@numba.njit(parallel=True, nogil=True, cache=True)
def pool_documents(values, slots, sums, maxes, span):  # pragma: no cover (compiled)
    """Add each row of values (M, D) float32 to its document's slot (slots (M,), -1: none): sums
    (S, D) float64, maxes (S, D) float32 (NaN sticks, as in torch.amax); ``span`` neurons a task."""
    width = values.shape[1]
    for task in numba.prange((width + span - 1) // span):
        first, stop = task * span, min(width, task * span + span)
        for m in range(values.shape[0]):
            slot = slots[m]
            if slot < 0:
                continue
            row, total, high = values[m, first:stop], sums[slot, first:stop], maxes[slot, first:stop]
            for j in range(stop - first):
                x = row[j]
                total[j] += np.float64(x)
                before = high[j]
                high[j] = x if (x > before or x != x) else before


@numba.njit(nogil=True, cache=True)
def entry_floors(kept_values, kept_uid, sign, first_uid, floors):  # pragma: no cover (compiled)
    """floors (D,): the least ranked value a token of this batch needs to enter each neuron's list
    kept_values / kept_uid (D, k) (stored; ranked by sign * value): above its last, or equal to it
    when the last's uid is above ``first_uid`` (this batch's first); -inf where the list is not full."""
    k = kept_uid.shape[1]
    for d in range(len(floors)):
        last = sign * kept_values[d, k - 1]
        if kept_uid[d, k - 1] < 0:
            floors[d] = -np.inf
        elif kept_uid[d, k - 1] < first_uid:  # an equal value would rank after it: it needs more
            floors[d] = np.nextafter(last, np.float32(np.inf))
        else:
            floors[d] = last


@numba.njit(parallel=True, nogil=True, cache=True)
def dense_best(values, sign, counted, neurons, k):  # pragma: no cover (compiled)
    """The k best rows of ``counted`` (N,) for each neuron of ``neurons`` (F,), by (sign * value
    desc, row asc), NaN first: values (F, k) float32, rows (F, k) int64, filled (F,). Row by row,
    so the values stream through the cache (a neuron at a time would read them a column at a time)."""
    best = np.empty((len(neurons), k), dtype=np.float32)
    best_rows = np.empty((len(neurons), k), dtype=np.int64)
    filled = np.zeros(len(neurons), dtype=np.int64)
    for first in numba.prange((len(neurons) + SPAN - 1) // SPAN):
        stop = min(len(neurons), first * SPAN + SPAN)
        worst = np.full(stop - first * SPAN, np.nan, dtype=np.float32)  # the k-th best once full (NaN: not yet)
        for row in counted:
            for t in range(first * SPAN, stop):
                x = sign * values[row, neurons[t]]
                if x <= worst[t - first * SPAN]:
                    continue  # a quick no: not above a full list's last (NaN goes on to the exact test)
                filled[t] = _insert(best[t], best_rows[t], filled[t], x, row)
                if filled[t] == k:
                    worst[t - first * SPAN] = best[t, k - 1]
    return best, best_rows, filled


@numba.njit(parallel=True, nogil=True, cache=True)
def enter_candidates(values, sign, counts, rows, dense, dense_values, dense_rows, dense_filled, neurons, uids,
                     slots, real, columns, z, kept_values, kept_uid, kept_windows, radius):  # pragma: no cover
    """Merge the candidates of each neuron in ``neurons`` (F,) into its exemplar list, in place.

    values (M, D) float32 of one layer; counts (D,), rows (D, cap) from :func:`layer_pass`; a neuron
    with more than cap candidates has its best from :func:`dense_best` at dense[d] (D,) in
    dense_values, dense_rows (., k), dense_filled; uids (M,) int64. The list: kept_values (D, k) float32 as stored (ranked by sign * value, best first,
    ties by lower uid, NaN first, empty slots uid -1 last), kept_uid (D, k), kept_windows (D, k,
    2 * radius + 1) uint16, float16 bits (D = 0: none). A token that enters takes its window, cut
    from the padded batch: token m sits in slot slots[m] of z (B * T, D) float32 (a window keeps
    float16 bits, clamped to +-65504: :func:`half_of`), column slots[m] % ``columns``;
    real (B * T,) bool marks the slots that hold a token; NaN outside the window.
    """
    chunks = (len(neurons) + ENTER_CHUNK - 1) // ENTER_CHUNK
    for chunk in numba.prange(chunks):
        _enter_chunk(values, sign, counts, rows, dense, dense_values, dense_rows, dense_filled,
                     neurons[chunk * ENTER_CHUNK: (chunk + 1) * ENTER_CHUNK], uids, slots, real, columns, z,
                     kept_values, kept_uid, kept_windows, radius)


@numba.njit(nogil=True)
def _enter_chunk(values, sign, counts, rows, dense, dense_values, dense_rows, dense_filled, neurons, uids, slots,
                 real, columns, z, kept_values, kept_uid, kept_windows, radius):  # pragma: no cover (compiled)
    """:func:`enter_candidates` for some of the neurons."""
    k = kept_uid.shape[1]
    with_windows = kept_windows.shape[0] > 0
    best_values = np.empty(k, dtype=np.float32)  # one neuron's k best candidates, ranked
    best_rows = np.empty(k, dtype=np.int64)
    for d in neurons:
        if dense[d] >= 0:
            filled = dense_filled[dense[d]]
            best_values[:], best_rows[:] = dense_values[dense[d]], dense_rows[dense[d]]
        else:
            filled = 0
            for row in rows[d, : counts[d]]:
                filled = _insert(best_values, best_rows, filled, sign * values[row, d], row)
        taken = i = 0  # how many new ones enter: walk the merge without moving anything
        while taken < filled and i + taken < k:
            if kept_uid[d, i] >= 0 and _ranks_before(sign * kept_values[d, i], kept_uid[d, i],
                                                     best_values[taken], uids[best_rows[taken]]):
                i += 1
            else:
                taken += 1
        # merge from the back: kept ones only move down, so each moves once and the head stays put
        i, j = k - taken - 1, taken - 1
        for slot in range(k - 1, -1, -1):
            if j < 0:
                break
            if i >= 0 and not (kept_uid[d, i] >= 0 and _ranks_before(sign * kept_values[d, i], kept_uid[d, i],
                                                                     best_values[j], uids[best_rows[j]])):
                kept_values[d, slot], kept_uid[d, slot] = kept_values[d, i], kept_uid[d, i]  # ranks after the new one
                if with_windows:
                    kept_windows[d, slot] = kept_windows[d, i]
                i -= 1
            else:
                row = best_rows[j]
                kept_values[d, slot], kept_uid[d, slot] = sign * best_values[j], uids[row]
                if with_windows:
                    _cut_window(z, real, columns, slots[row], d, radius, kept_windows[d, slot])
                j -= 1


@numba.njit(inline="always")
def _insert(best, best_rows, filled, x, row):  # pragma: no cover (compiled)
    """Insert ``x`` of ``row`` (after every row already in) into the ranked list best / best_rows
    (k,) that holds ``filled``; returns how many it holds now (at most k)."""
    k = len(best)
    if filled == k and _ranks_before(best[k - 1], 0, x, 1):
        return filled  # the list is full of better ones (an earlier row wins a tie)
    at = min(filled, k - 1)  # the insertion point: after every kept one that ranks before x
    while at > 0 and not _ranks_before(best[at - 1], 0, x, 1):
        at -= 1
    for s in range(min(filled, k - 1), at, -1):  # the ones after it move down (a full list drops its last)
        best[s], best_rows[s] = best[s - 1], best_rows[s - 1]
    best[at], best_rows[at] = x, row
    return min(filled + 1, k)


@numba.njit(inline="always")
def _ranks_before(value_a, uid_a, value_b, uid_b):  # pragma: no cover (compiled)
    """Whether (value_a, uid_a) ranks before (value_b, uid_b): value desc with NaN first, then uid asc."""
    if value_a != value_a or value_b != value_b:
        if value_a == value_a:
            return False
        if value_b == value_b:
            return True
        return uid_a < uid_b
    if value_a != value_b:
        return value_a > value_b
    return uid_a < uid_b


@numba.njit(inline="always")
def _cut_window(z, real, columns, slot, d, radius, out):  # pragma: no cover (compiled)
    """out (2R + 1,) uint16: neuron d's z (float32 (B * T, D)) around ``slot`` as float16 bits
    (:func:`half_of`), NaN outside its window."""
    column = slot % columns
    for o in range(-radius, radius + 1):
        c = column + o
        if 0 <= c < columns and real[slot + o]:
            out[o + radius] = half_of(z[slot + o, d])
        else:
            out[o + radius] = HALF_NAN


HALF_NAN = 0x7E00  # the float16 NaN: outside a window
HALF_MAX_BITS = 0x7BFF  # 65504, the largest float16: window values beyond it are clamped to it


@numba.njit(inline="always")
def half_of(x):  # pragma: no cover (compiled)
    """The float16 bits (uint16) of float32 ``x`` clamped to +-65504, rounded to nearest even, as
    ``torch.clamp(x, -65504, 65504).half()`` gives them; NaN stays NaN. Converting only the values
    cut into windows saves a conversion of every batch (a window holds 33 of them; most tokens none)."""
    bits = np.int64(np.float32(x).view(np.uint32))
    sign = (bits >> 16) & 0x8000
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    if exponent == 0xFF and mantissa:
        return np.uint16(sign | HALF_NAN)
    if exponent >= 143 or (exponent == 142 and mantissa > 0x7FE000):  # beyond 65504 (inf included): clamped
        return np.uint16(sign | HALF_MAX_BITS)
    if exponent >= 113:  # a normal float16: drop 13 mantissa bits, ties to even (a carry may raise the exponent)
        half = ((exponent - 112) << 10) | (mantissa >> 13)
        rest = mantissa & 0x1FFF
        half += rest > 0x1000 or (rest == 0x1000 and half & 1)
        return np.uint16(sign | half)
    shift = 126 - exponent  # a subnormal float16 (or zero): value = m * 2**-24, m of 10 bits
    if exponent == 0 or shift > 24:
        return np.uint16(sign)
    full = mantissa | 0x800000
    half = full >> shift
    rest, midpoint = full & ((1 << shift) - 1), 1 << (shift - 1)
    half += rest > midpoint or (rest == midpoint and half & 1)
    return np.uint16(sign | half)


@numba.njit(parallel=True, nogil=True, cache=True)
def half_bits(values, out):  # pragma: no cover (compiled)
    """out (n,) uint16: :func:`half_of` of each of values (n,) float32."""
    for i in numba.prange(len(values)):
        out[i] = half_of(values[i])
