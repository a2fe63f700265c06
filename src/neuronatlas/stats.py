"""Streaming per-neuron statistics that merge exactly across batches, files and processes.

One :class:`SignalStats` holds, for one signal (``z`` or the gate ``g``) and every layer, per
label: times active, sum, sum of squares, min and max; and optionally, over all labels, a
histogram on fixed bin edges and the top-k exemplars. Memory is O(layers x neurons x (labels +
bins + k)), whatever the corpus length. Sums are kept in float64, counts in int64.

Exemplars are ordered by (activation desc, uid asc) where ``uid = seq << 24 | pos`` locates a
token (window ``seq``, position ``pos``): ties are broken the same way whatever the batching, so
merged and sharded runs keep the very same exemplars.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

UID_POS_BITS = 24  # positions within a window stay below 2**24
_BLOCK_ELEMENTS = 2**18  # moments are reduced over blocks of rows of about 1 MiB, to stay in cache
_MAX_RUNS = 64  # more runs of one label than this in a batch: group the rows by label first
_MAX_CANDIDATES = 2  # sparse exemplar merge while a batch has at most this x k candidates per neuron on average


def default_hist_edges() -> torch.Tensor:
    """63 fixed edges → 64 bins: 0, ±10**[-3, 2] log-spaced, and two open-ended outer bins."""
    positive = torch.logspace(-3, 2, 31, dtype=torch.float64)
    return torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive]).float()


def make_uid(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (seq.long() << UID_POS_BITS) | pos.long()


def split_uid(uid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return uid >> UID_POS_BITS, uid & ((1 << UID_POS_BITS) - 1)


class SignalStats:
    """Statistics of one signal over ``widths[l]`` neurons per layer and ``num_labels`` labels."""

    FIELDS = ("active", "sum", "sumsq", "min", "max")

    def __init__(
        self,
        widths: list[int],
        num_labels: int,
        threshold: float = 0.0,
        hist_edges: torch.Tensor | None = None,
        top_k: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.widths = list(widths)
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.top_k = int(top_k)
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
            if self.top_k:
                self.tensors[f"top_values.{layer}"] = torch.full((width, self.top_k), float("-inf"), device=device)
                self.tensors[f"top_uid.{layer}"] = torch.full((width, self.top_k), -1, dtype=torch.int64, device=device)

    # ---- updating ---------------------------------------------------------------------------
    #
    # One update sees N x D activations (e.g. 1024 tokens x 2816 neurons) once per layer and signal,
    # so every pass over them counts: the moments are reduced in cache-sized blocks of rows, the
    # histogram looks bins up in a table instead of a binary search, and the exemplars only look
    # at the tokens that can still beat a neuron's k-th kept exemplar.

    def update(self, layer: int, values: torch.Tensor, labels: torch.Tensor, uids: torch.Tensor) -> None:
        """Add N tokens of one layer: values (N, D), labels (N,) label indices, uids (N,) ascending."""
        values = values.float().contiguous()  # no copy for contiguous float32
        if not len(values):
            return
        with _one_cpu_thread(values.device):
            self._update_moments(layer, values, labels)
            if self.hist_edges is not None:
                self._update_hist(layer, values)
            if self.top_k:
                self._update_top(layer, values, uids)

    def _update_moments(self, layer: int, values: torch.Tensor, labels: torch.Tensor) -> None:
        t = self.tensors
        active, total, total_sq = t[f"active.{layer}"], t[f"sum.{layer}"], t[f"sumsq.{layer}"]
        low, high = t[f"min.{layer}"], t[f"max.{layer}"]
        runs = _label_runs(labels)
        if len(runs) > _MAX_RUNS:  # labels interleaved token by token: one copy groups each label's rows
            order = labels.argsort(stable=True)
            values, labels = values[order], labels[order]
            runs = _label_runs(labels)
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

    def _bucketize(self, values: torch.Tensor) -> torch.Tensor:
        """``torch.bucketize(values, hist_edges, right=True)`` as int32, mostly by a table lookup.

        The top 16 bits of a float32 (sign, exponent, 7 mantissa bits) fix an interval of values
        1/128 of a power of two wide. Most such intervals lie within one bin: a gather from a
        2**16-entry table bins those values, and bucketize the few (~1.5%) left, in intervals
        that hold an edge (or inf / nan).
        """
        if self._bucket_table is None or self._bucket_table.device != values.device:
            self._bucket_table = _bucket_table(self.hist_edges.to(values.device))
        prefix = values.view(torch.int32) >> 16  # in [-2**15, 2**15)
        prefix += 2**15
        index = self._bucket_table.index_select(0, prefix.view(-1))  # (N * D,) int32, -1: not sure
        unsure = (index < 0).nonzero().squeeze(1)
        if len(unsure):
            exact = torch.bucketize(values.view(-1).index_select(0, unsure), self.hist_edges, right=True, out_int32=True)
            index.index_copy_(0, unsure, exact)
        return index.view(values.shape)

    def _update_top(self, layer: int, values: torch.Tensor, uids: torch.Tensor) -> None:
        kept_values, kept_uid = self.tensors[f"top_values.{layer}"], self.tensors[f"top_uid.{layer}"]  # (D, k)
        if not (kept_uid[:, -1] < 0).any():  # every list is full: only tokens above its k-th can enter
            floor = _entry_floor(kept_values[:, -1], kept_uid[:, -1], uids.min())
            merged = self._merge_candidates(kept_values, kept_uid, values, uids, floor)
            if merged is not None:
                self.tensors[f"top_values.{layer}"], self.tensors[f"top_uid.{layer}"] = merged
                return
        top_values, top_rows = batch_topk(values, self.top_k)  # (k', D) each
        self.tensors[f"top_values.{layer}"], self.tensors[f"top_uid.{layer}"] = merge_topk(
            kept_values, kept_uid, top_values.T, uids[top_rows].T, self.top_k,
        )

    def _merge_candidates(self, kept_values, kept_uid, values, uids, floor):
        """Merge each neuron's tokens at or above its floor into its list; None if too many for that."""
        width, k = values.shape[1], self.top_k
        rows, neurons = (~(values < floor)).nonzero().unbind(1)  # by row; nan counts, as in topk
        if len(rows) > _MAX_CANDIDATES * k * width:  # early in a run: the dense top-k is cheaper
            return None
        if not len(rows):
            return kept_values, kept_uid
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
        new_uid = uids.new_full((len(touched), k), -1)
        new_values[slot[neurons], rank] = found
        new_uid[slot[neurons], rank] = uids[rows]
        merged_values, merged_uid = merge_topk(kept_values[touched], kept_uid[touched], new_values, new_uid, k)
        return kept_values.index_put((touched,), merged_values), kept_uid.index_put((touched,), merged_uid)

    # ---- merging and state --------------------------------------------------------------------

    def merge_(self, other: SignalStats, uid_offset: int = 0) -> SignalStats:
        """Add ``other`` into self (same widths and labels); other's uids are shifted by uid_offset."""
        for key, tensor in self.tensors.items():
            kind = key.split(".")[0]
            mine, theirs = tensor, other.tensors[key].to(tensor.device)
            if kind in ("active", "sum", "sumsq", "hist"):
                mine += theirs
            elif kind == "min":
                torch.minimum(mine, theirs, out=mine)
            elif kind == "max":
                torch.maximum(mine, theirs, out=mine)
        for layer in range(len(self.widths)) if self.top_k else ():
            other_uid = other.tensors[f"top_uid.{layer}"].to(self.tensors[f"top_uid.{layer}"].device)
            other_uid = torch.where(other_uid >= 0, other_uid + uid_offset, other_uid)
            values, uid = merge_topk(
                self.tensors[f"top_values.{layer}"], self.tensors[f"top_uid.{layer}"],
                other.tensors[f"top_values.{layer}"].to(other_uid.device), other_uid, self.top_k,
            )
            self.tensors[f"top_values.{layer}"], self.tensors[f"top_uid.{layer}"] = values, uid
        return self

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{key}": tensor.detach().cpu().contiguous() for key, tensor in self.tensors.items()}

    def load_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        for key in self.tensors:
            self.tensors[key] = state[f"{prefix}.{key}"].to(self.tensors[key].device)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the statistics of a CPU batch on one intra-op thread.

    They are some fifty memory-bound operations a layer, which gain little from more threads; but
    on a busy machine every multi-threaded operation can wait a whole scheduler slice for a
    descheduled thread (measured on 2 busy cores: 2 s a layer with 2 threads, 0.05 s with 1).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _label_runs(labels: torch.Tensor) -> list[tuple[int, int, int]]:
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
        above = column > cut[ambiguous]
        equal = column == cut[ambiguous]
        needed = k - above.sum(0)  # (C,) how many tied rows still fit
        chosen = above | (equal & (equal.cumsum(0) <= needed))  # exactly k per column
        rows = chosen.T.nonzero()[:, 1].view(len(ambiguous), k).T  # (k, C) lowest tied rows
        top_rows[:, ambiguous] = rows
        top_values[:, ambiguous] = column.gather(0, rows)
    return top_values, top_rows


def merge_topk(
    values_a: torch.Tensor, uid_a: torch.Tensor, values_b: torch.Tensor, uid_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of two candidate lists per neuron, each (D, k_a) / (D, k_b), by (value desc, uid asc).

    Empty slots carry value -inf and uid -1 and sort last.
    """
    values = torch.cat([values_a, values_b], dim=1)
    uid = torch.cat([uid_a, uid_b], dim=1)
    empty_last = torch.where(uid < 0, torch.iinfo(torch.int64).max, uid)
    by_uid = empty_last.argsort(dim=1, stable=True)
    values, uid = values.gather(1, by_uid), uid.gather(1, by_uid)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), uid.gather(1, by_value)
