"""The streaming run of a profile: one forward pass per batch into the statistics, then the atlas.

Hooks on every block's FFN output projection feed each batch's activations straight into
:class:`~neuronatlas.stats.SignalStats`, so no activation outlives its batch (shapes: the legend in
:mod:`neuronatlas.stats`); the z around each token that enters a neuron's exemplars is cut from
the batch then and carried with it. At the end the windows that hold an exemplar give the
contexts: their ids kept from the pass, or the corpus re-tokenised (no model; see :mod:`.contexts`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from ..atlas import POSITION, Atlas, from_state, new_positions, new_signals
from ..corpus import Batch, Corpus, buffers, by_length, iter_windows, token_batches
from ..docpool import DocPoolWriter
from ..errors import NeuronAtlasError
from ..exemplar_windows import DEFAULT_BITS, window_table
from ..hooks import activation_module, capture, forward_batch, pad_token_id, window_positions
from ..loading import input_device
from ..models import ModelNeurons
from ..stats import WindowSource, make_uid
from ..tokens import vocab_table
from .contexts import SeenWindows, context_table
from .options import ProfileOptions, batch_budget, check_same_run
from .output import read_checkpoint, write_checkpoint
from .shards import Shard
from .worker import StatsWorker, placement

WRITING_DELAY_VARIABLE = "NEURONATLAS_TEST_WRITING_DELAY"  # seconds of pause after the pass (the interrupt tests)


class ProfileRun:
    """The state of one profile: statistics so far and how many windows they cover."""

    def __init__(self, neurons: ModelNeurons, tokenizer, corpus: Corpus, meta: dict, options: ProfileOptions,
                 docpool_folder: Path | None = None, documents_per_label: dict | None = None, shard: Shard | None = None):
        self.neurons, self.tokenizer, self.corpus, self.meta, self.options = neurons, tokenizer, corpus, meta, options
        self.shard = shard  # this rank's block of documents; None: the whole corpus
        self.device = input_device(neurons.model)  # statistics live with the inputs (a device map spreads the layers)
        self.signals = new_signals(meta, self.device, windows=True)
        self.background, threads = placement(self.device)  # statistics on a thread of their own, or inline
        self.threads = options.stat_threads or threads  # their intra-op threads
        self.worker: StatsWorker | None = None
        self.labels = meta["labels"]
        self.tokens_per_label = torch.zeros(len(self.labels), dtype=torch.int64, device=self.device)  # (K,)
        self.positions = new_positions(meta, self.device)  # None when positions are off
        if self.positions is not None:
            edges = meta["options"]["position_edges"]
            self.position_edges = torch.tensor(edges, dtype=torch.long, device=self.device)  # (P,)
            self.position_tokens = torch.zeros(len(edges), dtype=torch.int64, device=self.device)  # (P,)
        self.docpool = None  # needs a folder for its files; then one row per sampled document
        if options.doc_sample and docpool_folder is not None:
            per_label = documents_per_label or {label: options.doc_sample for label in self.labels}
            self.docpool = DocPoolWriter(docpool_folder, neurons.widths, self.labels, options.doc_sample, per_label,
                                         self.device, sampled_before=shard.sampled_before if shard else None,
                                         pools=options.doc_pools, encoding=options.doc_format)
        self.windows_done = shard.batches_from if shard else 0  # the first window of its first batch
        self.finished = False  # every batch counted: a resume goes straight to writing the atlas
        self.documents_done = shard.first_doc if shard else 0
        self.base = activation_module(neurons.model)
        self.pad_id = pad_token_id(tokenizer)  # padded slots are masked: any id gives the same atlas
        self.seen = SeenWindows()  # the pass's windows, for the contexts

    # -- checkpoints

    def restore(self, path: Path) -> bool:
        """Continue from the checkpoint at ``path``; False when there is none."""
        if not path.exists():
            return False
        progress, state = read_checkpoint(path)
        check_same_run(progress["meta"], self.meta)
        if progress.get("shard") != (self.shard.describe() if self.shard else None):
            raise NeuronAtlasError(
                f"--resume: {path.name} holds another block of the corpus ({progress.get('shard')}) than this rank's; "
                "rerun with the same number of processes or pass --overwrite"
            )
        restored = from_state(self.meta, state, self.device, windows=True)
        self.signals, self.tokens_per_label = restored.signals, restored.tokens_per_label
        if self.positions is not None:
            self.positions, self.position_tokens = restored.positions, restored.position_tokens
        if self.docpool is not None:
            self.docpool.load_state(state)
            self.docpool.reopen()
        self.windows_done, self.documents_done = progress["windows_done"], progress["documents_done"]
        self.finished = bool(progress.get("finished", False))
        self.seen = SeenWindows(complete=False)  # the windows before the checkpoint were another process's
        return True

    def checkpoint(self, path: Path) -> None:
        state = {"tokens_per_label": self.tokens_per_label.cpu()}
        for name, stats in self.signals.items():
            state.update(stats.state(name))
        if self.positions is not None:
            state.update(self.positions.state(POSITION))
            state["position_tokens"] = self.position_tokens.cpu()
        if self.docpool is not None:
            self.docpool.flush()  # the rows the checkpoint counts are on disk before it is
            state.update(self.docpool.state())
        progress = {"windows_done": self.windows_done, "documents_done": self.documents_done, "meta": self.meta,
                    "shard": self.shard.describe() if self.shard else None, "finished": self.finished}
        write_checkpoint(path, state, progress)

    # -- the pass

    def all_windows(self):
        """The windows this run profiles: the whole corpus, or the rank's block, numbered as in the corpus."""
        if self.shard is not None:
            return self.shard.windows_of(self.corpus, self.tokenizer, self.options.max_length)
        return iter_windows(self.corpus, self.tokenizer, self.options.max_length)

    def windows(self):
        return (window for window in self.all_windows() if window.seq >= self.windows_done)

    def progress(self) -> str:
        """Where the run stands, in words: "document 8,123 of 10,000"."""
        return f"document {self.documents_done:,} of {self.meta['documents']:,}"

    def run(self, checkpoint_path: Path, checkpoint_every: float, quiet: bool, stopping=lambda: False) -> None:
        """The forward passes from ``windows_done`` on, a buffer of ``bucket_batches`` batches at a time
        (batched by length inside it); returns early, between buffers, once ``stopping()``."""
        options = self.options
        first, stop = (self.shard.first_doc, self.shard.stop_doc) if self.shard else (0, self.meta["documents"])
        bar = tqdm(total=stop - first, initial=self.documents_done - first, unit="doc", disable=quiet,
                   dynamic_ncols=True, desc="profile" if self.shard is None else f"profile (rank 0 of {self.shard.world})")
        started, tokens_at_start, last_checkpoint = time.monotonic(), int(self.tokens_per_label.sum()), time.monotonic()
        if self.docpool is not None and not self.docpool.arrays:
            self.docpool.create()  # a fresh run (a resumed one reopened its files in restore)
        with torch.inference_mode(), self.stats_worker():
            for buffer in buffers(self.seen.record(self.windows()), options.batch_size * options.bucket_batches):
                if stopping():  # every buffer counted is whole in the statistics (step waits for the worker)
                    break
                if self.docpool is not None:  # documents sampled, and their rows, in corpus order
                    self.docpool.plan([window if self._owns(window) else None for window in buffer])
                ordered = by_length(buffer) if options.bucket_batches > 1 else buffer
                for batch in self.batches(ordered):
                    self.step(batch)
                if self.docpool is not None:
                    self.docpool.close_buffer(buffer[-1].doc)
                self.windows_done = buffer[-1].seq + 1  # what a resume skips: whole buffers only
                done_docs = min(buffer[-1].doc + 1, stop)
                bar.update(done_docs - self.documents_done)
                self.documents_done = done_docs
                rate = (int(self.tokens_per_label.sum()) - tokens_at_start) / max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                if time.monotonic() - last_checkpoint >= checkpoint_every:
                    self.checkpoint(checkpoint_path)
                    last_checkpoint = time.monotonic()
        bar.close()

    def batches(self, windows: list) -> Iterator[Batch]:
        """The forward passes of a buffer's windows: batch_size each, more while the token budget allows."""
        options = self.options
        return token_batches(windows, options.batch_size, batch_budget(options, self.neurons.widths), self.pad_id,
                             options.padding_side)

    def _owns(self, window) -> bool:
        """Whether this run counts ``window`` (a rank's buffer may hold other blocks' windows)."""
        return self.shard is None or self.shard.owns(window.seq)

    @contextmanager
    def stats_worker(self):
        """The thread the statistics run on during the block (see :mod:`.worker`)."""
        self.worker = StatsWorker(self.threads, self.device, self.background)
        try:
            yield
        finally:
            self.worker.close()
            self.worker = None

    def step(self, batch: Batch) -> None:
        """One forward pass; the hooks add every real token's activations to the statistics."""
        if self.worker is None:  # a step on its own (benchmarks): statistics inline
            self.worker = StatsWorker(self.threads, self.device, background=False)
        input_ids = batch.input_ids.to(self.device)
        real = batch.attention_mask.to(self.device).bool()  # (B, T) the tokens the model sees
        B, T = real.shape
        own = [self._owns(w) for w in batch.windows]  # a rank's batch may hold other blocks' windows: not counted
        mask = real & torch.tensor(own, device=self.device)[:, None]  # (B, T)
        label_of_row = torch.tensor([self._label_index(w.label) for w in batch.windows], device=self.device)
        seq_of_row = torch.tensor([w.seq for w in batch.windows], device=self.device)
        positions = window_positions(real)  # (B, T) position within the window, as forward_batch numbers them
        # every slot of the padded batch, flattened (B * T,): label -1 where not counted
        labels = torch.where(mask, label_of_row[:, None], -1).view(-1)
        uids = make_uid(seq_of_row[:, None].expand(B, T), positions).reshape(-1)  # ascending
        windows = None
        if self.signals["z"].radius:
            slots = torch.arange(B * T, device=self.device)
            windows = WindowSource(slots // T, slots % T, real, self.signals["z"].radius)
        buckets = None
        if self.positions is not None:
            token_buckets = (torch.bucketize(positions, self.position_edges, right=True) - 1).view(-1)  # (B * T,)
            buckets = (self.positions, token_buckets)
        pooling = self.docpool is not None and self.docpool.begin([w if o else None for w, o in zip(batch.windows, own)])

        def z_stats(layer: int, z: torch.Tensor) -> None:
            # (B * T, D) float32, converted once for the statistics, the windows and the document sample
            z = z.reshape(B * T, -1).to(self.device, torch.float32)  # a no-op for a float32 layer on the inputs' device
            if windows is not None:
                windows.z = z.view(B, T, -1)
            self.signals["z"].update(layer, z, labels, uids, windows, buckets)
            if pooling:
                self.docpool.add(layer, z.view(B, T, -1), mask)

        def gate_stats(layer: int, g: torch.Tensor) -> None:
            self.signals["gate"].update(layer, g.reshape(B * T, -1).to(self.device, torch.float32), labels, uids)

        def on_z(layer: int, z: torch.Tensor) -> None:
            self.worker.submit(lambda: z_stats(layer, z))

        def on_gate(layer: int, g: torch.Tensor) -> None:
            self.worker.submit(lambda: gate_stats(layer, g))

        with capture(self.neurons, on_z, on_gate if "gate" in self.signals else None):
            forward_batch(self.base, input_ids, real)
        self.worker.wait()
        if windows is not None:
            windows.z = None  # let the last layer's activations go
        self.tokens_per_label += torch.bincount(labels[labels >= 0], minlength=len(self.labels))
        if self.positions is not None:
            self.position_tokens += torch.bincount(token_buckets[labels >= 0], minlength=len(self.position_tokens))
        if self.docpool is not None:
            self.docpool.end()

    def _label_index(self, label: str | None) -> int:
        return 0 if label is None else self.labels.index(label)

    # -- the end

    def finish(self, out: Path | None = None, quiet: bool = True, stopping=lambda: False) -> Atlas | None:
        """The atlas of the whole corpus, with the contexts of its exemplars, saved in ``out`` if given;
        None when ``stopping()`` between its steps (nothing written: the checkpoint of the finished pass
        stays). Once saving has begun it ends: the atlas is then complete."""
        steps = tqdm(total=4, unit="step", disable=quiet, dynamic_ncols=True, desc="collecting the statistics")
        try:
            atlas = self.collect()
            steps.update()
            time.sleep(float(os.environ.get(WRITING_DELAY_VARIABLE, 0)))  # tests: time to signal this phase
            if stopping():
                return None
            atlas.windows, atlas.bottom_windows = take_windows(atlas)
            steps.set_description("collecting the exemplars' contexts", refresh=False)
            steps.update()
            if stopping():
                return None
            atlas.contexts, atlas.vocab = self.exemplar_contexts(atlas)
            steps.set_description("writing the atlas", refresh=False)
            steps.update()
            if stopping():
                return None
            if out is not None:
                atlas.save(out)
            steps.update()
            return atlas
        finally:
            steps.close()

    def collect(self) -> Atlas:
        """The statistics so far as an atlas (on the CPU), without contexts."""
        meta = dict(self.meta)
        meta["windows"] = self.windows_done
        for stats in self.signals.values():
            stats.to_("cpu")
        atlas = Atlas(meta, dict(self.signals), self.tokens_per_label.cpu())
        atlas.recount()
        if self.positions is not None:
            atlas.positions, atlas.position_tokens = self.positions.to_("cpu"), self.position_tokens.cpu()
        if self.docpool is not None:
            atlas.docpool = self.docpool.finish()
        return atlas

    def exemplar_contexts(self, atlas: Atlas) -> tuple[pa.Table, pa.Table]:
        """The windows that hold an exemplar (see :meth:`context_rows`) and the vocabulary of their ids."""
        contexts = self.context_rows(atlas)
        return contexts, self.vocab_of(contexts)

    def context_rows(self, atlas: Atlas) -> pa.Table:
        """seq, doc, label, start, token_ids of this run's windows that hold one of ``atlas``'s exemplars:
        kept from the pass when it kept them all, else the corpus re-tokenised."""
        windows = self.seen.windows if self.seen.complete else self.all_windows()
        return context_table(windows, atlas.exemplar_seqs(), lambda seq: self.shard is None or self.shard.owns(seq))

    def vocab_of(self, contexts: pa.Table) -> pa.Table:
        """id -> readable text and exact bytes of every token id in ``contexts`` (see :mod:`neuronatlas.tokens`)."""
        return vocab_table(self.tokenizer, sorted(set(pc.list_flatten(contexts["token_ids"]).to_pylist())))


def take_windows(atlas: Atlas) -> tuple[pa.Table | None, pa.Table | None]:
    """The exemplar windows carried by ``atlas``'s z statistics, as tables: top, bottom (None where
    not recorded); one row per saved exemplar, in the order of :meth:`Atlas.exemplar_table`."""
    stats = atlas.signals["z"]
    radius = stats.radius
    windows = stats.drop_windows()
    layers = range(atlas.num_layers)
    tables = {end: window_table([stats.get(f"{end}_values", l) for l in layers],
                                [stats.get(f"{end}_uid", l) for l in layers], per_layer, radius,
                                [atlas.saved_exemplars(end, l) for l in layers],
                                atlas.meta["options"].get("window_bits", DEFAULT_BITS))
              for end, per_layer in windows.items()}
    return tables.get("top"), tables.get("bottom")
