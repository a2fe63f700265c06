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

import torch

UID_POS_BITS = 24  # positions within a window stay below 2**24


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

    def update(self, layer: int, values: torch.Tensor, labels: torch.Tensor, uids: torch.Tensor) -> None:
        """Add N tokens of one layer: values (N, D), labels (N,) label indices, uids (N,) ascending."""
        values = values.float()
        self._update_moments(layer, values, labels)
        if self.hist_edges is not None:
            self._update_hist(layer, values)
        if self.top_k:
            self._update_top(layer, values, uids)

    def _update_moments(self, layer: int, values: torch.Tensor, labels: torch.Tensor) -> None:
        t = self.tensors
        active = (values > self.threshold).float()
        present = torch.unique(labels)
        if len(present) == 1:
            label = int(present[0])
            t[f"active.{layer}"][label] += active.sum(0).long()
            t[f"sum.{layer}"][label] += values.sum(0, dtype=torch.float64)
            t[f"sumsq.{layer}"][label] += (values * values).sum(0, dtype=torch.float64)
            torch.minimum(t[f"min.{layer}"][label], values.amin(0), out=t[f"min.{layer}"][label])
            torch.maximum(t[f"max.{layer}"][label], values.amax(0), out=t[f"max.{layer}"][label])
            return
        # Several labels in the batch: one-hot (U, N) @ (N, D) sums each label's rows at once.
        onehot = (labels[None, :] == present[:, None]).float()  # (U, N)
        t[f"active.{layer}"][present] += (onehot @ active).round().long()
        t[f"sum.{layer}"][present] += (onehot.double() @ values.double())
        t[f"sumsq.{layer}"][present] += (onehot.double() @ (values * values).double())
        for row, label in enumerate(present.tolist()):
            mine = onehot[row].bool()
            torch.minimum(t[f"min.{layer}"][label], values[mine].amin(0), out=t[f"min.{layer}"][label])
            torch.maximum(t[f"max.{layer}"][label], values[mine].amax(0), out=t[f"max.{layer}"][label])

    def _update_hist(self, layer: int, values: torch.Tensor) -> None:
        hist = self.tensors[f"hist.{layer}"]  # (D, bins)
        width, bins = hist.shape
        index = torch.bucketize(values, self.hist_edges, right=True)  # (N, D) in [0, bins)
        index += torch.arange(width, device=values.device) * bins
        hist.view(-1).add_(torch.bincount(index.view(-1), minlength=width * bins))

    def _update_top(self, layer: int, values: torch.Tensor, uids: torch.Tensor) -> None:
        top_values, top_rows = batch_topk(values, self.top_k)  # (k', D) each
        batch_uid = uids[top_rows]  # (k', D)
        merged_values, merged_uid = merge_topk(
            self.tensors[f"top_values.{layer}"], self.tensors[f"top_uid.{layer}"],
            top_values.T, batch_uid.T, self.top_k,
        )
        self.tensors[f"top_values.{layer}"] = merged_values
        self.tensors[f"top_uid.{layer}"] = merged_uid

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
