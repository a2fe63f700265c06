"""The profiler under torchrun: every rank profiles its block of the corpus, rank 0 writes the atlas.

Each rank runs the batches a single process would run over its block (see
:func:`neuronatlas.distributed.plan_shards`), so the merged statistics, exemplars and exemplar
windows equal those of one process.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .atlas import Atlas, load_atlas
from .corpus import Corpus
from .distributed import (
    Group,
    Launch,
    batch_share,
    gather_docpool,
    gather_tables,
    merge_stats_,
    plan_shards,
    rank_device,
    stopped_by_launcher,
)
from .docpool import PARTIAL_DIR
from .errors import NeuronAtlasError
from .exemplar_windows import windows_of
from .models import locate_neurons
from .profile import (
    ProfileOptions,
    _checkpoint_files,
    _max_length,
    _metadata,
    _ModelLoader,
    _ProfileRun,
    _start_output,
    checkpoint_name,
)


def profile_on_ranks(launch: Launch, loader: _ModelLoader, corpus: Corpus, out: Path, options: ProfileOptions,
                      overwrite: bool, resume: bool, quiet: bool, checkpoint_every: float, timeout: float) -> Atlas:
    """The profile of one rank of a torchrun job; every rank returns the merged statistics, rank 0 writes them."""
    loader.device = rank_device(launch, loader.device) if loader.device_map is None else loader.device
    if loader.device_map is not None and launch.local_world > 1:
        raise NeuronAtlasError(
            f"--device-map spreads one process over all devices of a machine, but torchrun started {launch.local_world} "
            "processes on this one; use --nproc_per_node 1 with --device-map"
        )
    group = Group.join(launch, loader.comm_device(), timeout)
    try:
        group.check_same({"options": asdict(options), "model": loader.name, "corpus": corpus.describe(), "out": str(out),
                          "resume": resume, "overwrite": overwrite, "version": __version__}, "command line")
        complete = group.on_rank0(lambda: _start_output(out, overwrite, resume, launch.world), "preparing the output")
        if complete:
            return load_atlas(out) if group.rank == 0 else None
        counts = corpus.validate()
        model, tokenizer = loader.load(options)
        neurons = locate_neurons(model)
        options.max_length = _max_length(model.config, options.max_length)
        meta = _metadata(model, tokenizer, neurons, corpus, counts, options)
        group.check_same({"fingerprint": meta["model"]["fingerprint"], "widths": meta["model"]["widths"]}, "model")
        shard = plan_shards(group, corpus, tokenizer, options.max_length, meta["labels"], options.batch_size)
        out.mkdir(parents=True, exist_ok=True)
        run = _ProfileRun(neurons, tokenizer, corpus, meta, options, docpool_folder=out / PARTIAL_DIR / f"rank{group.rank}",
                          documents_per_label=shard.documents_per_label, shard=shard)
        checkpoint = out / checkpoint_name(launch.rank, launch.world)
        with stopped_by_launcher(group.rank, out):
            if resume:
                run.restore(checkpoint)
            run.run(checkpoint, checkpoint_every, quiet or group.rank != 0)
            run.checkpoint(checkpoint)  # this rank's part is safe before the merge, which a failing rank can stop
            atlas = _merged(group, run, out)
            if group.rank == 0:
                atlas.save(out)
            group.barrier("writing the atlas")
        checkpoint.unlink(missing_ok=True)
        if group.rank == 0:
            for path in _checkpoint_files(out):
                path.unlink(missing_ok=True)
            shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
        return atlas
    finally:
        group.leave()


def _merged(group: Group, run: _ProfileRun, out: Path) -> Atlas:
    """Every rank's statistics added up; rank 0 also gets the document sample and the contexts."""
    atlas = run.collect()
    for stats in atlas.signals.values():
        merge_stats_(group, stats)
    group.reduce_(atlas.tokens_per_label, "sum")
    if atlas.positions is not None:
        merge_stats_(group, atlas.positions)
        group.reduce_(atlas.position_tokens, "sum")
    atlas.meta["tokens"] = int(atlas.tokens_per_label.sum())
    atlas.meta["tokens_per_label"] = dict(zip(atlas.labels, atlas.tokens_per_label.tolist()))
    atlas.meta["windows"] = run.shard.windows
    if atlas.docpool is not None:
        atlas.docpool = gather_docpool(group, atlas.docpool, out / PARTIAL_DIR)
    contexts = gather_tables(group, run.context_rows(atlas), "exemplar contexts", everywhere=True)
    # each rank re-runs its share of the exemplar windows in the batches one process would: the same values
    windows = windows_of(contexts)
    first, stop = batch_share(len(windows), run.options.batch_size, group.rank, group.world)
    activations = gather_tables(group, run.activation_windows(atlas, windows[first:stop]), "exemplar windows")
    if group.rank == 0:
        atlas.contexts, atlas.vocab, atlas.windows = contexts, run.vocab_of(contexts), activations
    return atlas
