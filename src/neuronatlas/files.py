"""The names of the files in an atlas folder and of those a profile in progress keeps there.

What each file holds: :mod:`neuronatlas.atlas` (the atlas) and :mod:`neuronatlas.docpool` (the
document sample). The profiler's scratch files are removed when the atlas is complete.
"""

from __future__ import annotations

# ---- the atlas ---------------------------------------------------------------------------------

META_FILE = "atlas.json"
STATS_FILE = "stats.safetensors"
EXEMPLARS_FILE = "exemplars.parquet"
CONTEXTS_FILE = "contexts.parquet"
VOCAB_FILE = "vocab.parquet"
DOCPOOL_MEAN_FILE = "docpool_mean.npy"
DOCPOOL_MAX_FILE = "docpool_max.npy"
DOCPOOL_TABLE_FILE = "docpool.parquet"
DOCPOOL_FILES = (DOCPOOL_MEAN_FILE, DOCPOOL_MAX_FILE, DOCPOOL_TABLE_FILE)
ATLAS_FILES = (STATS_FILE, META_FILE, EXEMPLARS_FILE, CONTEXTS_FILE, VOCAB_FILE, *DOCPOOL_FILES)

# ---- a profile in progress ---------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.safetensors"  # one process; under torchrun see checkpoint_name
CHECKPOINT_GLOB = "checkpoint*.safetensors"
DOCPOOL_PARTIAL_DIR = "docpool.partial"  # the document sample's memmaps while profiling
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written, renamed when complete
STAGING_SUFFIX = ".writing"  # the folder an atlas is written into before it replaces the old one


def checkpoint_name(rank: int, world: int) -> str:
    """The checkpoint file of one rank of a job of ``world`` processes (``checkpoint.safetensors`` alone)."""
    return CHECKPOINT_FILE if world == 1 else f"checkpoint.rank{rank}-of-{world}.safetensors"

