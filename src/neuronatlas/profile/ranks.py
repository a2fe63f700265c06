"""The profiler under torchrun: every rank profiles its block of the corpus, rank 0 writes the atlas.

Each rank runs the batches a single process would run over its block (see
:func:`neuronatlas.profile.shards.plan_shards`), then the statistics are merged with collectives
by each field's rule (:data:`neuronatlas.stats.REDUCTIONS`): sums and counts are all-reduced,
minima and maxima likewise, and the top-k exemplars are all-gathered and re-ranked by (activation
desc, uid asc) -- exact, whatever the order, their windows moving with them. So the merged
statistics, exemplars and exemplar windows equal those of one process.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import __version__
from ..atlas import Atlas, load_atlas
from ..corpus import Corpus
from ..distributed import Group, Launch, rank_device, stopped_by_launcher
from ..docpool import DocPool
from ..errors import NeuronAtlasError
from ..files import DOCPOOL_PARTIAL_DIR, checkpoint_name
from ..models import locate_neurons
from ..stats import SignalStats
from .loader import ModelLoader
from .guard import OutputLock
from .options import ProfileOptions, resolve_max_length, run_metadata
from .output import remove_scratch, start_output
from .run import ProfileRun, take_windows
from .shards import plan_shards


def profile_on_ranks(launch: Launch, loader: ModelLoader, corpus: Corpus, out: Path, options: ProfileOptions,
                     overwrite: bool, resume: bool, quiet: bool, checkpoint_every: float, timeout: float) -> Atlas:
    """The profile of one rank of a torchrun job; every rank returns the merged statistics, rank 0 writes them."""
    loader.device = rank_device(launch, loader.device) if loader.device_map is None else loader.device
    if loader.device_map is not None and launch.local_world > 1:
        raise NeuronAtlasError(
            f"--device-map spreads one process over all devices of a machine, but torchrun started {launch.local_world} "
            "processes on this one; use --nproc_per_node 1 with --device-map"
        )
    group = Group.join(launch, loader.comm_device(), timeout)
    lock = OutputLock(out)  # rank 0's, for the whole job: the other ranks write only after its checks

    def prepare() -> bool:
        lock.check()
        if start_output(out, overwrite, resume, launch.world, check_only=True):
            return True
        lock.acquire()
        return start_output(out, overwrite, resume, launch.world, stale_lock=lock.took_over)

    try:
        group.check_same({"options": asdict(options), "model": loader.name, "corpus": corpus.describe(), "out": str(out),
                          "resume": resume, "overwrite": overwrite, "version": __version__}, "command line")
        complete = group.on_rank0(prepare, "preparing the output")
        if complete:
            return load_atlas(out) if group.rank == 0 else None
        counts = corpus.validate()
        model, tokenizer = loader.load(options)
        neurons = locate_neurons(model)
        options.max_length = resolve_max_length(model.config, options.max_length)
        meta = run_metadata(model, tokenizer, neurons, corpus, counts, options)
        group.check_same({"fingerprint": meta["model"]["fingerprint"], "widths": meta["model"]["widths"]}, "model")
        shard = plan_shards(group, corpus, tokenizer, options.max_length, meta["labels"],
                            options.batch_size * options.bucket_batches)  # blocks of whole buffers
        out.mkdir(parents=True, exist_ok=True)
        run = ProfileRun(neurons, tokenizer, corpus, meta, options,
                         docpool_folder=out / DOCPOOL_PARTIAL_DIR / f"rank{group.rank}",
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
            remove_scratch(out)
        return atlas
    finally:
        lock.release()
        group.leave()


def _merged(group: Group, run: ProfileRun, out: Path) -> Atlas:
    """Every rank's statistics added up; rank 0 also gets the document sample and the contexts."""
    atlas = run.collect()
    for stats in atlas.signals.values():
        merge_across_ranks(group, stats)
    group.reduce_(atlas.tokens_per_label, "sum")
    if atlas.positions is not None:
        merge_across_ranks(group, atlas.positions)
        group.reduce_(atlas.position_tokens, "sum")
    atlas.recount()
    atlas.meta["windows"] = run.shard.windows
    if atlas.docpool is not None:
        atlas.docpool = gather_docpool(group, atlas.docpool, out / DOCPOOL_PARTIAL_DIR)
    contexts = gather_tables(group, run.context_rows(atlas), "exemplar contexts", everywhere=True)
    windows = take_windows(atlas) if group.rank == 0 else atlas.signals["z"].drop_windows()
    if group.rank == 0:
        atlas.contexts, atlas.vocab = contexts, run.vocab_of(contexts)
        atlas.windows, atlas.bottom_windows = windows
    return atlas


def merge_across_ranks(group: Group, stats: SignalStats) -> None:
    """All-reduce one SignalStats in place: sums and counts add, min/max reduce, exemplars re-rank."""
    for _key, tensor, reduction in stats.reduced():
        group.reduce_(tensor, reduction)
    for layer, end in stats.exemplar_lists():
        values, uids, *windows = stats.ranked(layer, end)  # (D, k) [, window (D, k, W) float16]
        gathered = [group.all_gather(values), group.all_gather(uids)]  # each world x (D, k)
        if windows:  # gathered as float32: not every backend moves float16
            gathered.append([part.half() for part in group.all_gather(windows[0].float())])
        parts = list(zip(*gathered))  # per rank: values, uid [, window]
        stats.set_ranked_(layer, end, *parts[0])
        for other in parts[1:]:
            stats.merge_ranked_(layer, end, *other)


def gather_docpool(group: Group, pool: DocPool, folder: Path) -> DocPool | None:
    """Rank 0: every rank's document sample, in rank (= corpus) order; other ranks send theirs, get None."""
    header = (pool.docs.tolist(), pool.labels, pool.tokens.tolist())
    headers = group.all_gather_object(header, "gathering the document sample")
    if group.rank != 0:
        for name in pool.pools:
            group.send_rows(pool.parts[0][name], 0)  # a rank's own sample is one part
        return None
    parts = list(pool.parts)
    for rank, (docs, _labels, _tokens) in enumerate(headers[1:], start=1):
        received = {}
        for name in pool.pools:
            path = Path(folder) / f"from-rank{rank}" / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            received[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(docs), sum(pool.widths)))
            group.receive_rows(received[name], rank)
            received[name].flush()
        parts.append(received)
    docs = np.concatenate([np.asarray(h[0], np.int64) for h in headers])
    tokens = np.concatenate([np.asarray(h[2], np.int64) for h in headers])
    labels = [label for h in headers for label in h[1]]
    return DocPool(list(pool.widths), docs, labels, tokens, parts, encoding=pool.encoding)


def gather_tables(group: Group, table: pa.Table | None, what: str, everywhere: bool = False) -> pa.Table | None:
    """Every rank's arrow table (contexts, exemplar windows) concatenated in rank (= corpus) order, on
    rank 0 (None elsewhere) or, ``everywhere``, on every rank; None when the tables are None."""
    if everywhere:
        tables = group.all_gather_object(table, f"gathering the {what}")
    else:
        tables = group.gather_object(table, f"gathering the {what}")
    if tables is None or any(part is None for part in tables):
        return None
    return pa.concat_tables(tables)
