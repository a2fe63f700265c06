"""Per-token activations around each exemplar, for showing and explaining a neuron.

The profile keeps, per neuron, the activation at each top-k exemplar token and, with a window
radius R, the neuron's z at up to R tokens either side of it: cut from the batch in the profile's
one pass (:class:`neuronatlas.stats.WindowSource`) and carried with the exemplar as a
(D, k, 2R + 1) float16 payload through every merge (:mod:`neuronatlas.stats`).

:func:`window_table` turns the payloads into a table keyed like the exemplars (layer, neuron, seq,
pos) with ``window_start`` (the position within the window of the first value) and
``window_activations`` (list<float32>: float16 precision, the exemplar's own value exact); the
atlas joins it into ``exemplars.parquet``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .files import BOTTOM_EXEMPLARS_FILE, EXEMPLARS_FILE
from .stats import split_uid

DEFAULT_RADIUS = 16


def window_table(top_values: list[torch.Tensor], top_uid: list[torch.Tensor], top_window: list[torch.Tensor],
                 radius: int) -> pa.Table:
    """One row per exemplar with a recorded window; per layer values, uid (D, k) and window (D, k, 2R + 1)."""
    columns = {"layer": [], "neuron": [], "seq": [], "pos": [], "window_start": [], "window_activations": []}
    for layer, (values, uid, window) in enumerate(zip(top_values, top_uid, top_window)):
        seq, pos = split_uid(uid.cpu())
        filled = seq >= 0
        neuron = filled.nonzero(as_tuple=True)[0].numpy()
        matrix = window.cpu()[filled].float().numpy()  # (M, W), NaN outside the window or not recorded
        valid = ~np.isnan(matrix)
        keep = np.nonzero(valid.any(axis=1))[0]
        matrix, valid = matrix[keep], valid[keep]
        matrix[:, radius] = values.cpu()[filled].numpy()[keep]  # the exemplar's own value, exact
        valid[:, radius] = True
        first = valid.argmax(axis=1)
        offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
        pos_kept = pos[filled].numpy()[keep]
        columns["layer"].append(np.full(len(keep), layer, np.int32))
        columns["neuron"].append(neuron[keep].astype(np.int32))
        columns["seq"].append(seq[filled].numpy()[keep].astype(np.int64))
        columns["pos"].append(pos_kept.astype(np.int32))
        columns["window_start"].append((pos_kept - radius + first).astype(np.int32))
        columns["window_activations"].append(
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix[valid].astype(np.float32), pa.float32())))
    types = {"layer": pa.int32(), "neuron": pa.int32(), "seq": pa.int64(), "pos": pa.int32(), "window_start": pa.int32()}
    table = {name: pa.array(np.concatenate(columns[name]) if columns[name] else [], kind) for name, kind in types.items()}
    table["window_activations"] = (pa.concat_arrays(columns["window_activations"]) if columns["window_activations"]
                                   else pa.array([], pa.list_(pa.float32())))
    return pa.table(table)


def neuron_exemplars(atlas, layer: int, neuron: int, end: str = "top") -> list[dict]:
    """One neuron's exemplars, best first, each with the tokens around it and their activations;
    ``end="bottom"``: its most negative exemplars (those below zero), most negative first.

    Each dict: activation, seq, pos, doc, label, token_ids, tokens (strings), activations (z per
    token, None where not recorded) and focus (the exemplar token's index in ``tokens``).
    """
    table = _exemplar_rows(atlas, layer, neuron, end)
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


def _exemplar_rows(atlas, layer: int, neuron: int, end: str) -> pa.Table:
    """The exemplar rows of one neuron: read with a filter from a saved atlas, else built in memory."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = None if atlas.path is None else atlas.path / (EXEMPLARS_FILE if end == "top" else BOTTOM_EXEMPLARS_FILE)
    if file is not None and file.exists():
        return pq.read_table(file, filters=[("layer", "=", layer), ("neuron", "=", neuron)])
    if end == "bottom" and not atlas.has_stat("bottom_values"):
        return pa.table({"rank": pa.array([], pa.int16())})
    table = atlas.exemplar_table(end)
    return table.filter(pc.and_(pc.equal(table["layer"], layer), pc.equal(table["neuron"], neuron)))
