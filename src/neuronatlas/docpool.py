"""Per-document pooled activations of a bounded document sample, kept on disk.

For label selectivity (average precision / AUROC of a neuron's response to a document as a score
for the document's label) the profiler keeps, for a deterministic sample of documents, each
document's **mean** (and, with ``--doc-pools mean,max``, its **max**) of ``z`` over its real tokens
(all its windows; special tokens such as Llama's ``<s>`` included, padding never), for every neuron.

The sample: the first ``doc_sample`` documents of each label in corpus order, among documents
that give at least one token (a document with no tokens has no windows and is never seen).

On disk, in the atlas folder (format 4)::

    docpool_mean.npy     uint8 (docs, total neurons): the rank code of each document's mean z
    docpool_mean_knots.npy  float16 (17, total neurons): each neuron's mean z at 17 evenly spaced
                         ranks of the sample (the lowest, the highest and 15 between)
    docpool_max.npy      (with the max pool) the same for each document's max z, and its knots
    docpool.parquet      one row per document, in the rows' order: doc (index in the corpus),
                         label, tokens (real tokens pooled)

A **rank code** orders a neuron's documents as their pooled z does: the document's rank among
the sample's R documents (0 = the lowest; equal values share the lowest rank), scaled by
``min(R, 256) / R`` and rounded down. Up to 256 documents the codes are the exact ranks, so
AUROC, average precision and their permutation nulls come out as from the values; beyond, 256
quantile levels (on SmolLM2 over 349 documents AUROC within 0.001 of the values', AP within
0.03). One byte a document and neuron where float16 values took two (atlases of format 3, still
read).
:meth:`DocPool.scores` gives the codes (what the rank statistics use); :meth:`DocPool.matrix`
decodes them into approximate values, interpolating each neuron's knots in rank (exact at the
knots; a probe fit on them finds what one fit on the values finds, which one fit on bare ranks
does not: a logistic probe depends on the values' scale and tails).

Columns are layer-major: layer 0's neurons, then layer 1's ... (offsets = cumulative widths).
Pooled values beyond float16's range are clamped to ±65504. Read the matrices with ``numpy.load(path, mmap_mode="r")``: nothing is loaded until a column block is read.

While profiling, :class:`DocPoolWriter` writes completed documents' float16 values straight into
preallocated ``.npy`` memmaps under ``<out>/docpool.partial/``; only the sampled documents of the
current buffer of batches (whose windows may run in any order, batched by length) are held in
memory, and between buffers at most one, straddling the boundary. Its state (which
documents are sampled, the partial sums of the open document) goes into the profiler's
checkpoint, so a resumed run rewrites the same rows with the same values. The values become
rank codes when the atlas is written (:meth:`DocPool.write`), after every rank's rows are in.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.stats import rankdata

from . import stats_kernel
from .errors import NeuronAtlasError
from .files import (DOCPOOL_MAX_FILE, DOCPOOL_MAX_KNOTS_FILE, DOCPOOL_MEAN_FILE, DOCPOOL_MEAN_KNOTS_FILE,
                    DOCPOOL_TABLE_FILE)

POOLS = ("mean", "max")
_FILE_OF_POOL = {"mean": DOCPOOL_MEAN_FILE, "max": DOCPOOL_MAX_FILE}
_KNOTS_FILE_OF_POOL = {"mean": DOCPOOL_MEAN_KNOTS_FILE, "max": DOCPOOL_MAX_KNOTS_FILE}
_KNOTS = "_knots"  # a part's key of a pool's knots: "mean_knots"
FLOAT16_MAX = 65504.0
CODE_LEVELS = 256  # rank codes are exact ranks up to this many documents, quantile levels beyond
KNOTS = 17  # per neuron and pool, the values at 17 evenly spaced ranks (min, max and 15 between) decode the codes
_COPY_BYTES = 1 << 26  # bytes handled per chunk when concatenating or trimming: ~64 MiB
_RANK_BYTES = 1 << 22  # int64 ranks of a block of columns: 4 MiB (ranking holds a few such arrays at once)


@dataclass
class DocPool:
    """The pooled activations of the sampled documents: row ``r`` is document ``docs[r]``."""

    widths: list[int]
    docs: np.ndarray  # (R,) int64 document index in the corpus
    labels: list[str]  # (R,)
    tokens: np.ndarray  # (R,) int64 real tokens pooled
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)  # row blocks {pool: (r_i, N)}: float16
    # values while profiling (and in atlases of format 3), uint8 rank codes once written
    encoding: str = "ranks"  # how write() stores the pools: "ranks" (uint8 rank codes) or "float16" (values)

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def pools(self) -> list[str]:
        """The pools kept ("mean", and "max" when profiled with it), in POOLS' order."""
        return [pool for pool in POOLS if self.parts and pool in self.parts[0]]

    @property
    def ranked(self) -> bool:
        """Whether the sample is (or is written as) rank codes rather than float16 values."""
        return self.encoding == "ranks"

    @property
    def offsets(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.widths)]).astype(int).tolist()

    def matrix(self, pool: str = "mean", layer: int | None = None) -> np.ndarray:
        """(docs, neurons of ``layer`` — or all neurons for None) float32 pooled z, read from disk: the
        values, or those decoded from rank codes (see the module's docstring)."""
        columns = self._columns(pool, layer)
        blocks = [_decoded(part, pool, columns, len(self)) for part in self.parts]
        return np.concatenate(blocks) if blocks else np.zeros((0, self._width(layer)), np.float32)

    def scores(self, pool: str = "mean", layer: int | None = None) -> np.ndarray:
        """(docs, neurons) float32 that order each neuron's documents as their pooled z does, ties
        included: the rank codes as they are, or the values. What rank statistics (AP, AUROC) read."""
        columns = self._columns(pool, layer)
        blocks = [np.asarray(part[pool][:, columns], dtype=np.float32) for part in self.parts]
        return np.concatenate(blocks) if blocks else np.zeros((0, self._width(layer)), np.float32)

    def _width(self, layer: int | None) -> int:
        return self.widths[layer] if layer is not None else sum(self.widths)

    def _columns(self, pool: str, layer: int | None) -> slice:
        if pool not in POOLS:
            raise NeuronAtlasError(f"unknown pool {pool!r}; use mean or max")
        if pool not in self.pools:
            raise NeuronAtlasError(
                f"this atlas's document sample has no {pool} pool (it has: {', '.join(self.pools)}); "
                f"profile again with --doc-pools mean,{pool} or use --pool {self.pools[0]}"
            )
        if layer is None:
            columns = slice(None)
        else:
            if not 0 <= layer < len(self.widths):
                raise NeuronAtlasError(f"layer {layer} is out of range: the atlas has {len(self.widths)} layers")
            columns = slice(self.offsets[layer], self.offsets[layer + 1])
        return columns

    def table(self) -> pa.Table:
        return pa.table({
            "doc": pa.array(self.docs, pa.int64()),
            "label": pa.array(self.labels, pa.string()),
            "tokens": pa.array(self.tokens, pa.int64()),
        })

    def write(self, folder: Path) -> None:
        """Write the pools' files and the table into ``folder``: values become rank codes (unless the
        encoding is float16); a sample already coded (read from an atlas) is copied."""
        folder = Path(folder)
        for pool in self.pools:
            arrays = [part[pool] for part in self.parts]
            path, knots_path = folder / _FILE_OF_POOL[pool], folder / _KNOTS_FILE_OF_POOL[pool]
            if self.ranked and arrays[0].dtype != np.uint8:
                _write_rank_codes(arrays, len(self), sum(self.widths), path, knots_path)
            else:
                _concatenate_to(arrays, len(self), sum(self.widths), path)
                if arrays[0].dtype == np.uint8:
                    _concatenate_to([self.parts[0][pool + _KNOTS]], KNOTS, sum(self.widths), knots_path)
        pq.write_table(self.table(), folder / DOCPOOL_TABLE_FILE)

    def reopen(self, folder: Path) -> None:
        """Point at the files in ``folder`` (after :meth:`write`), read-only."""
        self.parts = [_open_parts(Path(folder))]


def load_docpool(folder: Path, widths: list[int]) -> DocPool | None:
    folder = Path(folder)
    part = _open_parts(folder)
    if not (folder / DOCPOOL_TABLE_FILE).exists() or not part:
        return None
    table = pq.read_table(folder / DOCPOOL_TABLE_FILE)
    coded = any(array.dtype == np.uint8 for array in part.values())
    pool = DocPool(list(widths), np.asarray(table["doc"].to_numpy(), np.int64), table["label"].to_pylist(),
                   np.asarray(table["tokens"].to_numpy(), np.int64), [part], encoding="ranks" if coded else "float16")
    for pool_name in pool.pools:
        shape = pool.parts[0][pool_name].shape
        knots = pool.parts[0].get(pool_name + _KNOTS)
        if shape != (len(pool), sum(widths)) or (knots is not None and knots.shape != (KNOTS, sum(widths))):
            raise NeuronAtlasError(
                f"{folder / _FILE_OF_POOL[pool_name]} has shape {shape}, expected "
                f"({len(pool)}, {sum(widths)}); the atlas is damaged: profile again"
            )
    return pool


def merge_docpools(first: DocPool | None, second: DocPool | None, doc_offset: int) -> DocPool | None:
    """Both samples one after the other (second's documents renumbered); None unless both have one,
    with the same pools, of values (rank codes of two samples rank each within its own: see
    :func:`why_not_merged`).

    The per-label cap of the profile is not applied again: a merge may hold up to twice as many
    documents per label.
    """
    if why_not_merged(first, second) is not None:
        return None
    return DocPool(
        list(first.widths), np.concatenate([first.docs, second.docs + doc_offset]), first.labels + second.labels,
        np.concatenate([first.tokens, second.tokens]), first.parts + second.parts, encoding="float16",
    )


def why_not_merged(first: DocPool | None, second: DocPool | None) -> str | None:
    """Why two atlases' samples cannot be joined into one (None: they can)."""
    if first is None or second is None:
        return "only one of the atlases has a document sample"
    if first.pools != second.pools:
        return f"their samples keep different pools ({', '.join(first.pools)} and {', '.join(second.pools)})"
    if first.ranked or second.ranked:
        return ("their samples hold rank codes, each ranked within its own sample, which do not compare across "
                "the two; profile the parts with --doc-format float16 to merge their samples")
    return None


def rank_codes(values: np.ndarray) -> np.ndarray:
    """(R, C) values -> (R, C) uint8 rank codes: each value's rank in its column (ties share the
    lowest), times ``min(R, CODE_LEVELS) / R``, rounded down."""
    rows = len(values)
    ranks = rankdata(np.nan_to_num(np.asarray(values, np.float32)), axis=0, method="min") - 1  # (R, C) int64
    return (ranks * min(rows, CODE_LEVELS) // rows).astype(np.uint8)


def knot_ranks(rows: int) -> np.ndarray:
    """(KNOTS,) int64: the ranks (0 = lowest) of R documents whose values are a neuron's knots."""
    return np.round(np.linspace(0, max(rows - 1, 0), KNOTS)).astype(np.int64)


def rank_knots(values: np.ndarray) -> np.ndarray:
    """(R, C) values -> (KNOTS, C) float16: each column's values at :func:`knot_ranks`."""
    ordered = np.sort(np.nan_to_num(np.asarray(values, np.float32)), axis=0)
    return ordered[knot_ranks(len(values))].astype(np.float16)


def decode(codes: np.ndarray, knots: np.ndarray, rows: int) -> np.ndarray:
    """(R', C) rank codes of a sample of ``rows`` documents and their (KNOTS, C) knots -> (R', C)
    float32 values: each code's rank interpolated linearly between the knots around it."""
    levels = min(rows, CODE_LEVELS)
    at = knot_ranks(rows) * levels // max(rows, 1)  # (KNOTS,) the codes of the knots, non-decreasing
    code = np.arange(levels)
    right = np.clip(np.searchsorted(at, code, side="right"), 1, KNOTS - 1)  # (levels,) the knot above each code
    span = np.maximum(at[right] - at[right - 1], 1)
    weight = np.clip((code - at[right - 1]) / span, 0, 1)  # (levels,)
    index = codes.astype(np.int64)
    low = np.take_along_axis(knots.astype(np.float32), right[index] - 1, axis=0)  # (R', C)
    high = np.take_along_axis(knots.astype(np.float32), right[index], axis=0)
    return (low + weight[index] * (high - low)).astype(np.float32)


def _decoded(part: dict, pool: str, columns: slice, rows: int) -> np.ndarray:
    block = np.asarray(part[pool][:, columns])
    if block.dtype != np.uint8:
        return block.astype(np.float32)
    return decode(block, np.asarray(part[pool + _KNOTS][:, columns]), rows)


def _write_rank_codes(arrays: list[np.ndarray], rows: int, width: int, path: Path, knots_path: Path) -> None:
    """The first ``rows`` rows of the arrays (values, in order) as rank codes in a new uint8 .npy and
    their knots in another, a block of columns at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, width))
    knots = np.lib.format.open_memmap(knots_path, mode="w+", dtype=np.float16, shape=(KNOTS, width))
    columns = max(1, _RANK_BYTES // max(8 * rows, 1))
    for start in range(0, width, columns):
        block = np.concatenate([np.asarray(array[:, start : start + columns], np.float32) for array in arrays])[:rows]
        out[:, start : start + columns] = rank_codes(block)
        knots[:, start : start + columns] = rank_knots(block)
    out.flush()
    knots.flush()
    del out, knots


def _open_parts(folder: Path) -> dict[str, np.ndarray]:
    """{pool: its matrix, and pool + "_knots": its knots where it is coded} of the pools on disk."""
    part = {}
    for pool, name in _FILE_OF_POOL.items():
        if (folder / name).exists():
            part[pool] = np.load(folder / name, mmap_mode="r")
            if part[pool].dtype == np.uint8:
                part[pool + _KNOTS] = np.load(folder / _KNOTS_FILE_OF_POOL[pool], mmap_mode="r")
    return part


def _concatenate_to(arrays: list[np.ndarray], rows: int, width: int, path: Path) -> None:
    """Stream the first ``rows`` rows of the arrays, in order, into a new .npy at ``path`` (their dtype)."""
    dtype = arrays[0].dtype
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, width))
    chunk = max(1, _COPY_BYTES // max(dtype.itemsize * width, 1))
    done = 0
    for array in arrays:
        for start in range(0, len(array), chunk):
            block = array[start : start + chunk][: rows - done]
            out[done : done + len(block)] = block
            done += len(block)
    out.flush()
    del out


# ---- writing while profiling ---------------------------------------------------------------------


class DocPoolWriter:
    """Pools each sampled document's z while the profiler streams its windows."""

    def __init__(self, folder: Path, widths: list[int], labels: list[str], cap: int, documents_per_label: dict,
                 device: torch.device, sampled_before: tuple[int, ...] | None = None, pools: list[str] = POOLS,
                 encoding: str = "ranks"):
        """``documents_per_label``: the documents this writer will see; ``sampled_before``: per label, documents
        with a token before them (another rank's block): they count towards the cap as if seen here;
        ``pools``: those written (both are computed: one pass gives both)."""
        self.folder = Path(folder)
        self.pools = list(pools)
        self.encoding = encoding
        self.widths = list(widths)
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int).tolist()
        self.total = self.offsets[-1]
        self.labels = list(labels)
        self.cap = int(cap)
        self.device = device
        before = list(sampled_before) if sampled_before is not None else [0] * len(self.labels)
        self.rows_max = sum(min(self.cap, seen + int(documents_per_label.get(label, 0))) - min(self.cap, seen)
                            for label, seen in zip(self.labels, before))
        self.label_counts = [min(seen, self.cap) for seen in before]  # documents sampled so far per label
        self.next_row = 0
        self.last_doc = -1  # the document of the last window seen
        self.last_sampled = False
        self.docs = np.full(self.rows_max, -1, np.int64)
        self.row_labels = np.full(self.rows_max, -1, np.int64)
        self.tokens = np.zeros(self.rows_max, np.int64)
        self.open: dict[int, dict] = {}  # doc -> the running row, doc, tokens, sum, max of a document not yet written
        self.rows: dict[int, int] = {}  # the planned documents' rows (-1: not sampled), see plan
        self.arrays: dict[str, np.ndarray] = {}
        self._batch: dict | None = None

    # -- files and state

    def create(self) -> None:
        """Start afresh: new (zeroed) scratch files."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        for pool in self.pools:
            self.arrays[pool] = np.lib.format.open_memmap(
                self.folder / f"{pool}.npy", mode="w+", dtype=np.float16, shape=(self.rows_max, self.total))

    def reopen(self) -> None:
        """Continue the scratch files of an interrupted run."""
        for pool in self.pools:
            path = self.folder / f"{pool}.npy"
            if not path.exists():
                raise NeuronAtlasError(
                    f"--resume: {path} of the interrupted profile is missing; pass --overwrite to start again"
                )
            self.arrays[pool] = np.load(path, mmap_mode="r+")
            if self.arrays[pool].shape != (self.rows_max, self.total):
                raise NeuronAtlasError(
                    f"--resume: {path} has shape {self.arrays[pool].shape}, expected {(self.rows_max, self.total)}; "
                    "pass --overwrite to start again"
                )

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for the checkpoint (written after :meth:`flush`, between buffers: at most the last
        document is open)."""
        if len(self.open) > 1:
            raise RuntimeError(f"a checkpoint inside a buffer: {len(self.open)} documents open")
        open_ = next(iter(self.open.values()), None)
        state = {
            "docpool.scalars": torch.tensor([self.next_row, self.last_doc, int(self.last_sampled),
                                             -1 if open_ is None else open_["row"],
                                             -1 if open_ is None else open_["doc"],
                                             0 if open_ is None else open_["tokens"]], dtype=torch.int64),
            "docpool.label_counts": torch.tensor(self.label_counts, dtype=torch.int64),
            "docpool.docs": torch.from_numpy(self.docs.copy()),
            "docpool.labels": torch.from_numpy(self.row_labels.copy()),
            "docpool.tokens": torch.from_numpy(self.tokens.copy()),
        }
        if open_ is not None:
            state["docpool.open_sum"] = open_["sum"].cpu()
            state["docpool.open_max"] = open_["max"].cpu()
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        next_row, last_doc, last_sampled, open_row, open_doc, open_tokens = state["docpool.scalars"].tolist()
        self.next_row, self.last_doc, self.last_sampled = next_row, last_doc, bool(last_sampled)
        self.label_counts = state["docpool.label_counts"].tolist()
        self.docs = state["docpool.docs"].numpy().copy()
        self.row_labels = state["docpool.labels"].numpy().copy()
        self.tokens = state["docpool.tokens"].numpy().copy()
        self.open = {}
        if open_row >= 0:
            self.open[open_doc] = {"row": open_row, "doc": open_doc, "tokens": open_tokens,
                         "sum": state["docpool.open_sum"].to(self.device),
                         "max": state["docpool.open_max"].to(self.device)}

    # -- one batch

    def plan(self, windows) -> None:
        """Decide, in corpus order, which documents of the next windows (None: another rank's) are
        sampled and their rows, before the batches that hold them run (perhaps in another order)."""
        self.rows = {self.last_doc: self.next_row - 1 if self.last_sampled else -1}  # the one that may go on
        for window in windows:
            if window is None or window.doc == self.last_doc:
                continue
            self.last_doc = window.doc
            label = self.labels.index(window.label) if window.label is not None else 0
            self.last_sampled = self.label_counts[label] < self.cap and self.next_row < self.rows_max
            if self.last_sampled:
                self.label_counts[label] += 1
                self.docs[self.next_row], self.row_labels[self.next_row] = window.doc, label
                self.next_row += 1
            self.rows[window.doc] = self.next_row - 1 if self.last_sampled else -1

    def begin(self, windows) -> bool:
        """Assign the batch's windows (None: skip that row) to sampled documents (see :meth:`plan`, which
        saw them first); False when none is sampled. A document's windows may come in any order."""
        slots, slot_docs = [], []  # per window: slot or -1; per slot: (doc, row)
        for window in windows:
            row = -1 if window is None else self.rows[window.doc]
            if row < 0:  # another rank's window, or a document not sampled
                slots.append(-1)
                continue
            if not slot_docs or slot_docs[-1][0] != window.doc:
                slot_docs.append((window.doc, row))
            slots.append(len(slot_docs) - 1)
        if not slot_docs:
            self._batch = None
            return False
        rows = [i for i, slot in enumerate(slots) if slot >= 0]
        self._batch = {
            "rows": torch.tensor(rows, device=self.device),
            "slots": torch.tensor([slots[i] for i in rows], device=self.device),
            "slot_docs": slot_docs,
            "sum": torch.zeros((len(slot_docs), self.total), dtype=torch.float64, device=self.device),
            "max": torch.full((len(slot_docs), self.total), float("-inf"), device=self.device),
            "tokens": None,
        }
        return True

    def add(self, layer: int, z: torch.Tensor, mask: torch.Tensor) -> None:
        """z (B, T, D) of one layer and the real-token mask (B, T) of the batch."""
        batch = self._batch
        if batch is None:
            return
        rows, slots = batch["rows"], batch["slots"]
        real = mask[rows]  # (S, T)
        columns = slice(self.offsets[layer], self.offsets[layer + 1])
        if batch["tokens"] is None:
            batch["tokens"] = torch.zeros(len(batch["slot_docs"]), dtype=torch.int64, device=self.device)
            batch["tokens"].index_add_(0, slots, real.sum(1))
        if z.device.type == "cpu" and stats_kernel.enabled():  # one pass, no copies
            if "token_slots" not in batch:  # (B * T,) the document slot of every real token, else -1
                token_slots = torch.full(mask.shape, -1, dtype=torch.int64)
                token_slots[rows] = torch.where(real, slots[:, None], -1)
                batch["token_slots"] = token_slots.view(-1).numpy()
            stats_kernel.pool_documents(z.reshape(-1, z.shape[-1]).float().contiguous().numpy(), batch["token_slots"],
                                        batch["sum"][:, columns].numpy(), batch["max"][:, columns].numpy(),
                                        stats_kernel.span_width(z.shape[-1]))
            return
        values = z[rows].float()  # (S, T, D)
        sums = torch.bmm(real[:, None, :].float(), values)[:, 0].double()  # (S, D)
        count = len(batch["slot_docs"])
        batch["sum"][:, columns] = torch.zeros((count, sums.shape[1]), dtype=torch.float64,
                                               device=sums.device).index_add_(0, slots, sums)
        if "max" not in self.pools:  # (the CPU kernel takes both in its one pass)
            return
        maxes = values.masked_fill(~real[:, :, None], float("-inf")).amax(1)  # (S, D)
        batch["max"][:, columns] = torch.full((count, maxes.shape[1]), float("-inf"), device=maxes.device).scatter_reduce_(
            0, slots[:, None].expand_as(maxes), maxes, "amax")

    def end(self) -> None:
        """Fold the batch into its documents' running sums (a document's windows may come in any
        order within a buffer; :meth:`close_buffer` writes the complete ones)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        tokens = batch["tokens"].tolist()
        for slot, (doc, row) in enumerate(batch["slot_docs"]):
            document = self.open.get(doc)
            if document is None:
                self.open[doc] = {"row": row, "doc": doc, "tokens": tokens[slot],
                                  "sum": batch["sum"][slot].clone(), "max": batch["max"][slot].clone()}
            else:
                document["sum"] += batch["sum"][slot]
                torch.maximum(document["max"], batch["max"][slot], out=document["max"])
                document["tokens"] += tokens[slot]

    def close_buffer(self, last_doc: int) -> None:
        """A buffer of batches is done: write every document it held but ``last_doc`` (its last, which
        may go on in the next buffer)."""
        for doc in [doc for doc in self.open if doc != last_doc]:
            self._write(self.open.pop(doc))

    def _write(self, document: dict) -> None:
        row, count = document["row"], document["tokens"]
        pooled = {"mean": document["sum"] / max(count, 1), "max": document["max"]}
        for pool in self.pools:
            self.arrays[pool][row] = pooled[pool].clamp(-FLOAT16_MAX, FLOAT16_MAX).to("cpu", torch.float16).numpy()
        self.tokens[row] = count

    # -- the end

    def finish(self) -> DocPool:
        """Write the open document; the sample as a DocPool over the scratch files (trimmed if need be)."""
        for document in self.open.values():
            self._write(document)
        self.open = {}
        self.flush()
        rows = self.next_row
        parts = {}
        for pool in self.pools:
            array = self.arrays[pool]
            if rows < self.rows_max:  # documents without tokens left rows unused: copy the used ones
                path = self.folder / f"{pool}.trimmed.npy"
                _concatenate_to([array], rows, self.total, path)
                array = np.load(path, mmap_mode="r")
            parts[pool] = array
        labels = [self.labels[i] for i in self.row_labels[:rows]]
        return DocPool(self.widths, self.docs[:rows].copy(), labels, self.tokens[:rows].copy(), [parts],
                       encoding=self.encoding)
