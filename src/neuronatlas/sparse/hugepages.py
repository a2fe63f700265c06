"""The row kernels' weight tables in transparent huge pages (Linux), one mapping per sparse model.

A decode step's row kernel reads a few hundred rows scattered over each (in, out) table; with 4 KB
pages nearly every row is a TLB miss whose page walk also comes from memory, as the step streams
every weight and evicts the page tables. In 2 MB pages a SmolLM2 table has one to three pages. On
SmolLM2-135M (TEAL 50%, batch 1) a step took 2-4% less (1 and 2 threads); a table's rows alone,
cache and TLB cold, 14-17% less. Where the kernel does not offer them (``madvise`` refused, THP set
to ``never``, not Linux) the tables stay where they are, in the same layout. The move happens at a
sparse model's first decode step (prefills and perplexity never read the tables): it touches fresh
memory, which took ~3 s for SmolLM2's 425 MB of tables on this project's virtual machine.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

HUGE_PAGE = 1 << 21
ALIGN = 64  # each table starts on a cache line


class Arena:
    """One huge-page mapping handed out in cache-line-aligned pieces; it lives as long as any piece."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer, self.used = buffer, 0

    @classmethod
    def sized_for(cls, tables: list[torch.Tensor]) -> Arena | None:
        """An arena that holds copies of ``tables``, or None where huge pages cannot be asked for."""
        buffer = _huge_page_buffer(sum(_aligned(table) for table in tables))
        return None if buffer is None else cls(buffer)

    def copy(self, table: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``table`` in the arena."""
        nbytes = table.numel() * table.element_size()
        piece = self.buffer[self.used : self.used + nbytes].view(table.dtype).view(table.shape)
        self.used += _aligned(table)
        return piece.copy_(table)


def _aligned(table: torch.Tensor) -> int:
    return (table.numel() * table.element_size() + ALIGN - 1) // ALIGN * ALIGN


def _huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor of ``nbytes`` starting on a huge page of an anonymous mapping advised MADV_HUGEPAGE."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes == 0:
        return None
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(advice)
    except OSError:  # THP compiled out of the kernel
        mapping.close()
        return None
    whole = np.frombuffer(mapping, np.uint8)  # keeps the mapping alive
    start = (-whole.ctypes.data) % HUGE_PAGE
    return torch.from_numpy(whole[start : start + nbytes])
