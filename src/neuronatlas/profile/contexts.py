"""The exemplar contexts: the token ids of the windows that hold an exemplar, kept from the pass.

The atlas stores, for every window holding a saved exemplar, its document, label, start and ids.
Which windows those are is known only at the end of the pass. :class:`SeenWindows` keeps the ids
of the windows the pass tokenised (int32, 4 bytes a token) up to ``MAX_TOKENS``, so the end needs
no second tokenisation of the corpus (on the bundled tiny-llama that second pass was 2-3% of the
profile). A corpus beyond the limit, or a resumed pass (its earlier windows were tokenised by
another process), re-tokenises the corpus at the end instead: the same windows, the same table.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..corpus import Window

MAX_TOKENS = 4_000_000  # 16 MB of ids (and ~170 bytes a window besides) at most


class SeenWindows:
    """The windows a pass streamed (``record``), while they hold at most ``max_tokens`` tokens.

    ``complete``: whether they are every window of the pass from its first; False from the start
    for a resumed pass, and once the limit is passed (what was kept is then dropped)."""

    def __init__(self, complete: bool = True, max_tokens: int | None = None):
        self.complete, self.max_tokens = complete, MAX_TOKENS if max_tokens is None else max_tokens
        self.tokens = 0
        self.kept: list[tuple[int, int, str | None, int, array]] = []  # (seq, doc, label, start, ids) in corpus order

    def record(self, windows: Iterable[Window]) -> Iterator[Window]:
        """``windows`` unchanged, noting each one's ids on the way."""
        for window in windows:
            if self.complete:
                self.tokens += len(window.input_ids)
                if self.tokens <= self.max_tokens:
                    self.kept.append((window.seq, window.doc, window.label, window.start, array("i", window.input_ids)))
                else:
                    self.complete, self.kept = False, []
            yield window

    def rows(self) -> Iterator[tuple[int, int, str | None, int, array]]:
        return iter(self.kept)


def context_table(windows: Iterable, wanted: set[int], owns: Callable[[int], bool]) -> pa.Table:
    """seq, doc, label, start, token_ids of the ``windows`` (Window objects or SeenWindows rows)
    whose seq is ``wanted`` and that this run ``owns``, in their order."""
    rows = {"seq": [], "doc": [], "label": [], "start": [], "token_ids": []}
    for window in windows:
        seq, doc, label, start, ids = (window if isinstance(window, tuple) else
                                       (window.seq, window.doc, window.label, window.start, window.input_ids))
        if seq in wanted and owns(seq):
            rows["seq"].append(seq)
            rows["doc"].append(doc)
            rows["label"].append(label)
            rows["start"].append(start)
            rows["token_ids"].append(np.asarray(ids, np.int32))
    lengths = np.array([len(ids) for ids in rows["token_ids"]], np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(rows["token_ids"]) if rows["token_ids"] else np.zeros(0, np.int32)
    return pa.table({
        "seq": pa.array(rows["seq"], pa.int64()),
        "doc": pa.array(rows["doc"], pa.int64()),
        "label": pa.array(rows["label"], pa.string()),
        "start": pa.array(rows["start"], pa.int64()),
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, pa.int32())),
    })
