"""Per-token activations around each exemplar, for showing and explaining a neuron.

The profile keeps, per neuron, only the activation at each top-k exemplar token. To colour the
tokens around it (and to score explanations against real per-token activations), the windows that
hold exemplars are run through the model once more at the end of a profile and, for every exemplar,
the neuron's z at up to ``radius`` tokens either side of the exemplar token is kept.

The result is a table keyed like the exemplars (layer, neuron, seq, pos) with ``window_start`` (the
position within the window of the first value) and ``window_activations`` (list<float32>); the atlas
joins it into ``exemplars.parquet``. Memory: one (exemplars, 2 * radius + 1) float32 matrix per layer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .corpus import Window, iter_batches
from .hooks import capture
from .models import ModelNeurons
from .stats import split_uid

DEFAULT_RADIUS = 16


def exemplar_windows(neurons: ModelNeurons, windows: list[Window], top_uid: list[torch.Tensor], radius: int,
                     batch_size: int, pad_id: int) -> pa.Table:
    """The activation windows of every exemplar whose window is in ``windows``.

    ``top_uid[layer]`` is the (D, k) exemplar uid matrix of the atlas (-1 = empty slot).
    """
    model = neurons.model
    device = next(model.parameters()).device
    exemplars = [_layer_exemplars(uid) for uid in top_uid]  # per layer: neuron, seq, pos (M,)
    by_seq = [torch.sort(seq, stable=True) for _neuron, seq, _pos in exemplars]  # to find a batch's exemplars
    values = [torch.full((len(e[0]), 2 * radius + 1), float("nan")) for e in exemplars]
    offsets = torch.arange(-radius, radius + 1)  # (W,)
    base = model.base_model if hasattr(model, "base_model") else model
    windows = sorted(windows, key=lambda w: w.seq)
    with torch.inference_mode():
        for batch in iter_batches(iter(windows), batch_size, pad_id, "right"):
            batch_seqs = torch.tensor([w.seq for w in batch.windows])  # (B,) ascending
            lengths = batch.attention_mask.sum(-1)  # (B,)

            def on_z(layer: int, z: torch.Tensor) -> None:
                neuron, seq, pos = exemplars[layer]
                sorted_seq, order = by_seq[layer]
                lo = int(torch.searchsorted(sorted_seq, batch_seqs[0]))
                hi = int(torch.searchsorted(sorted_seq, batch_seqs[-1], right=True))
                candidates = order[lo:hi]
                rows = torch.searchsorted(batch_seqs, seq[candidates]).clamp(max=len(batch_seqs) - 1)
                in_batch = batch_seqs[rows] == seq[candidates]  # exemplars whose window is in this batch
                here, rows = candidates[in_batch], rows[in_batch]
                if len(here) == 0:
                    return
                z = z.reshape(len(batch_seqs), -1, z.shape[-1])  # (B, T, D), left where the model runs
                at = pos[here, None] + offsets  # (m, W) positions around each exemplar
                inside = (at >= 0) & (at < lengths[rows, None])
                index = (rows[:, None], at.clamp(0, z.shape[1] - 1), neuron[here, None])
                picked = z[tuple(i.to(z.device) for i in index)].float().cpu()  # (m, W): only these leave the device
                values[layer][here] = torch.where(inside, picked, float("nan"))

            with capture(neurons, on_z):
                base(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     use_cache=False)
    return _table(exemplars, values, radius)


def _layer_exemplars(uid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filled slots of a (D, k) uid matrix, in the order of the exemplar table (neuron, rank)."""
    seq, pos = split_uid(uid)
    neuron, _rank = (seq >= 0).nonzero(as_tuple=True)
    filled = seq >= 0
    return neuron, seq[filled], pos[filled]


def _table(exemplars, values, radius: int) -> pa.Table:
    """One row per exemplar with its valid (inside the window, computed) values as a list."""
    columns = {"layer": [], "neuron": [], "seq": [], "pos": [], "window_start": [], "window_activations": []}
    for layer, ((neuron, seq, pos), matrix) in enumerate(zip(exemplars, values)):
        matrix = matrix.numpy()  # (M, W), NaN outside the window or not computed
        valid = ~np.isnan(matrix)
        computed = valid.any(axis=1)
        first = valid.argmax(axis=1)
        counts = valid.sum(axis=1)
        flat = matrix[valid].astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
        keep = np.nonzero(computed)[0]
        columns["layer"].append(np.full(len(keep), layer, np.int32))
        columns["neuron"].append(neuron.numpy()[keep].astype(np.int32))
        columns["seq"].append(seq.numpy()[keep].astype(np.int64))
        columns["pos"].append(pos.numpy()[keep].astype(np.int32))
        columns["window_start"].append((pos.numpy()[keep] - radius + first[keep]).astype(np.int32))
        columns["window_activations"].append(lists.take(pa.array(keep)))
    return pa.table({
        "layer": pa.array(np.concatenate(columns["layer"]) if columns["layer"] else [], pa.int32()),
        "neuron": pa.array(np.concatenate(columns["neuron"]) if columns["neuron"] else [], pa.int32()),
        "seq": pa.array(np.concatenate(columns["seq"]) if columns["seq"] else [], pa.int64()),
        "pos": pa.array(np.concatenate(columns["pos"]) if columns["pos"] else [], pa.int32()),
        "window_start": pa.array(np.concatenate(columns["window_start"]) if columns["window_start"] else [], pa.int32()),
        "window_activations": pa.concat_arrays(columns["window_activations"]) if columns["window_activations"]
        else pa.array([], pa.list_(pa.float32())),
    })


def windows_of(contexts: pa.Table) -> list[Window]:
    """The corpus windows stored in an atlas's contexts table, in seq order."""
    seqs, docs, labels = contexts["seq"].to_pylist(), contexts["doc"].to_pylist(), contexts["label"].to_pylist()
    starts, ids = contexts["start"].to_pylist(), contexts["token_ids"].to_pylist()
    return [Window(seq=s, doc=d, label=l, start=st, input_ids=i) for s, d, l, st, i in zip(seqs, docs, labels, starts, ids)]



def neuron_exemplars(atlas, layer: int, neuron: int) -> list[dict]:
    """One neuron's exemplars, best first, each with the tokens around it and their activations.

    Each dict: activation, seq, pos, doc, label, token_ids, tokens (strings), activations (z per
    token, None where not recorded) and focus (the exemplar token's index in ``tokens``).
    """
    table = _exemplar_rows(atlas, layer, neuron)
    contexts = {} if atlas.contexts is None else dict(zip(atlas.contexts["seq"].to_pylist(), atlas.contexts["token_ids"].to_pylist()))
    strings = {} if atlas.vocab is None else dict(zip(atlas.vocab["id"].to_pylist(), atlas.vocab["token"].to_pylist()))
    out = []
    for row in table.sort_by("rank").to_pylist():
        ids = contexts.get(row["seq"], [])
        start = row.get("window_start")
        values = row.get("window_activations")
        if start is None or values is None:  # no recorded window: the exemplar token alone is known
            start, values = row["pos"], [row["activation"]]
        lo, hi = max(start, 0), min(start + len(values), len(ids))
        out.append({
            "activation": row["activation"], "seq": row["seq"], "pos": row["pos"], "doc": row.get("doc"),
            "label": row.get("label"), "token_ids": ids[lo:hi], "tokens": [strings.get(i, "") for i in ids[lo:hi]],
            "activations": values[lo - start:hi - start], "focus": row["pos"] - lo,
        })
    return out


def _exemplar_rows(atlas, layer: int, neuron: int) -> pa.Table:
    """The exemplar rows of one neuron: read with a filter from a saved atlas, else built in memory."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if atlas.path is not None and (atlas.path / "exemplars.parquet").exists():
        return pq.read_table(atlas.path / "exemplars.parquet", filters=[("layer", "=", layer), ("neuron", "=", neuron)])
    table = atlas.exemplar_table()
    return table.filter(pc.and_(pc.equal(table["layer"], layer), pc.equal(table["neuron"], neuron)))
