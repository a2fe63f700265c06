"""The profiler: one streaming pass of a model over a corpus into an atlas.

Hooks on every block's FFN output projection feed each batch's activations straight into
:class:`~neuronatlas.stats.SignalStats`, so no activation outlives its batch. A checkpoint is
written atomically every ``checkpoint_every`` seconds, on SIGINT/SIGTERM (between batches; then
:class:`ProfileInterrupted`, exit status 130/143) and at the end of the pass (kept until the atlas is
written); ``resume=True`` continues from it and ends with the same atlas an uninterrupted run gives
(same batches, same order of additions).

Besides the per-label statistics it records, unless switched off: z per position bucket (the
token's position within its window: 0, 1, 2, 3, 4-7, 8-15, ...; ``positions``) and, for the first
``doc_sample`` documents of each label, each document's mean and max of z, written to memmapped
files in the output folder as documents complete (:mod:`neuronatlas.docpool`).

The parts, each importing only those before it:

- :mod:`.options`  ProfileOptions, their checks, and the atlas metadata they resolve to
- :mod:`.loader`   the model, given loaded or loaded on this process's device
- :mod:`.guard`    one profile per output folder (a lock file); SIGINT/SIGTERM stop between batches
- :mod:`.output`   the output folder: refusing to clobber, checkpoints, resume, clean-up
- :mod:`.shards`   under torchrun: each rank's block of the corpus
- :mod:`.worker`   the statistics on a thread beside the forward pass (FIFO: same order, same atlas)
- :mod:`.run`      ProfileRun: the streaming pass (one batch at a time), then the atlas and its contexts
- :mod:`.ranks`    under torchrun: every rank's run, merged into one atlas on rank 0
- :mod:`.warm`     the CPU kernels, loaded on a thread from import, beside the model's load

Shapes in comments (B, T, N, L, D, K, P, k): the legend in :mod:`neuronatlas.stats`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..atlas import Atlas, load_atlas
from ..corpus import Corpus, read_corpus
from ..distributed import DEFAULT_TIMEOUT, launch_from_env
from ..files import CHECKPOINT_FILE, DOCPOOL_PARTIAL_DIR
from ..models import locate_neurons
from .guard import OutputLock, ProfileInterrupted, StopSignals
from .loader import ModelLoader
from .options import ProfileOptions, check_options, documents_per_label, resolve_max_length, run_metadata
from .output import remove_scratch, start_output
from .ranks import profile_on_ranks
from .run import ProfileRun
from .warm import warm_up_kernels

__all__ = ["profile", "ProfileInterrupted", "ProfileOptions", "ProfileRun", "run_metadata"]

warm_up_kernels()  # on a thread, beside the model's load: the first batch need not wait for them


def profile(
    model,
    corpus: str | Path | Corpus,
    out: str | Path,
    *,
    tokenizer=None,
    text_field: str = "text",
    label_field: str | None = None,
    options: ProfileOptions | None = None,
    device: str = "auto",
    device_map: str | None = None,
    load_in: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    checkpoint_every: float = 300.0,
    trust_remote_code: bool = False,
    dist_timeout: float = DEFAULT_TIMEOUT,
) -> Atlas:
    """Profile every FFN neuron of ``model`` (an HF id, a path, or a loaded model with
    ``tokenizer``) over ``corpus`` and write the atlas to ``out``.

    Started by torchrun, every rank profiles its block of the corpus and rank 0 writes the atlas
    a single process would (see :mod:`neuronatlas.profile.ranks`).

    >>> atlas = profile("my-model", "corpus.jsonl", "atlas", label_field="lang")  # doctest: +SKIP
    """
    options = options or ProfileOptions()
    check_options(options)
    out = Path(out)
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, text_field=text_field, label_field=label_field)
    loader = ModelLoader(model, tokenizer, device, device_map, load_in, options.dtype, trust_remote_code, quiet)
    launch = launch_from_env()
    if launch is not None:
        return profile_on_ranks(launch, loader, corpus, out, options, overwrite, resume, quiet, checkpoint_every,
                                dist_timeout)
    OutputLock(out).check()  # refused before the folder is touched: a running profile's, or one start_output refuses
    if start_output(out, overwrite, resume, world=1, check_only=True):
        return load_atlas(out)  # already complete: nothing left to do
    with OutputLock(out) as lock, StopSignals() as stops:
        if start_output(out, overwrite, resume, world=1, stale_lock=lock.took_over):
            return load_atlas(out)  # already complete: nothing left to do
        counts = corpus.validate()
        model, tokenizer = loader.load(options)
        neurons = locate_neurons(model)
        options.max_length = resolve_max_length(model.config, options.max_length)
        meta = run_metadata(model, tokenizer, neurons, corpus, counts, options)
        run = ProfileRun(neurons, tokenizer, corpus, meta, options, docpool_folder=out / DOCPOOL_PARTIAL_DIR,
                         documents_per_label=documents_per_label(meta, counts))
        return _profile_run(run, out, resume, quiet, checkpoint_every, stops)


def _profile_run(run: ProfileRun, out: Path, resume: bool, quiet: bool, checkpoint_every: float,
                 stops: StopSignals) -> Atlas:
    """The pass, then the atlas; a stop signal ends either with a checkpoint and ProfileInterrupted."""
    checkpoint = out / CHECKPOINT_FILE
    stopping = lambda: stops.signum is not None  # noqa: E731
    if resume and run.restore(checkpoint):
        where = "the writing of the atlas (every document profiled)" if run.finished else run.progress()
        print(f"neuronatlas: resuming at {where}", file=sys.stderr)
    if not run.finished:
        run.run(checkpoint, checkpoint_every, quiet, stopping)
        run.finished = not stopping()
        run.checkpoint(checkpoint)  # kept until the atlas is written: a resume then goes straight to writing
        if not run.finished:
            raise stops.interrupted(f"checkpoint at {run.progress()}")
    atlas = run.finish(out, quiet, stopping)
    if atlas is None:
        raise stops.interrupted("checkpoint at the end of the pass, before writing the atlas")
    remove_scratch(out)
    return atlas
