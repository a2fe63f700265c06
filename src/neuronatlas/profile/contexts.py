"""The exemplar contexts: the token ids of the windows that hold an exemplar, kept from the pass.

The atlas stores, for every window holding a saved exemplar, its document, label, start and ids.
Which windows those are is known only at the end of the pass. :class:`SeenWindows` keeps the ids
of the windows the pass tokenised (int32, 4 bytes a token) up to ``MAX_TOKENS``, so the end needs
no second tokenisation of the corpus (on the bundled tiny-llama that second pass was 2-3% of the
profile). A corpus beyond the limit, or a resumed pass (its earlier windows were tokenised by
another process), re-tokenises the corpus at the end instead: the same windows, the same table.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..corpus import Window

MAX_TOKENS = 4_000_000  # 16 MB of ids (and ~200 bytes a window besides) at most


class SeenWindows:
    """The windows a pass streamed (``record``), while they hold at most ``max_tokens`` tokens.

    ``complete``: whether they are every window of the pass from its first; False from the start
    for a resumed pass, and once the limit is passed (what was kept is then dropped)."""

    def __init__(self, complete: bool = True, max_tokens: int | None = None):
        self.complete, self.max_tokens = complete, MAX_TOKENS if max_tokens is None else max_tokens
        self.tokens = 0
        self.windows: list[Window] = []  # in corpus order, their ids an int32 array instead of a tuple of ints

    def record(self, windows: Iterable[Window]) -> Iterator[Window]:
        """``windows`` unchanged, noting each one on the way."""
        for window in windows:
            if self.complete:
                self.tokens += len(window.input_ids)
                if self.tokens <= self.max_tokens:
                    self.windows.append(dataclasses.replace(window, input_ids=array("i", window.input_ids)))
                else:
                    self.complete, self.windows = False, []
            yield window


def context_table(windows: Iterable[Window], wanted: set[int], owns: Callable[[int], bool]) -> pa.Table:
    """seq, doc, label, start, token_ids of the ``windows`` whose seq is ``wanted`` and that this run
    ``owns``, in their order."""
    chosen = [window for window in windows if window.seq in wanted and owns(window.seq)]
    ids = [np.asarray(window.input_ids, np.int32) for window in chosen]
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum([len(part) for part in ids], out=offsets[1:])
    return pa.table({
        "seq": pa.array([window.seq for window in chosen], pa.int64()),
        "doc": pa.array([window.doc for window in chosen], pa.int64()),
        "label": pa.array([window.label for window in chosen], pa.string()),
        "start": pa.array([window.start for window in chosen], pa.int64()),
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets),
                                              pa.array(np.concatenate(ids) if ids else np.zeros(0, np.int32))),
    })
