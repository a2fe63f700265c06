"""Per-token activations around each exemplar, for showing and explaining a neuron.

The profile keeps, per neuron, the activation at each top-k exemplar token and, with a window
radius R, the neuron's z at up to R tokens either side of it: cut from the batch in the profile's
one pass (:class:`neuronatlas.stats.WindowSource`) and carried with the exemplar as a
(D, k, 2R + 1) float16 payload through every merge (:mod:`neuronatlas.stats`).

:func:`window_table` turns the payloads into a table keyed like the exemplars (layer, neuron, seq,
pos) with ``window_start`` (the position within the window of the first value) and the values in
``window_bits`` bits (6 by default; int8 per row, so that every table decodes alone):
``window_scale`` (float32) is the window's largest |z| rounded up to float16's precision (its low
bytes zero: they compress away) and ``window_codes`` (list<int8>) the µ-law codes of z / scale in
[-(2^(bits-1) - 1), 2^(bits-1) - 1] (µ = 255, as in telephony: steps even in log |z|; activations
are heavy-tailed, a linear code would flatten the small ones next to a peak).
With 6 bits each value is within 9.4% of itself plus 0.04% of the window's largest (8 bits: 2.2%
and 0.01%). Colours, tooltips and the 0-10 activations explanations use need no more; the
exemplar's own value is exact in ``activation``. Parquet's dictionary encoding packs the codes
to their bit width (6 bits: 0.3 KB a neuron less than 8 on SmolLM2). The atlas joins the table
into ``exemplars.parquet`` (and ``bottom_exemplars.parquet``).

Readers get float ``window_activations`` back with :func:`window_sql` (duckdb) or
:func:`with_window_values` (arrow), and :func:`exact_peak` puts the exemplar's exact value back.
Atlases written before the coded windows (format 1) stored ``window_activations`` as floats: both
readers pass them through; format 2 wrote 8-bit codes without ``window_bits`` (:func:`with_bits`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .files import BOTTOM_EXEMPLARS_FILE, EXEMPLARS_FILE
from .stats import split_uid
from .tokens import character_bounds, vocab_bytes

DEFAULT_RADIUS = 16
DEFAULT_BITS = 6  # bits a window value: codes in [-31, 31]
FORMAT_2_BITS = 8  # the bits of tables written before window_bits
MU = 255.0  # µ-law: code = sign(z) * code_max * log1p(MU * |z| / scale) / log1p(MU)
FLOAT_MAX = float(np.finfo(np.float32).max)  # np.nan_to_num's stand-in for inf in a float32 window
WINDOW_COLUMNS = ("window_start", "window_scale", "window_bits", "window_codes")  # the windows as stored


def code_max(bits):
    """The largest code of ``bits``-bit windows (a sign and bits - 1 of magnitude): 31 for 6 bits."""
    return 2 ** (bits - 1) - 1


def with_bits(table: pa.Table) -> pa.Table:
    """``table`` with a ``window_bits`` column: 8 for windows coded before it existed (format 2)."""
    if "window_codes" not in table.column_names or "window_bits" in table.column_names:
        return table
    index = table.column_names.index("window_codes")
    return table.add_column(index, "window_bits", pa.array(np.full(table.num_rows, FORMAT_2_BITS, np.int8)))


def has_windows(columns) -> bool:
    """Whether an exemplar table with these column names records activation windows (either format)."""
    return "window_start" in columns and ("window_codes" in columns or "window_activations" in columns)


def window_sql(columns, alias: str = "") -> str:
    """The duckdb select list of window_start and the float ``window_activations`` of an exemplar table
    with these columns ("" when it records no windows); ``alias``: the table's alias with its dot."""
    if not has_windows(columns):
        return ""
    if "window_codes" not in columns:  # format 1: floats
        return f"{alias}window_start, {alias}window_activations"
    bits = f"{alias}window_bits" if "window_bits" in columns else str(FORMAT_2_BITS)
    step = f"{math.log1p(MU)!r} / (pow(2, {bits} - 1) - 1)"
    decode = f"sign(c) * {alias}window_scale / {MU} * (exp(abs(c) * {step}) - 1)"
    return f"{alias}window_start, list_transform({alias}window_codes, lambda c: {decode}) as window_activations"


def with_window_values(table: pa.Table) -> pa.Table:
    """``table`` with float ``window_activations`` decoded from its codes (as it is without codes)."""
    if "window_codes" not in table.column_names:
        return table
    table = with_bits(table)
    codes = table["window_codes"].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(codes), 0).to_numpy(zero_copy_only=False)
    scale = np.repeat(pc.fill_null(table["window_scale"], 0.0).to_numpy(zero_copy_only=False), lengths)
    bits = np.repeat(pc.fill_null(table["window_bits"], FORMAT_2_BITS).to_numpy(zero_copy_only=False), lengths)
    values = decode_codes(codes.flatten().to_numpy(zero_copy_only=False), scale, bits)
    decoded = pa.ListArray.from_arrays(codes.offsets, pa.array(values, pa.float32()), mask=codes.is_null())
    return table.append_column("window_activations", decoded)


def with_window_codes(table: pa.Table) -> pa.Table:
    """``table`` with its float ``window_activations`` (format 1) replaced by scale, bits (8) and codes."""
    if "window_activations" not in table.column_names or "window_codes" in table.column_names:
        return with_bits(table)
    lists = table["window_activations"].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64)  # (n,) every window's values
    row = np.repeat(np.arange(len(lengths)), lengths)
    scale = np.zeros(len(lengths))
    np.maximum.at(scale, row, np.abs(values))
    codes = mu_law(values, scale[row], FORMAT_2_BITS)
    table = table.drop_columns(["window_activations"])
    table = table.append_column("window_scale", pa.array(scale.astype(np.float32)))
    table = table.append_column("window_bits", pa.array(np.full(table.num_rows, FORMAT_2_BITS, np.int8)))
    return table.append_column("window_codes", pa.ListArray.from_arrays(lists.offsets, pa.array(codes, pa.int8()),
                                                                         mask=lists.is_null()))


def exact_peak(values: list, start: int, pos: int, activation: float) -> list:
    """The decoded window with the exemplar's exact value at its own position."""
    if 0 <= pos - start < len(values):
        values = list(values)
        values[pos - start] = activation
    return values


def mu_law(values: np.ndarray, scale: np.ndarray, bits: int = DEFAULT_BITS) -> np.ndarray:
    """int8 µ-law codes (``bits`` bits) of ``values`` against ``scale`` (broadcast to them: each value's
    window's largest |z|)."""
    flat_values = np.ascontiguousarray(values, dtype=np.float64).ravel()
    flat_scale = np.ascontiguousarray(np.broadcast_to(scale, np.shape(values)), dtype=np.float64).ravel()
    return _mu_law_codes(flat_values, flat_scale, code_max(bits)).reshape(np.shape(values))


@numba.njit(parallel=True, nogil=True, cache=True)
def _mu_law_codes(values, scale, top):  # pragma: no cover (compiled)
    """sign(x) * round(log1p(MU |x| / scale) / step), at most ``top``, per value (n,) float64 (NaN: 0):
    one pass, where numpy's float64 log1p and temporaries took seconds for an 8B model's windows."""
    codes = np.zeros(len(values), dtype=np.int8)
    for i in numba.prange(len(values)):
        codes[i] = _code(values[i], scale[i], top)
    return codes


@numba.njit(inline="always")
def _code(x, scale, top):  # pragma: no cover (compiled)
    """The µ-law code (at most ``top``) of one float64 value against its window's scale; 0 for 0 and NaN."""
    return _scaled_code(x, 1.0 / scale if scale > 0 else 1.0, top / math.log1p(MU), top)


@numba.njit(inline="always")
def _scaled_code(x, inverse_scale, per_log, top):  # pragma: no cover (compiled)
    """:func:`_code` with 1 / scale and top / log1p(MU) given: hoisted out of a window's loop."""
    if x == 0 or x != x:
        return 0
    code = int(min(np.rint(math.log1p(MU * min(abs(x), FLOAT_MAX) * inverse_scale) * per_log), top))
    return code if x > 0 else -code


def decode_codes(codes: np.ndarray, scale: np.ndarray, bits) -> np.ndarray:
    """Values (n,) float32 of µ-law ``codes`` (n,) with each one's window ``scale`` (n,) and ``bits`` (n,) or one."""
    codes = codes.astype(np.float64)
    step = math.log1p(MU) / (2.0 ** (np.asarray(bits, np.float64) - 1) - 1)
    return (np.sign(codes) * scale / MU * np.expm1(np.abs(codes) * step)).astype(np.float32)


def window_table(top_values: list[torch.Tensor], top_uid: list[torch.Tensor], top_window: list[torch.Tensor],
                 radius: int, saved: list[torch.Tensor] | None = None, bits: int = DEFAULT_BITS) -> pa.Table:
    """One row per exemplar with a recorded window, coded in ``bits`` bits a value; per layer values,
    uid (D, k) and window (D, k, 2R + 1), and ``saved`` (D, k) bool, the exemplars kept (default: every
    filled slot). The windows are consumed: each layer's leaves ``top_window`` once coded (an 8B
    model's take 0.9 GB).

    A window's values are its non-NaN entries (NaN: outside the document, or not recorded), with the
    exemplar's own exact value at the centre; a window with no recorded value at all has no row."""
    columns = {"layer": [], "neuron": [], "seq": [], "pos": [], "window_start": [], "window_scale": [],
               "window_bits": [], "window_codes": []}
    for layer, (values, uid) in enumerate(zip(top_values, top_uid)):
        window, top_window[layer] = top_window[layer], None
        seq, pos = (part.numpy() for part in split_uid(uid.cpu()))
        filled = seq >= 0 if saved is None else saved[layer].cpu().numpy()
        neuron, rank = np.nonzero(filled)  # row-major: by neuron, then rank
        matrix = window.cpu().half().view(torch.int16).numpy()  # (D, k, W) float16 bits, NaN where not recorded
        exact = values.cpu().float().numpy()
        lengths = np.zeros(len(neuron), np.int64)
        _window_lengths(matrix, neuron, rank, radius, lengths, HALF_VALUES)
        keep = np.nonzero(lengths)[0]
        neuron, rank = neuron[keep], rank[keep]
        offsets = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
        codes, scale, first = np.zeros(offsets[-1], np.int8), np.zeros(len(keep)), np.zeros(len(keep), np.int64)
        _encode_windows(matrix, exact, neuron, rank, radius, offsets, codes, scale, first, code_max(bits), HALF_VALUES)
        pos_kept = pos[neuron, rank]
        columns["layer"].append(np.full(len(keep), layer, np.int32))
        columns["neuron"].append(neuron.astype(np.int32))
        columns["seq"].append(seq[neuron, rank])
        columns["pos"].append(pos_kept.astype(np.int32))
        columns["window_start"].append((pos_kept - radius + first).astype(np.int32))
        columns["window_scale"].append(scale.astype(np.float32))
        columns["window_bits"].append(np.full(len(keep), bits, np.int8))
        columns["window_codes"].append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(codes, pa.int8())))
    types = {"layer": pa.int32(), "neuron": pa.int32(), "seq": pa.int64(), "pos": pa.int32(), "window_start": pa.int32(),
             "window_scale": pa.float32(), "window_bits": pa.int8()}
    table = {name: pa.array(np.concatenate(columns[name]) if columns[name] else [], kind) for name, kind in types.items()}
    table["window_codes"] = (pa.concat_arrays(columns["window_codes"]) if columns["window_codes"]
                             else pa.array([], pa.list_(pa.int8())))
    return pa.table(table)


HALF_VALUES = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)  # float16 bits -> value


@numba.njit(parallel=True, nogil=True, cache=True)
def _window_lengths(bits, neuron, rank, radius, lengths, halves):  # pragma: no cover (compiled)
    """lengths[i]: the values window i (``bits[neuron[i], rank[i]]``, (W,) float16 bits; ``halves``:
    HALF_VALUES) keeps, its centre included; 0 when it recorded nothing (NaN: not recorded)."""
    for i in numba.prange(len(neuron)):
        row = bits[neuron[i], rank[i]]
        count = 0
        for j in range(row.shape[0]):
            x = halves[row[j] & 0xFFFF]
            count += x == x
        if count:
            centre = halves[row[radius] & 0xFFFF]
            lengths[i] = count + (centre != centre)


@numba.njit(parallel=True, nogil=True, cache=True)
def _encode_windows(bits, exact, neuron, rank, radius, offsets, codes, scale, first, top, halves):  # pragma: no cover
    """Window i's scale (its largest |z|, the centre's exact value included; NaN as 0), the index
    of its first kept value, and its µ-law codes (at most ``top``) at ``codes[offsets[i]:offsets[i + 1]]``.
    float16 bits are read through the table ``halves`` (HALF_VALUES): a third of the time of decoding them."""
    for i in numba.prange(len(neuron)):
        row, centre = bits[neuron[i], rank[i]], np.float64(exact[neuron[i], rank[i]])
        first[i] = -1
        for j in range(row.shape[0]):
            x = centre if j == radius else halves[row[j] & 0xFFFF]
            if j == radius or x == x:
                if first[i] < 0:
                    first[i] = j
                if x == x:
                    scale[i] = max(scale[i], min(abs(x), FLOAT_MAX))
        scale[i] = _half_ceiling(scale[i])
        inverse_scale, per_log = 1.0 / scale[i] if scale[i] > 0 else 1.0, top / math.log1p(MU)
        at = offsets[i]
        for j in range(row.shape[0]):
            x = centre if j == radius else halves[row[j] & 0xFFFF]
            if j == radius or x == x:
                codes[at] = _scaled_code(x, inverse_scale, per_log, top)
                at += 1


@numba.njit(inline="always")
def _half_ceiling(x):  # pragma: no cover (compiled)
    """The least float16 value >= x, for 0 < x <= 65504 (x itself otherwise): a scale within 0.1%
    (far inside a code step) whose float32 low mantissa bits are zero and compress away."""
    if not 0 < x <= 65504.0:
        return x
    spacing = 2.0 ** (max(math.floor(math.log2(x)), -14) - 10)
    return math.ceil(x / spacing) * spacing


def neuron_exemplars(atlas, layer: int, neuron: int, end: str = "top") -> list[dict]:
    """One neuron's exemplars, best first, each with the tokens around it and their activations;
    ``end="bottom"``: its most negative exemplars (those below zero), most negative first.

    Each dict: activation, seq, pos, doc, label, token_ids, tokens (strings), activations (z per
    token, None where not recorded) and focus (the exemplar token's index in ``tokens``).
    """
    table = _exemplar_rows(atlas, layer, neuron, end)
    contexts = {} if atlas.contexts is None else dict(zip(atlas.contexts["seq"].to_pylist(), atlas.contexts["token_ids"].to_pylist()))
    strings = {} if atlas.vocab is None else dict(zip(atlas.vocab["id"].to_pylist(), atlas.vocab["token"].to_pylist()))
    pieces = vocab_bytes(atlas.vocab)
    out = []
    for row in with_window_values(table).sort_by("rank").to_pylist():
        ids = contexts.get(row["seq"], [])
        start = row.get("window_start")
        values = row.get("window_activations")
        if start is None or values is None:  # no recorded window: the exemplar token alone is known
            start, values = row["pos"], [row["activation"]]
        values = exact_peak(values, start, row["pos"], row["activation"])
        lo, hi = max(start, 0), min(start + len(values), len(ids))
        if lo < hi:  # whole characters at the edges: the tokens added have no value (None)
            lo, hi = character_bounds(lambda i: pieces.get(ids[i], b""), lo, hi, len(ids))
        out.append({
            "activation": row["activation"], "seq": row["seq"], "pos": row["pos"], "doc": row.get("doc"),
            "label": row.get("label"), "token_ids": ids[lo:hi], "tokens": [strings.get(i, "") for i in ids[lo:hi]],
            "activations": [values[i - start] if 0 <= i - start < len(values) else None for i in range(lo, hi)],
            "focus": row["pos"] - lo,
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
