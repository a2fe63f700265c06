"""The profiler's CPU kernels, loaded ahead of the first batch.

They are compiled once and cached on disk, yet loading them (and pandas, which pyarrow imports at
its first array built from numpy) still takes a few tenths of a second: on a tiny model that is
more than a whole profile's forward pass. :func:`warm_up_kernels` does it on a thread of its own,
started when :mod:`neuronatlas.profile` is imported, so that it runs beside the model's load.

Not a daemon thread: a process that ends while LLVM is still loading a kernel (a CLI error within a
second of the import) aborted in C++ teardown ("terminate called without an active exception",
status 134). The interpreter now waits for the load (a few tenths of a second) before it exits.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .. import stats_kernel
from ..exemplar_windows import window_table
from ..stats import SignalStats, WindowSource, default_hist_edges, make_uid

_started = threading.Event()


def warm_up_kernels() -> None:
    """Load the statistics' and the exemplar windows' kernels on a thread (once per process)."""
    if _started.is_set() or not stats_kernel.enabled():
        return
    _started.set()
    threading.Thread(target=_load, name="neuronatlas-kernels", daemon=False).start()  # joined at exit: see above


def _load() -> None:
    stats = SignalStats([3], 1, 0.0, default_hist_edges(), 1, "cpu", 1, 1)
    slots = torch.arange(4)
    windows = WindowSource(slots // 2, slots % 2, torch.ones(2, 2, dtype=torch.bool), 1, torch.zeros(2, 2, 3))
    stats.update(0, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), slots, windows,
                 (SignalStats([3], 1, 0.0), torch.zeros(4, dtype=torch.long)))
    pooled = torch.zeros(1, 6, dtype=torch.float64), torch.zeros(1, 6)
    stats_kernel.pool_documents(torch.zeros(4, 3).numpy(), np.zeros(4, np.int64), pooled[0][:, :3].numpy(),
                                pooled[1][:, :3].numpy(), 2)
    uid = make_uid(torch.zeros(3, 1), torch.ones(3, 1))  # (D=3, k=1): one exemplar per neuron
    window_table([torch.ones(3, 1)], [uid], [torch.ones(3, 1, 3)], 1)  # radius 1: windows of 3
