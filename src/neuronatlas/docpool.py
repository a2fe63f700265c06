"""Per-document pooled activations of a bounded document sample, kept on disk.

For label selectivity (average precision / AUROC of a neuron's response to a document as a score
for the document's label) the profiler keeps, for a deterministic sample of documents, each
document's **mean** and **max** of ``z`` over its real tokens (all its windows; special tokens such
as Llama's ``<s>`` included, padding never), for every neuron.

The sample: the first ``doc_sample`` documents of each label in corpus order, among documents
that give at least one token (a document with no tokens has no windows and is never seen).

On disk, in the atlas folder::

    docpool_mean.npy     float16 (docs, total neurons): mean of z over the document's tokens
    docpool_max.npy      float16 (docs, total neurons): max of z over the document's tokens
    docpool.parquet      one row per document, in the rows' order: doc (index in the corpus),
                         label, tokens (real tokens pooled)

Columns are layer-major: layer 0's neurons, then layer 1's ... (offsets = cumulative widths).
Values beyond float16's range are clamped to ±65504. Read them with
``numpy.load(path, mmap_mode="r")``: nothing is loaded until a column block is read.

While profiling, :class:`DocPoolWriter` writes completed documents' rows straight into
preallocated ``.npy`` memmaps under ``<out>/docpool.partial/``; only the sampled documents of the
current buffer of batches (whose windows may run in any order, batched by length) are held in
memory, and between buffers at most one, straddling the boundary. Its state (which
documents are sampled, the partial sums of the open document) goes into the profiler's
checkpoint, so a resumed run rewrites the same rows with the same values.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import stats_kernel
from .errors import NeuronAtlasError
from .files import DOCPOOL_FILES, DOCPOOL_MAX_FILE, DOCPOOL_MEAN_FILE, DOCPOOL_TABLE_FILE

POOLS = ("mean", "max")
_FILE_OF_POOL = {"mean": DOCPOOL_MEAN_FILE, "max": DOCPOOL_MAX_FILE}
FLOAT16_MAX = 65504.0
_COPY_BYTES = 1 << 26  # rows copied per chunk when concatenating or trimming: ~64 MiB


@dataclass
class DocPool:
    """The pooled activations of the sampled documents: row ``r`` is document ``docs[r]``."""

    widths: list[int]
    docs: np.ndarray  # (R,) int64 document index in the corpus
    labels: list[str]  # (R,)
    tokens: np.ndarray  # (R,) int64 real tokens pooled
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)  # row blocks {"mean", "max"}: (r_i, N) float16
    temporary: bool = False  # parts are scratch files of the profiler that save() may move

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def offsets(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.widths)]).astype(int).tolist()

    def matrix(self, pool: str = "mean", layer: int | None = None) -> np.ndarray:
        """(docs, neurons of ``layer`` — or all neurons for None) float32, read from disk."""
        if pool not in POOLS:
            raise NeuronAtlasError(f"unknown pool {pool!r}; use mean or max")
        if layer is None:
            columns = slice(None)
        else:
            if not 0 <= layer < len(self.widths):
                raise NeuronAtlasError(f"layer {layer} is out of range: the atlas has {len(self.widths)} layers")
            columns = slice(self.offsets[layer], self.offsets[layer + 1])
        blocks = [np.asarray(part[pool][:, columns], dtype=np.float32) for part in self.parts]
        width = self.widths[layer] if layer is not None else sum(self.widths)
        return np.concatenate(blocks) if blocks else np.zeros((0, width), np.float32)

    def table(self) -> pa.Table:
        return pa.table({
            "doc": pa.array(self.docs, pa.int64()),
            "label": pa.array(self.labels, pa.string()),
            "tokens": pa.array(self.tokens, pa.int64()),
        })

    def write(self, folder: Path) -> None:
        """Write the three files into ``folder``: hard-linked when temporary single files, else copied in chunks."""
        folder = Path(folder)
        for pool, name in _FILE_OF_POOL.items():
            arrays = [part[pool] for part in self.parts]
            source = _file_of(arrays[0]) if len(arrays) == 1 else None
            if self.temporary and source is not None and len(arrays[0]) == len(self):
                _link_or_copy(source, folder / name)  # linked, not moved: the scratch stays whole until the atlas is
            else:
                _concatenate_to(arrays, len(self), sum(self.widths), folder / name)
        pq.write_table(self.table(), folder / DOCPOOL_TABLE_FILE)

    def reopen(self, folder: Path) -> None:
        """Point at the files in ``folder`` (after :meth:`write`), read-only."""
        self.parts = [_open_parts(Path(folder))]
        self.temporary = False


def load_docpool(folder: Path, widths: list[int]) -> DocPool | None:
    folder = Path(folder)
    if not all((folder / name).exists() for name in DOCPOOL_FILES):
        return None
    table = pq.read_table(folder / DOCPOOL_TABLE_FILE)
    pool = DocPool(list(widths), np.asarray(table["doc"].to_numpy(), np.int64), table["label"].to_pylist(),
                   np.asarray(table["tokens"].to_numpy(), np.int64), [_open_parts(folder)])
    for pool_name in POOLS:
        shape = pool.parts[0][pool_name].shape
        if shape != (len(pool), sum(widths)):
            raise NeuronAtlasError(
                f"{folder / _FILE_OF_POOL[pool_name]} has shape {shape}, expected "
                f"({len(pool)}, {sum(widths)}); the atlas is damaged: profile again"
            )
    return pool


def merge_docpools(first: DocPool | None, second: DocPool | None, doc_offset: int) -> DocPool | None:
    """Both samples one after the other (second's documents renumbered); None unless both have one.

    The per-label cap of the profile is not applied again: a merge may hold up to twice as many
    documents per label.
    """
    if first is None or second is None:
        return None
    return DocPool(
        list(first.widths), np.concatenate([first.docs, second.docs + doc_offset]), first.labels + second.labels,
        np.concatenate([first.tokens, second.tokens]), first.parts + second.parts,
    )


def _open_parts(folder: Path) -> dict[str, np.ndarray]:
    return {pool: np.load(folder / name, mmap_mode="r") for pool, name in _FILE_OF_POOL.items()}


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for ``source`` (free); a copy where the filesystem has no hard links or spans devices."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _file_of(array: np.ndarray) -> Path | None:
    filename = getattr(array, "filename", None)
    return Path(filename) if filename else None


def _concatenate_to(arrays: list[np.ndarray], rows: int, width: int, path: Path) -> None:
    """Stream the first ``rows`` rows of the arrays, in order, into a new float16 .npy at ``path``."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, width))
    chunk = max(1, _COPY_BYTES // max(2 * width, 1))
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
                 device: torch.device, sampled_before: tuple[int, ...] | None = None):
        """``documents_per_label``: the documents this writer will see; ``sampled_before``: per label, documents
        with a token before them (another rank's block): they count towards the cap as if seen here."""
        self.folder = Path(folder)
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
        for pool in POOLS:
            self.arrays[pool] = np.lib.format.open_memmap(
                self.folder / f"{pool}.npy", mode="w+", dtype=np.float16, shape=(self.rows_max, self.total))

    def reopen(self) -> None:
        """Continue the scratch files of an interrupted run."""
        for pool in POOLS:
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
        maxes = values.masked_fill(~real[:, :, None], float("-inf")).amax(1)  # (S, D)
        count = len(batch["slot_docs"])
        batch["sum"][:, columns] = torch.zeros((count, sums.shape[1]), dtype=torch.float64,
                                               device=sums.device).index_add_(0, slots, sums)
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
        mean = (document["sum"] / max(count, 1)).clamp(-FLOAT16_MAX, FLOAT16_MAX)
        peak = document["max"].clamp(-FLOAT16_MAX, FLOAT16_MAX)
        self.arrays["mean"][row] = mean.to("cpu", torch.float16).numpy()
        self.arrays["max"][row] = peak.to("cpu", torch.float16).numpy()
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
        for pool in POOLS:
            array = self.arrays[pool]
            if rows < self.rows_max:  # documents without tokens left rows unused: copy the used ones
                path = self.folder / f"{pool}.trimmed.npy"
                _concatenate_to([array], rows, self.total, path)
                array = np.load(path, mmap_mode="r")
            parts[pool] = array
        labels = [self.labels[i] for i in self.row_labels[:rows]]
        return DocPool(self.widths, self.docs[:rows].copy(), labels, self.tokens[:rows].copy(), [parts], temporary=True)
