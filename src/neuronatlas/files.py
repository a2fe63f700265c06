"""The names of the files in an atlas folder and of those a profile in progress keeps there, and
writing a small file whole or not at all.

What each file holds: :mod:`neuronatlas.atlas` (the atlas) and :mod:`neuronatlas.docpool` (the
document sample). The profiler's scratch files are removed when the atlas is complete.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# ---- the atlas ---------------------------------------------------------------------------------

META_FILE = "atlas.json"
STATS_FILE = "stats.safetensors"
HISTOGRAMS_FILE = "histograms.parquet"
EXEMPLARS_FILE = "exemplars.parquet"
BOTTOM_EXEMPLARS_FILE = "bottom_exemplars.parquet"
CONTEXTS_FILE = "contexts.parquet"
VOCAB_FILE = "vocab.parquet"
DOCPOOL_MEAN_FILE = "docpool_mean.npy"
DOCPOOL_MAX_FILE = "docpool_max.npy"
DOCPOOL_TABLE_FILE = "docpool.parquet"
DOCPOOL_MEAN_KNOTS_FILE = "docpool_mean_knots.npy"  # the values that decode docpool_mean.npy's rank codes
DOCPOOL_MAX_KNOTS_FILE = "docpool_max_knots.npy"
DOCPOOL_FILES = (DOCPOOL_MEAN_FILE, DOCPOOL_MAX_FILE, DOCPOOL_TABLE_FILE, DOCPOOL_MEAN_KNOTS_FILE, DOCPOOL_MAX_KNOTS_FILE)
ATLAS_FILES = (STATS_FILE, HISTOGRAMS_FILE, META_FILE, EXEMPLARS_FILE, BOTTOM_EXEMPLARS_FILE, CONTEXTS_FILE, VOCAB_FILE, *DOCPOOL_FILES)

# ---- a profile in progress ---------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.safetensors"  # one process; under torchrun see checkpoint_name
CHECKPOINT_GLOB = "checkpoint*.safetensors"
DOCPOOL_PARTIAL_DIR = "docpool.partial"  # the document sample's memmaps while profiling
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written, renamed when complete
# what a process killed while writing a checkpoint leaves: our partial file, and safetensors' own
# temporary file (it writes ".tmpXXXXXX" beside the target, then renames it)
SCRATCH_GLOBS = ("checkpoint*" + PARTIAL_SUFFIX, ".tmp*")
STAGING_SUFFIX = ".writing"  # the folder an atlas is written into before it replaces the old one
LOCK_FILE = ".neuronatlas.lock"  # "PID host" of the profile writing the folder (see profile/guard.py)


def checkpoint_name(rank: int, world: int) -> str:
    """The checkpoint file of one rank of a job of ``world`` processes (``checkpoint.safetensors`` alone)."""
    return CHECKPOINT_FILE if world == 1 else f"checkpoint.rank{rank}-of-{world}.safetensors"



def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, then the mode every other file gets (0666 less the umask): save_file
    writes 0600, which colleagues on a shared filesystem cannot read."""
    from safetensors.torch import save_file  # torch: only for the verbs that write tensors

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process umask; read from /proc where it can be, since os.umask can only read it by changing it
    (for an instant, in which another thread could create a file with the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_text_whole(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it (named for this process
    and thread, so concurrent writers never share one), then renamed onto it. A reader never sees
    half a file, which a server's other thread reading the same file while it is written would."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
