"""How a torchrun profile splits the corpus: one contiguous block of documents per rank.

The merged atlas equals a single process's:

- windows keep their global number ``seq``: a planning pass counts each document's windows
  (every rank tokenises 1/world of the documents; the counts are all-gathered), so a rank's
  first window is numbered after all the windows of the documents before its block;
- blocks are contiguous runs of documents with about the same number of tokens each, so the
  document sample, the contexts and anything else in corpus order is rank 0's, then rank 1's ...;
- a rank runs the very batches one process would (see :class:`Shard`), so every activation is
  bit for bit the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice

import numpy as np

from ..corpus import iter_windows
from ..distributed import Group
from ..errors import NeuronAtlasError


@dataclass(frozen=True)
class Shard:
    """One rank's block of documents and the batches that hold its windows.

    The rank runs the very buffers one process would (windows ``size * i`` to ``size * (i + 1) - 1``,
    ``size`` = batch size x bucket batches, batched by length within), so every activation is bit
    for bit the same: the buffers at the ends of its block may hold windows of the neighbouring
    blocks, which run through the model but are not counted.
    """

    rank: int
    world: int
    first_doc: int  # the block's documents: [first_doc, stop_doc)
    stop_doc: int
    first_seq: int  # the block's windows: [first_seq, stop_seq), numbered as in the whole corpus
    stop_seq: int
    batches_from: int  # the first window of the block's first buffer of batches
    batches_to: int  # the window after its last one
    start_doc: int  # the document holding window batches_from ...
    start_doc_seq: int  # ... and the number of that document's first window
    windows: int  # windows in the whole corpus
    sampled_before: tuple[int, ...]  # per label: documents with a window before the block
    documents_per_label: dict  # the block's documents per label

    def describe(self) -> dict:
        return {"rank": self.rank, "world": self.world, "documents": [self.first_doc, self.stop_doc],
                "windows": [self.first_seq, self.stop_seq]}

    def owns(self, seq: int) -> bool:
        return self.first_seq <= seq < self.stop_seq

    def windows_of(self, corpus, tokenizer, max_length: int):
        """The windows of the block's batches, numbered as in the whole corpus."""
        documents = islice(iter(corpus), self.start_doc, None)
        for window in iter_windows(documents, tokenizer, max_length):
            seq = window.seq + self.start_doc_seq
            if seq >= self.batches_to:
                return
            if seq >= self.batches_from:
                yield replace(window, seq=seq)


def plan_shards(group: Group, corpus, tokenizer, max_length: int, labels: list[str], batch_size: int) -> Shard:
    """Count every document's windows and tokens (1/world of them per rank) and cut balanced blocks;
    ``batch_size``: the windows of one buffer of the profile's batches, to which the blocks' batches align."""
    counted = []  # (doc, label index, windows, tokens) of this rank's share
    for doc in corpus:
        if doc.index % group.world == group.rank:
            windows = list(iter_windows([doc], tokenizer, max_length))
            label = labels.index(doc.label) if doc.label is not None else 0
            counted.append((doc.index, label, len(windows), sum(len(w.input_ids) for w in windows)))
    rows = sorted(row for part in group.all_gather_object(counted, "counting the windows") for row in part)
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)  # (documents, 4): doc, label, windows, tokens
    documents = len(table)
    if documents < group.world:
        raise NeuronAtlasError(
            f"{group.world} ranks but the corpus has only {documents} document(s); start at most {documents} "
            "processes (torchrun --nproc_per_node) or profile without torchrun"
        )
    bounds = balanced_bounds(table[:, 3], group.world)
    first, stop = bounds[group.rank], bounds[group.rank + 1]
    seq_end = np.cumsum(table[:, 2])  # (documents,) the window after each document's last
    seq_start = seq_end - table[:, 2]
    first_seq, stop_seq, total = int(seq_start[first]), int(seq_end[stop - 1]), int(seq_end[-1])
    batches_from = first_seq // batch_size * batch_size
    batches_to = min(-(-stop_seq // batch_size) * batch_size, total) if stop_seq > first_seq else batches_from
    start_doc = int(np.searchsorted(seq_end, batches_from, side="right")) if batches_from < total else first
    before = table[:first]
    sampled_before = tuple(int(((before[:, 1] == k) & (before[:, 2] > 0)).sum()) for k in range(len(labels)))
    block_labels = table[first:stop, 1]
    per_label = {label: int((block_labels == k).sum()) for k, label in enumerate(labels)}
    return Shard(group.rank, group.world, int(first), int(stop), first_seq, stop_seq, batches_from, batches_to,
                 start_doc, int(seq_start[start_doc]), total, sampled_before, per_label)


def balanced_bounds(tokens: np.ndarray, world: int) -> list[int]:
    """world + 1 document bounds: contiguous blocks, each with about 1/world of the tokens and at least one document."""
    total = np.cumsum(tokens)  # (documents,)
    targets = total[-1] * np.arange(1, world) / world if len(total) else np.zeros(world - 1)
    cuts = np.searchsorted(total, targets, side="left") + 1  # a block ends after the document crossing its share
    bounds = [0]
    for rank, cut in enumerate(cuts.tolist(), start=1):
        lowest, highest = bounds[-1] + 1, len(tokens) - (world - rank)  # leave a document for every later rank
        bounds.append(min(max(cut, lowest), highest))
    return bounds + [len(tokens)]

