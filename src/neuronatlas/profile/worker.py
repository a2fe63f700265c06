"""Where the statistics of a batch run: inline after each layer, or on a thread of their own.

On a CPU whose cores the forward pass already uses (torch's default: a thread per core), the
statistics run inline, between the layers, on the forward's threads: a second busy thread only
makes both wait for each other (measured on 2 cores, SmolLM2-135M: 17.2 s inline against 20.5 s
on a thread). With cores to spare beyond the forward's threads, the hooks hand each layer's
activations to one worker thread (a FIFO queue), so layer l's statistics run on the spare cores
while the model computes layer l + 1; :meth:`StatsWorker.wait` blocks until the batch's work is
done. :func:`placement` decides. One thread, first in first out: the additions happen in the
very order of an inline run, so the atlas is bit for bit the same. The queue is bounded: when the
statistics fall behind, the forward waits instead of piling up activations.

The worker only reads the tensors it is handed (z of a layer: (B, T, D)); the model does not write
them again after the hook (they are inputs of the down projection, outputs of the activation).
Its intra-op threads are its own (torch's thread count is per thread), so the forward keeps its.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import torch

from .. import stats_kernel
from ..stats import auto_threads, intra_op_threads

PENDING = 4  # layers' work waiting at most: each holds a (B, T, D) activation alive


def placement(device: torch.device) -> tuple[bool, int]:
    """(background, threads) for the statistics on ``device``: a thread of their own with the cores
    the forward leaves (and the machine's load leaves free), or inline with the forward's threads."""
    if device.type != "cpu":
        return False, 0  # GPU kernels are queued: the statistics do not hold the forward up
    spare = (os.cpu_count() or 1) - torch.get_num_threads()
    if spare >= 1:
        return True, max(1, min(spare, auto_threads()))
    return False, torch.get_num_threads()


class StatsWorker:
    """Runs submitted work in order: on a background thread, or inline (``background=False``)."""

    def __init__(self, threads: int, device: torch.device, background: bool):
        self.threads, self.device = threads, device
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=PENDING)
        self.thread = threading.Thread(target=self._loop, name="neuronatlas-stats", daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        if self.thread is None:
            with intra_op_threads(self.threads, self.device):
                work()
            return
        self._raise()
        self.queue.put(work)

    def wait(self) -> None:
        """Block until everything submitted is done; re-raise the first error of the work."""
        if self.thread is not None:
            self.queue.join()
            self._raise()

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _loop(self) -> None:
        if self.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(self.threads)  # this thread's own pools: the forward's are untouched
            stats_kernel.set_threads(self.threads)
        with torch.inference_mode():
            while (work := self.queue.get()) is not None:
                try:
                    if self.error is None:  # after an error, drain without running
                        work()
                except BaseException as error:  # re-raised in the profiling thread
                    self.error = error
                finally:
                    self.queue.task_done()
            self.queue.task_done()
