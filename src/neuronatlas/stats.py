"""Streaming per-neuron statistics that merge exactly across batches, files and processes.

One :class:`SignalStats` holds, for one signal (``z`` or the gate ``g``) and every layer, per
label: times active, sum, sum of squares, min and max; and optionally, over all labels, a
histogram on fixed bin edges, the top-k exemplars and the bottom-k ones (the most negative).
Memory is O(layers x neurons x (labels + bins + k)), whatever the corpus length. Sums are kept in
float64, counts in int64.

Top exemplars are ordered by (activation desc, uid asc), bottom ones by (activation asc, uid asc),
where ``uid = seq << 24 | pos`` locates a token (window ``seq``, position ``pos``; :func:`make_uid`
and :func:`split_uid`): ties are broken the same way whatever the batching, so merged and sharded
runs keep the very same exemplars. The bottom list is the top list of -z: one code ranks both
(:meth:`SignalStats.ranked` gives a list with its values as ranked).

With a window ``radius`` R, each exemplar also carries the neuron's z at the 2R + 1 tokens around
it (``top_window`` / ``bottom_window``, (D, k, 2R + 1) float16, NaN outside its window), cut from the batch while it
is in memory (:class:`WindowSource`) and moved with its exemplar by every merge.

On a CPU an update is one pass of the numba kernels of :mod:`neuronatlas.stats_kernel` over numpy
views of these tensors; elsewhere (GPUs) torch operations; both give the same statistics.

Each field says how two partial statistics combine (:data:`REDUCTIONS`): counts and sums add,
minima and maxima reduce, exemplar lists merge by rank. :meth:`SignalStats.merge_` (files) and the
torchrun merge (:mod:`neuronatlas.profile.ranks`) both follow it.

Shape legend, used in comments across the package:

    B   windows (rows) in a batch             T   tokens per window (padded)
    N   real tokens in a batch (B x T, less padding and tokens not counted)
    L   layers                                D   neurons of one layer (d_ff)
    K   labels                                P   position buckets
    k   exemplars kept per neuron (top_k)     bins  histogram bins (len(hist_edges) + 1)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from . import stats_kernel

UID_POS_BITS = 24  # positions within a window stay below 2**24
_BLOCK_ELEMENTS = 2**18  # moments are reduced over blocks of rows of about 1 MiB, to stay in cache
_MAX_RUNS = 64  # more runs of one label than this in a batch: group the rows by label first
_MAX_CANDIDATES = 2  # sparse exemplar merge while a batch has at most this x k candidates per neuron on average
_CANDIDATES_PER_NEURON = 4  # CPU kernel: a neuron with more than this x k candidates in a batch takes a dense top-k
FLOAT16_MAX = 65504.0  # window values beyond it are clamped (the exemplar's own value is kept exactly in top_values)


def default_hist_edges() -> torch.Tensor:
    """63 fixed edges → 64 bins: 0, ±10**[-3, 2] log-spaced, and two open-ended outer bins."""
    positive = torch.logspace(-3, 2, 31, dtype=torch.float64)
    return torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive]).float()


def make_uid(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (seq.long() << UID_POS_BITS) | pos.long()


def split_uid(uid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq, pos) of each uid; an empty slot (uid -1) gives seq -1."""
    return uid >> UID_POS_BITS, uid & ((1 << UID_POS_BITS) - 1)


def uid_offset(windows: int) -> int:
    """What to add to a uid to number its window ``windows`` later (for a corpus appended after another)."""
    return windows << UID_POS_BITS


# How each field of two partial statistics combines: "sum" adds, "min"/"max" reduce element-wise,
# "top_k" merges the two exemplar lists of every neuron (merge_topk). Keys are "<field>.<layer>".
REDUCTIONS = {"active": "sum", "sum": "sum", "sumsq": "sum", "min": "min", "max": "max", "hist": "sum",
              "top_values": "top_k", "top_uid": "top_k", "top_window": "top_k",
              "bottom_values": "top_k", "bottom_uid": "top_k", "bottom_window": "top_k"}
ENDS = ("top", "bottom")  # the two exemplar lists: most positive first, most negative first
SIGN = {"top": 1.0, "bottom": -1.0}  # a list ranks sign * value, highest first
Runs = list[tuple[int, int, int]]  # (label, start, stop) of each run of equal consecutive labels


@dataclass
class WindowSource:
    """Where an update's N tokens lie in the batch's padded activations, to cut windows around exemplars."""

    rows: torch.Tensor  # (N,) each token's row in the batch
    columns: torch.Tensor  # (N,) its column in the padded batch
    real: torch.Tensor  # (B, T) bool: the tokens the model saw (a window ends where they end)
    radius: int
    z: torch.Tensor | None = None  # (B, T, D) the layer being updated

    def subset(self, tokens: torch.Tensor) -> WindowSource:
        """The source of the tokens ``tokens`` (n,) of this one's N, in that order."""
        return dataclasses.replace(self, rows=self.rows[tokens], columns=self.columns[tokens])

    def gather(self, tokens: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """(m, 2R + 1) float16: z of ``neurons`` (m,) around ``tokens`` (m,), NaN outside the window."""
        _, width, depth = self.z.shape
        offsets = torch.arange(-self.radius, self.radius + 1, device=tokens.device)
        columns = self.columns[tokens, None] + offsets  # (m, W)
        cells = (self.rows[tokens, None] * width + columns.clamp(0, width - 1))  # (m, W) flat (row, column)
        inside = (columns >= 0) & (columns < width) & self.real.view(-1)[cells]
        picked = self.z.reshape(-1)[cells * depth + neurons[:, None]].float()  # (m, W): one flat gather
        return picked.clamp_(-FLOAT16_MAX, FLOAT16_MAX).masked_fill_(~inside, float("nan")).half()


class SignalStats:
    """Statistics of one signal over ``widths[l]`` neurons per layer and ``num_labels`` labels.

    Per layer: active, sum, sumsq, min, max (K, D) one row per label; hist (D, bins),
    top_values / top_uid (D, k) and bottom_values / bottom_uid (D, bottom_k) over all labels,
    when kept. Read them with :meth:`get`.
    """

    FIELDS = ("active", "sum", "sumsq", "min", "max")  # the per-label fields: (K, D)

    def __init__(
        self,
        widths: list[int],
        num_labels: int,
        threshold: float = 0.0,
        hist_edges: torch.Tensor | None = None,
        top_k: int = 0,
        device: torch.device | str = "cpu",
        radius: int = 0,
        bottom_k: int = 0,
    ):
        self.widths = list(widths)
        self.radius = int(radius) if top_k or bottom_k else 0  # exemplar windows of 2 * radius + 1 tokens; 0 = none
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.top_k = int(top_k)
        self.bottom_k = int(bottom_k)
        self.hist_edges = None if hist_edges is None else hist_edges.to(device, torch.float32)
        self._bucket_table: torch.Tensor | None = None  # built on first use, see _bucketize
        self.tensors: dict[str, torch.Tensor] = {}
        for layer, width in enumerate(self.widths):
            shape = (num_labels, width)
            self.tensors[f"active.{layer}"] = torch.zeros(shape, dtype=torch.int64, device=device)
            self.tensors[f"sum.{layer}"] = torch.zeros(shape, dtype=torch.float64, device=device)
            self.tensors[f"sumsq.{layer}"] = torch.zeros(shape, dtype=torch.float64, device=device)
            self.tensors[f"min.{layer}"] = torch.full(shape, float("inf"), device=device)
            self.tensors[f"max.{layer}"] = torch.full(shape, float("-inf"), device=device)
            if self.hist_edges is not None:
                bins = len(self.hist_edges) + 1
                self.tensors[f"hist.{layer}"] = torch.zeros((width, bins), dtype=torch.int64, device=device)
            for end in self.ends():
                k = self.kept(end)
                self.tensors[f"{end}_values.{layer}"] = torch.full((width, k), -SIGN[end] * float("inf"), device=device)
                self.tensors[f"{end}_uid.{layer}"] = torch.full((width, k), -1, dtype=torch.int64, device=device)
                if self.radius:
                    self.tensors[f"{end}_window.{layer}"] = torch.full((width, k, 2 * self.radius + 1), float("nan"),
                                                                       dtype=torch.float16, device=device)

    def ends(self) -> tuple[str, ...]:
        """The exemplar lists kept: "top" with a top_k, "bottom" with a bottom_k."""
        return tuple(end for end in ENDS if self.kept(end))

    def kept(self, end: str) -> int:
        """How many exemplars the list ``end`` ("top" or "bottom") keeps per neuron."""
        return self.top_k if end == "top" else self.bottom_k

    # ---- updating ---------------------------------------------------------------------------
    #
    # One update sees N x D activations (e.g. 1024 tokens x 2816 neurons) once per layer and signal,
    # so every pass over them counts: the moments are reduced in cache-sized blocks of rows, the
    # histogram looks bins up in a table instead of a binary search, and the exemplars only look
    # at the tokens that can still beat a neuron's k-th kept exemplar.

    def update(self, layer: int, values: torch.Tensor, labels: torch.Tensor, uids: torch.Tensor,
               windows: WindowSource | None = None, buckets: tuple[SignalStats, torch.Tensor] | None = None) -> None:
        """Add the tokens of one layer: values (N, D), labels (N,) label indices, -1 for a token not
        counted (padding), uids (N,) ascending among the counted tokens.

        ``windows``: where to cut the exemplar windows from (NaN windows without it); ``buckets``:
        other statistics (the position buckets) and each token's bucket (N,), to add the same
        tokens' moments there grouped by bucket. On the CPU one kernel does it all
        (:mod:`neuronatlas.stats_kernel`); elsewhere torch operations, on the counted tokens.
        """
        if values.device.type == "cpu" and stats_kernel.enabled():
            self._update_fused(layer, values.float().contiguous(), labels.long().contiguous(), uids, windows, buckets)
            return
        counted = labels >= 0
        if not bool(counted.all()):
            keep = counted.nonzero().squeeze(1)
            values, labels, uids = values.index_select(0, keep), labels[keep], uids[keep]
            windows = windows.subset(keep) if windows is not None else None
            buckets = (buckets[0], buckets[1][keep]) if buckets is not None else None
        values = values.float().contiguous()  # no copy for contiguous float32
        if not len(values):
            return
        self._update_moments(layer, values, labels)
        if buckets is not None:  # grouped by bucket: one run of rows per bucket, not one per window
            other, bucket = buckets
            order = bucket.argsort(stable=True)
            other._update_moments(layer, values[order], bucket[order])
        if self.hist_edges is not None:
            self._update_hist(layer, values)
        for end in self.ends():  # the bottom list ranks -z: one negated copy of the batch
            self._update_top(layer, end, values if end == "top" else values.neg(), uids, windows)

    def _update_fused(self, layer: int, values: torch.Tensor, labels: torch.Tensor, uids: torch.Tensor,
                      windows: WindowSource | None, buckets: tuple[SignalStats, torch.Tensor] | None) -> None:
        """:meth:`update` by :func:`~neuronatlas.stats_kernel.layer_pass`: one read of the values
        for the moments, the bucket moments, the histogram and the exemplar candidates; then each
        exemplar list takes its candidates (:meth:`_enter`). Numpy views throughout: no copies."""
        array, label_array, uid_array = values.numpy(), labels.numpy(), uids.numpy()
        ends, width = self.ends(), array.shape[1]
        # (N,) the rows counted, which the exemplar lists need (the kernel itself skips label -1)
        counted = np.flatnonzero(label_array >= 0) if ends else None
        if counted is not None and not len(counted):
            return
        floors = np.empty((len(ends), width), np.float32)  # (E, D) the least value that may enter each list
        for e, end in enumerate(ends):
            stats_kernel.entry_floors(*self._list_arrays(layer, end)[:2], SIGN[end], uid_array[counted[0]], floors[e])
        cap = _CANDIDATES_PER_NEURON * max([self.kept(end) for end in ends], default=0)
        counts = np.zeros((len(ends), width), dtype=np.int64)
        rows = np.empty((len(ends), width, cap), dtype=np.int64)
        signs = np.array([SIGN[end] for end in ends], dtype=np.float32)
        t = self.tensors
        if buckets is not None:
            other, bucket = buckets
            if other.threshold != self.threshold:  # one kernel, one threshold
                raise ValueError(f"bucket statistics with threshold {other.threshold}, these with {self.threshold}")
            per_bucket = [other.tensors[f"{field}.{layer}"].numpy() for field in self.FIELDS]
            bucket = bucket.long().contiguous().numpy()
        else:
            per_bucket = [np.zeros((0, 0), t[f"{field}.{layer}"].numpy().dtype) for field in self.FIELDS]  # none
            bucket = np.zeros(0, np.int64)
        if self.hist_edges is not None:
            hist, table, edges = t[f"hist.{layer}"].numpy(), self._table().numpy(), self.hist_edges.numpy()
        else:
            hist, table, edges = np.zeros((0, 0), np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        stats_kernel.layer_pass(array, array.view(np.int32), label_array, self.threshold,
                                *[t[f"{field}.{layer}"].numpy() for field in self.FIELDS], bucket, *per_bucket,
                                hist, table, edges, signs, floors, counts, rows, stats_kernel.span_width(width))
        source = _kernel_windows(windows, len(array), self.radius) if ends else None
        for e, end in enumerate(ends):
            self._enter(layer, end, array, counted, uid_array, counts[e], rows[e], source)

    def _list_arrays(self, layer: int, end: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Numpy views of one exemplar list: values (D, k) as stored, uid (D, k), windows (D, k, W)
        as uint16 float16 bits ((0, 0, 0) without windows)."""
        t = self.tensors
        windows = (t[f"{end}_window.{layer}"].numpy().view(np.uint16) if self.radius
                   else np.zeros((0, 0, 0), np.uint16))
        return t[f"{end}_values.{layer}"].numpy(), t[f"{end}_uid.{layer}"].numpy(), windows

    def _enter(self, layer: int, end: str, values: np.ndarray, counted: np.ndarray, uids: np.ndarray,
               counts: np.ndarray, rows: np.ndarray, source: tuple) -> None:
        """Merge the candidates :func:`~neuronatlas.stats_kernel.layer_pass` found into one list (a
        neuron with too many takes the best of every counted token, :func:`~neuronatlas.stats_kernel.dense_best`)."""
        touched = np.flatnonzero(counts)  # (F,)
        if not len(touched):
            return
        many = np.flatnonzero(counts > rows.shape[1])  # (C,) too many candidates
        dense = np.full(len(counts), -1, np.int64)  # (D,) each neuron's row in the dense lists, or -1
        dense[many] = np.arange(len(many))
        ranked = stats_kernel.dense_best(values, SIGN[end], counted, many, self.kept(end))
        stats_kernel.enter_candidates(values, SIGN[end], counts, rows, dense, *ranked, touched, uids, *source,
                                      *self._list_arrays(layer, end), self.radius)

    def _update_moments(self, layer: int, values: torch.Tensor, labels: torch.Tensor) -> None:
        t = self.tensors
        active, total, total_sq = t[f"active.{layer}"], t[f"sum.{layer}"], t[f"sumsq.{layer}"]
        low, high = t[f"min.{layer}"], t[f"max.{layer}"]
        runs = label_runs(labels)
        if len(runs) > _MAX_RUNS:  # labels interleaved token by token: one copy groups each label's rows
            order = labels.argsort(stable=True)
            values, labels = values[order], labels[order]
            runs = label_runs(labels)
        block = max(1, _BLOCK_ELEMENTS // values.shape[1])
        is_active = values.new_empty((min(block, len(values)), values.shape[1]))  # 0. / 1., reused
        as_double = is_active.double()  # reused
        for label, start, stop in runs:
            for begin in range(start, stop, block):
                x = values[begin : min(begin + block, stop)]  # a view: consecutive tokens of one label
                flags = torch.gt(x, self.threshold, out=is_active[: len(x)])  # faster than a bool tensor
                active[label] += flags.sum(0).long()  # exact: counts below 2**24
                x64 = as_double[: len(x)].copy_(x)
                total[label] += x64.sum(0)
                total_sq[label] += x64.mul_(x64).sum(0)  # a float32 squared is exact in float64
                torch.minimum(low[label], x.amin(0), out=low[label])
                torch.maximum(high[label], x.amax(0), out=high[label])

    def _update_hist(self, layer: int, values: torch.Tensor) -> None:
        hist = self.tensors[f"hist.{layer}"]  # (D, bins)
        width, bins = hist.shape
        index = self._bucketize(values)  # (N, D) int32 in [0, bins)
        index += torch.arange(width, dtype=torch.int32, device=values.device) * bins
        hist.view(-1).add_(torch.bincount(index.view(-1), minlength=width * bins))

    def _table(self) -> torch.Tensor:
        """The bin lookup table of :meth:`_bucketize`, built on first use."""
        if self._bucket_table is None or self._bucket_table.device != self.hist_edges.device:
            self._bucket_table = _bucket_table(self.hist_edges)
        return self._bucket_table

    def _bucketize(self, values: torch.Tensor) -> torch.Tensor:
        """``torch.bucketize(values, hist_edges, right=True)`` as int32, mostly by a table lookup.

        The top 16 bits of a float32 (sign, exponent, 7 mantissa bits) fix an interval of values
        1/128 of a power of two wide. Most such intervals lie within one bin: a gather from a
        2**16-entry table bins those values, and bucketize the few (~1.5%) left, in intervals
        that hold an edge (or inf / nan).
        """
        prefix = values.view(torch.int32) >> 16  # in [-2**15, 2**15)
        prefix += 2**15
        index = self._table().index_select(0, prefix.view(-1))  # (N * D,) int32, -1: not sure
        unsure = (index < 0).nonzero().squeeze(1)
        if len(unsure):
            exact = torch.bucketize(values.view(-1).index_select(0, unsure), self.hist_edges, right=True, out_int32=True)
            index.index_copy_(0, unsure, exact)
        return index.view(values.shape)

    def _update_top(self, layer: int, end: str, values: torch.Tensor, uids: torch.Tensor,
                    windows: WindowSource | None) -> None:
        """Merge a batch into one exemplar list; ``values`` (N, D) as that list ranks them (bottom: -z)."""
        kept = self.ranked(layer, end)  # values, uid (D, k) [, window (D, k, W)]
        k = self.kept(end)
        if not (kept[1][:, -1] < 0).any():  # every list is full: only tokens above its k-th can enter
            floor = _entry_floor(kept[0][:, -1], kept[1][:, -1], uids.min())
            merged = self._merge_candidates(kept, values, uids, floor, windows, k)
            if merged is not None:
                self.set_ranked_(layer, end, *merged)
                return
        top_values, top_rows = batch_topk(values, k)  # (k', D) each
        neurons = torch.arange(values.shape[1], device=values.device)
        self.set_ranked_(layer, end, *self._merge_new(kept, top_values.T, uids[top_rows].T, top_rows.T, neurons,
                                                      windows, k))

    def _merge_new(self, kept, new_values, new_uid, new_rows, neurons, windows, k):
        """Merge a batch's candidates values, uid, rows (D', k') of ``neurons`` (D',) into their lists
        ``kept`` (D', k); windows are cut only for the candidates that enter (few after warm-up)."""
        values, uid, index = merge_index(kept[0], kept[1], new_values, new_uid, k)
        if not self.radius:
            return [values, uid]
        before = kept[0].shape[1]
        fresh = index >= before  # (D', k) taken from the batch
        window = kept[2].gather(1, index.clamp(max=before - 1)[:, :, None].expand(-1, -1, kept[2].shape[2]))
        if fresh.any():
            rows = new_rows.gather(1, (index - before).clamp(min=0))[fresh]
            window[fresh] = self._windows_at(windows, rows, neurons[:, None].expand_as(index)[fresh])
        return [values, uid, window]

    def _windows_at(self, windows: WindowSource | None, rows: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """(m, 2R + 1) float16 windows of tokens ``rows`` for ``neurons``; NaN without a source."""
        if windows is None:
            return torch.full((len(rows), 2 * self.radius + 1), float("nan"), dtype=torch.float16, device=rows.device)
        return windows.gather(rows, neurons)

    def _merge_candidates(self, kept, values, uids, floor, windows, k):
        """Merge each neuron's tokens at or above its floor into its list; None if too many for that."""
        width = values.shape[1]
        rows, neurons = (~(values < floor)).nonzero().unbind(1)  # by row; nan counts, as in topk
        if len(rows) > _MAX_CANDIDATES * k * width:  # early in a run: the dense top-k is cheaper
            return None
        if not len(rows):
            return kept
        found = values.view(-1).index_select(0, rows * width + neurons)
        order = found.argsort(descending=True, stable=True)  # by value desc, then row
        order = order[neurons[order].argsort(stable=True)]  # by neuron, then value desc, then row
        rows, neurons, found = rows[order], neurons[order], found[order]
        counts = torch.bincount(neurons, minlength=width)  # (D,) candidates per neuron
        rank = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[neurons]
        best = rank < k  # the k best of each neuron are all the batch can add
        rows, neurons, found, rank = rows[best], neurons[best], found[best], rank[best]
        touched = counts.nonzero().squeeze(1)  # (T,) neurons with a candidate
        slot = torch.zeros_like(counts)
        slot[touched] = torch.arange(len(touched), device=counts.device)
        new_values = values.new_full((len(touched), k), float("-inf"))  # (T, k), empty: -inf / -1
        new_uid, new_rows = uids.new_full((len(touched), k), -1), rows.new_zeros((len(touched), k))
        new_values[slot[neurons], rank] = found
        new_uid[slot[neurons], rank] = uids[rows]
        new_rows[slot[neurons], rank] = rows
        merged = self._merge_new([part[touched] for part in kept], new_values, new_uid, new_rows, touched, windows, k)
        return [whole.index_put((touched,), part) for whole, part in zip(kept, merged)]

    # ---- reading --------------------------------------------------------------------------------

    def get(self, name: str, layer: int) -> torch.Tensor:
        """One field of one layer, e.g. ``get("active", 3)`` (K, D) int64; see the class docstring."""
        return self.tensors[f"{name}.{layer}"]

    def has(self, name: str) -> bool:
        """Whether this field is kept (``hist`` needs hist edges, ``top_values`` / ``top_uid`` a top_k,
        ``bottom_values`` / ``bottom_uid`` a bottom_k)."""
        return f"{name}.0" in self.tensors

    # ---- merging and state --------------------------------------------------------------------

    def reduced(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Key, tensor and reduction ("sum", "min" or "max") of each element-wise field (see REDUCTIONS)."""
        for key, tensor in self.tensors.items():
            reduction = REDUCTIONS[key.split(".")[0]]
            if reduction != "top_k":
                yield key, tensor, reduction

    def exemplar_lists(self) -> Iterator[tuple[int, str]]:
        """(layer, end) of every exemplar list, which merges by rank (none without a top_k or bottom_k)."""
        for layer in range(len(self.widths)):
            for end in self.ends():
                yield layer, end

    def ranked(self, layer: int, end: str = "top") -> list[torch.Tensor]:
        """One exemplar list of a layer as it is ranked: values (bottom: negated), uid (D, k) [and
        window (D, k, W) with a radius], best first by (value desc, uid asc)."""
        values = self.tensors[f"{end}_values.{layer}"]
        listed = [values if end == "top" else values.neg(), self.tensors[f"{end}_uid.{layer}"]]
        return listed + ([self.tensors[f"{end}_window.{layer}"]] if self.radius else [])

    def set_ranked_(self, layer: int, end: str, values: torch.Tensor, uid: torch.Tensor,
                    window: torch.Tensor | None = None) -> None:
        """Replace one exemplar list with ranked values (bottom: negated), uid (D, k) [, window (D, k, W)]."""
        self.tensors[f"{end}_values.{layer}"] = values if end == "top" else values.neg()
        self.tensors[f"{end}_uid.{layer}"] = uid
        if self.radius:
            self.tensors[f"{end}_window.{layer}"] = window

    def merge_ranked_(self, layer: int, end: str, *candidates: torch.Tensor) -> None:
        """Merge ranked candidates values, uid (D, k') [, window (D, k', W)] into one list, keeping its k."""
        mine = self.ranked(layer, end)
        merged = merge_topk(mine, [part.to(mine[0].device) for part in candidates], self.kept(end))
        self.set_ranked_(layer, end, *merged)

    def merge_(self, other: SignalStats, uid_offset: int = 0) -> SignalStats:
        """Add ``other`` into self (same widths and labels); other's uids are shifted by uid_offset."""
        for key, mine, reduction in self.reduced():
            combine(mine, other.tensors[key].to(mine.device), reduction)
        for layer, end in self.exemplar_lists():
            if not other.kept(end):  # other kept no such list (an atlas made before bottom exemplars)
                continue
            values, other_uid, *window = other.ranked(layer, end)
            other_uid = torch.where(other_uid >= 0, other_uid + uid_offset, other_uid)
            if self.radius and not window:  # other keeps no windows: its exemplars come without
                window = [torch.full((*values.shape, 2 * self.radius + 1), float("nan"), dtype=torch.float16)]
            self.merge_ranked_(layer, end, values, other_uid, *window[: 1 if self.radius else 0])
        return self

    def drop_windows(self) -> dict[str, list[torch.Tensor]]:
        """Take the exemplar windows out (they are saved in the exemplar tables): end -> per layer (D, k, W)."""
        taken = {end: [self.tensors.pop(f"{end}_window.{layer}") for layer in range(len(self.widths))]
                 for end in self.ends()} if self.radius else {}
        self.radius = 0
        return taken

    def with_rows(self, rows: torch.Tensor, num_labels: int) -> SignalStats:
        """A copy with ``num_labels`` label rows, this one's label ``i`` at row ``rows[i]`` and the
        other rows empty (to align the labels, or position buckets, of two atlases before a merge)."""
        device = self.get("active", 0).device if self.widths else "cpu"
        spread = SignalStats(self.widths, num_labels, self.threshold, self.hist_edges, self.top_k, device, self.radius,
                             self.bottom_k)
        for key, tensor in self.tensors.items():
            if key.split(".")[0] in self.FIELDS:
                spread.tensors[key][rows.to(device)] = tensor
            else:
                spread.tensors[key] = tensor.clone()
        return spread

    def to_(self, device: torch.device | str) -> SignalStats:
        """Move every tensor (and the histogram edges) to ``device``, in place."""
        self.tensors = {key: tensor.to(device) for key, tensor in self.tensors.items()}
        if self.hist_edges is not None:
            self.hist_edges = self.hist_edges.to(device)
        return self

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{key}": tensor.detach().cpu().contiguous() for key, tensor in self.tensors.items()}

    def load_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Read the tensors of :meth:`state` (counts saved as int32 are widened again); exemplar lists
        missing from it stay empty (an atlas file keeps them in its exemplar tables)."""
        for key, tensor in self.tensors.items():
            if f"{prefix}.{key}" not in state and REDUCTIONS[key.split(".")[0]] == "top_k":
                continue
            self.tensors[key] = state[f"{prefix}.{key}"].to(tensor.device, tensor.dtype)


def _kernel_windows(windows: WindowSource | None, tokens: int, radius: int) -> tuple:
    """slots (N,), real (B * T,), columns T and z (B * T, D) float32 of ``windows`` for
    :func:`~neuronatlas.stats_kernel.enter_candidates`; without a source, every window NaN."""
    if windows is None or not radius:
        return np.zeros(tokens, np.int64), np.zeros(tokens, np.bool_), max(tokens, 1), np.zeros((tokens, 1), np.float32)
    columns = windows.real.shape[1]
    slots = (windows.rows * columns + windows.columns).numpy()
    z = windows.z.reshape(-1, windows.z.shape[-1]).float().contiguous()  # no copy for the float32 z of a profile
    return slots, windows.real.reshape(-1).numpy(), columns, z.numpy()


def auto_threads() -> int:
    """Intra-op threads for the statistics: the cores the machine's load leaves free (at least 1).

    They are some fifty memory-bound operations a layer: on free cores more threads help, but on a
    busy machine every multi-threaded operation can wait a whole scheduler slice for a descheduled
    thread (measured on 2 busy cores: 2 s a layer with 2 threads, 0.05 s with 1).
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        return 1
    return max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))


@contextmanager
def intra_op_threads(threads: int, device: torch.device) -> Iterator[None]:
    """Run the CPU work inside on ``threads`` intra-op threads, torch's and the kernels' (0 or a GPU
    device: as it is)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or threads < 1 or threads == before:
        yield
        return
    kernel_before = stats_kernel.get_threads()
    torch.set_num_threads(threads)
    stats_kernel.set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        stats_kernel.set_threads(kernel_before)


def combine(mine: torch.Tensor, theirs: torch.Tensor, reduction: str) -> None:
    """Fold ``theirs`` into ``mine`` in place by an element-wise reduction: "sum", "min" or "max"."""
    if reduction == "sum":
        mine += theirs
    elif reduction == "min":
        torch.minimum(mine, theirs, out=mine)
    else:
        torch.maximum(mine, theirs, out=mine)


def label_runs(labels: torch.Tensor) -> Runs:
    """(label, start, stop) of each run of equal consecutive labels."""
    starts = torch.cat([labels.new_zeros(1), (labels[1:] != labels[:-1]).nonzero().flatten() + 1])
    bounds = starts.tolist() + [len(labels)]
    return [(label, bounds[i], bounds[i + 1]) for i, label in enumerate(labels[starts].tolist())]


def _bucket_table(edges: torch.Tensor) -> torch.Tensor:
    """(2**16,) int32: the bin of every float32 whose top 16 bits are ``i - 2**15``, or -1 if not one."""
    prefix = torch.arange(-(2**15), 2**15, dtype=torch.int32, device=edges.device) << 16
    first, last = prefix.view(torch.float32), (prefix | 0xFFFF).view(torch.float32)  # the two ends
    bin_first = torch.bucketize(first, edges, right=True, out_int32=True)
    bin_last = torch.bucketize(last, edges, right=True, out_int32=True)
    one_bin = (bin_first == bin_last) & first.isfinite() & last.isfinite()
    return torch.where(one_bin, bin_first, -1)


def _entry_floor(last_values: torch.Tensor, last_uid: torch.Tensor, first_uid: torch.Tensor) -> torch.Tensor:
    """Per neuron with a full list, the least value a new token needs to possibly enter it.

    A token enters when it ranks above the k-th kept exemplar: a larger value, or an equal value
    and a lower uid. When every new uid is above the k-th's, an equal value is not enough.
    """
    strict = last_uid < first_uid
    return torch.where(strict, torch.nextafter(last_values, last_values.new_tensor(float("inf"))), last_values)


def batch_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of values (N, D), the k largest with ties broken by the lowest row.

    Returns values and row indices, each (min(k, N), D). ``torch.topk`` picks arbitrarily among
    equal values, so columns where a tie straddles the cut are redone exactly (rare, except for
    constant columns such as dead ReLU neurons).
    """
    n = values.shape[0]
    k = min(k, n)
    top_values, top_rows = values.topk(k, dim=0)  # (k, D)
    cut = top_values[-1]  # (D,) the k-th largest value per column
    kept_at_cut = (top_values == cut).sum(0)
    ties_at_cut = (values == cut).sum(0)
    ambiguous = (ties_at_cut > kept_at_cut).nonzero().flatten()
    if len(ambiguous):
        column = values[:, ambiguous]  # (N, C)
        above = (column > cut[ambiguous]) | column.isnan()  # NaN ranks above all, as in topk
        equal = column == cut[ambiguous]
        needed = k - above.sum(0)  # (C,) how many tied rows still fit
        chosen = above | (equal & (equal.cumsum(0) <= needed))  # exactly k per column
        rows = chosen.T.nonzero()[:, 1].view(len(ambiguous), k).T  # (k, C) lowest tied rows
        top_rows[:, ambiguous] = rows
        top_values[:, ambiguous] = column.gather(0, rows)
    return top_values, top_rows


def merge_index(values_a: torch.Tensor, uid_a: torch.Tensor, values_b: torch.Tensor, uid_b: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top k of two candidate lists per neuron, each (D, k_a) / (D, k_b), by (value desc, uid asc):
    values, uid and index (D, k), the column each came from in ``cat([a, b], dim=1)``.

    Empty slots carry value -inf and uid -1 and sort last.
    """
    values = torch.cat([values_a, values_b], dim=1)
    uid = torch.cat([uid_a, uid_b], dim=1)
    empty_last = torch.where(uid < 0, torch.iinfo(torch.int64).max, uid)
    by_uid = empty_last.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_uid).argsort(dim=1, descending=True, stable=True)[:, :k]
    index = by_uid.gather(1, by_value)
    return values.gather(1, index), uid.gather(1, index), index


def merge_topk(a: list[torch.Tensor], b: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """:func:`merge_index` of two lists [values, uid] (D, k_*), each optionally with a payload
    (D, k_*, W) (the exemplar windows) that moves with its exemplar."""
    values, uid, index = merge_index(a[0], a[1], b[0], b[1], k)
    if len(a) == 2:
        return [values, uid]
    payload = torch.cat([a[2], b[2]], dim=1)
    return [values, uid, payload.gather(1, index[:, :, None].expand(-1, -1, payload.shape[2]))]
