"""The profiler: one streaming pass of a model over a corpus into an atlas.

Hooks on every block's FFN output projection feed each batch's activations straight into
:class:`~neuronatlas.stats.SignalStats`, so no activation outlives its batch. A checkpoint is
written atomically every ``checkpoint_every`` seconds; ``resume=True`` continues from it and ends
with the same atlas an uninterrupted run gives (same batches, same order of additions).

Besides the per-label statistics it records, unless switched off: z per position bucket (the
token's position within its window: 0, 1, 2, 3, 4-7, 8-15, ...; ``positions``) and, for the first
``doc_sample`` documents of each label, each document's mean and max of z, written to memmapped
files in the output folder as documents complete (:mod:`neuronatlas.docpool`).
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .atlas import (
    FORMAT_VERSION,
    POSITION,
    STATS_FILE,
    Atlas,
    default_position_edges,
    from_state,
    is_atlas,
    load_atlas,
    new_positions,
    new_signals,
)
from .corpus import Batch, Corpus, iter_batches, iter_windows, read_corpus
from .docpool import FILES as DOCPOOL_FILES
from .docpool import PARTIAL_DIR, DocPoolWriter
from .distributed import DEFAULT_TIMEOUT, Shard, launch_from_env
from .errors import NeuronAtlasError
from .exemplar_windows import DEFAULT_RADIUS, exemplar_windows, windows_of
from .hooks import capture
from .loading import input_device, load_config, load_model, max_positions, model_fingerprint, resolve_device
from .models import ModelNeurons, locate_neurons
from .stats import default_hist_edges, make_uid

CHECKPOINT_FILE = "checkpoint.safetensors"
UNLABELLED = "all"
DEFAULT_MAX_LENGTH = 512


@dataclass
class ProfileOptions:
    """What a profile records and how it batches; all but ``device`` must match on resume."""

    batch_size: int = 8  # windows per forward pass
    max_length: int | None = None  # tokens per window; None = min(model positions, 512)
    threshold: float = 0.0  # a neuron is active on a token when its activation > threshold
    top_k: int = 20  # exemplars kept per neuron
    gate: bool = True  # also count the gate signal act(gate(x)) of gated families
    padding_side: str = "right"
    dtype: str = "float32"
    hist_edges: list[float] = field(default_factory=lambda: default_hist_edges().tolist())
    positions: bool = True  # also keep z per position bucket
    position_edges: list[int] | None = None  # lower bucket edges; None = 0, 1, 2, 3, 4, 8, 16, ... < max_length
    doc_sample: int = 256  # documents per label whose mean and max z are kept on disk; 0 = none
    exemplar_radius: int = DEFAULT_RADIUS  # z kept this many tokens either side of each exemplar; 0 = none


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
    a single process would (see :mod:`neuronatlas.distributed`).

    >>> atlas = profile("my-model", "corpus.jsonl", "atlas", label_field="lang")  # doctest: +SKIP
    """
    options = options or ProfileOptions()
    _check_options(options)
    out = Path(out)
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, text_field=text_field, label_field=label_field)
    loader = _ModelLoader(model, tokenizer, device, device_map, load_in, options.dtype, trust_remote_code, quiet)
    launch = launch_from_env()
    if launch is not None:
        from .profile_ranks import profile_on_ranks

        return profile_on_ranks(launch, loader, corpus, out, options, overwrite, resume, quiet, checkpoint_every,
                                dist_timeout)
    if resume and is_atlas(out) and not _checkpoint_files(out):
        return load_atlas(out)  # already complete: nothing left to do
    _prepare_output(out, overwrite, resume, world=1)
    counts = corpus.validate()
    model, tokenizer = loader.load(options)
    neurons = locate_neurons(model)
    options.max_length = _max_length(model.config, options.max_length)
    meta = _metadata(model, tokenizer, neurons, corpus, counts, options)
    out.mkdir(parents=True, exist_ok=True)
    run = _ProfileRun(neurons, tokenizer, corpus, meta, options, docpool_folder=out / PARTIAL_DIR,
                      documents_per_label=_documents_per_label(meta, counts))
    if resume:
        run.restore(out / CHECKPOINT_FILE)
    run.run(out / CHECKPOINT_FILE, checkpoint_every, quiet)
    atlas = run.finish()
    atlas.save(out)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    return atlas


class _ModelLoader:
    """The model to profile: loaded already, or loaded on demand on this process's device."""

    def __init__(self, model, tokenizer, device: str, device_map: str | None, load_in: str | None, dtype: str,
                 trust_remote_code: bool, quiet: bool):
        self.model, self.tokenizer, self.device, self.device_map, self.load_in = model, tokenizer, device, device_map, load_in
        self.dtype, self.trust_remote_code, self.quiet = dtype, trust_remote_code, quiet
        self.loaded = not isinstance(model, (str, Path))
        if self.loaded and tokenizer is None:
            raise NeuronAtlasError("a loaded model needs its tokenizer: profile(model, corpus, out, tokenizer=...)")

    @property
    def name(self) -> str:
        return str(self.model) if not self.loaded else str(getattr(self.model, "name_or_path", ""))

    def comm_device(self) -> torch.device:
        if self.loaded:
            return input_device(self.model)
        if self.device_map is not None or self.load_in is not None:
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return resolve_device(self.device)

    def load(self, options: ProfileOptions):
        if self.loaded:
            return self.model, self.tokenizer
        _max_length(load_config(str(self.model), self.trust_remote_code), options.max_length)  # fail before loading weights
        return load_model(str(self.model), self.device, options.dtype, self.trust_remote_code, quiet=self.quiet,
                          device_map=self.device_map, load_in=self.load_in)


# ---- checks -----------------------------------------------------------------------------------


def _check_options(options: ProfileOptions) -> None:
    if options.batch_size < 1:
        raise NeuronAtlasError(f"batch size must be at least 1 (got {options.batch_size})")
    if options.top_k < 0:
        raise NeuronAtlasError(f"top-k must be 0 or more (got {options.top_k})")
    if options.exemplar_radius < 0:
        raise NeuronAtlasError(f"exemplar radius must be 0 or more (got {options.exemplar_radius})")
    if options.padding_side not in ("left", "right"):
        raise NeuronAtlasError(f"padding side must be left or right (got {options.padding_side!r})")
    if options.doc_sample < 0:
        raise NeuronAtlasError(f"doc sample must be 0 (none) or more documents per label (got {options.doc_sample})")


def _position_edges(options: ProfileOptions) -> list[int] | None:
    """The position buckets' lower edges for the resolved max_length (None without positions)."""
    if not options.positions:
        return None
    if options.position_edges is None:
        return default_position_edges(options.max_length)
    edges = [int(edge) for edge in options.position_edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[-1] >= options.max_length:
        raise NeuronAtlasError(
            f"position edges must start at 0 and increase below max length {options.max_length} (got {edges}); "
            "leave them out for the default 0, 1, 2, 3, 4, 8, 16, ..."
        )
    return edges


def _documents_per_label(meta: dict, counts: dict) -> dict:
    if meta["labels"] == [UNLABELLED] and not counts["documents_per_label"]:
        return {UNLABELLED: counts["documents"]}
    return counts["documents_per_label"]


def _max_length(config, requested: int | None) -> int:
    limit = max_positions(config)
    if requested is None:
        return min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if requested < 2:
        raise NeuronAtlasError(f"max length must be at least 2 (got {requested})")
    if limit is not None and requested > limit:
        raise NeuronAtlasError(
            f"max length {requested} is beyond the model's {limit} positions; use --max-length {limit} or less"
        )
    return requested


def checkpoint_name(rank: int, world: int) -> str:
    """The checkpoint file of one rank of a job of ``world`` processes (``checkpoint.safetensors`` alone)."""
    return CHECKPOINT_FILE if world == 1 else f"checkpoint.rank{rank}-of-{world}.safetensors"


def _checkpoint_files(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint*.safetensors")) if out.is_dir() else []


def _start_output(out: Path, overwrite: bool, resume: bool, world: int) -> bool:
    """Check ``out`` for a job of ``world`` processes; True when --resume finds the atlas complete."""
    if resume and is_atlas(out) and not _checkpoint_files(out):
        return True
    _prepare_output(out, overwrite, resume, world)
    return False


def _prepare_output(out: Path, overwrite: bool, resume: bool, world: int) -> None:
    """Refuse to clobber an atlas or an interrupted run unless told to."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NeuronAtlasError(f"output {out} exists and is not a folder; choose another --out")
    checkpoints = _checkpoint_files(out)
    if overwrite:
        for name in (STATS_FILE, "atlas.json", "exemplars.parquet", "contexts.parquet", "vocab.parquet", *DOCPOOL_FILES):
            (out / name).unlink(missing_ok=True)
        for path in checkpoints:
            path.unlink()
        shutil.rmtree(out.with_name(out.name + ".writing"), ignore_errors=True)
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
        return
    if is_atlas(out) and not checkpoints:
        raise NeuronAtlasError(f"{out} already holds an atlas; pass --overwrite to replace it or choose another --out")
    if checkpoints and not resume:
        raise NeuronAtlasError(f"{out} holds an interrupted profile; pass --resume to continue it or --overwrite to restart")
    if checkpoints:
        _check_same_world(checkpoints, world)
    # A run killed before its first checkpoint leaves only scratch files: it starts again from scratch.
    scratch = [item for item in out.iterdir() if item.name == PARTIAL_DIR or item.name.endswith(".safetensors.partial")]
    if not checkpoints and len(scratch) < len(list(out.iterdir())):
        raise NeuronAtlasError(f"output folder {out} is not empty and holds no atlas; choose another --out")


def _check_same_world(checkpoints: list[Path], world: int) -> None:
    """An interrupted profile resumes with as many processes as it ran on: each rank has its block."""
    expected = {checkpoint_name(rank, world) for rank in range(world)}
    strangers = [path.name for path in checkpoints if path.name not in expected]
    if strangers:
        name = strangers[0]
        ran_on = name.split("-of-")[1].split(".")[0] if "-of-" in name else "1"
        how = "python -m neuronatlas profile" if ran_on == "1" else f"torchrun --nproc_per_node {ran_on} (in all)"
        raise NeuronAtlasError(
            f"--resume: the interrupted profile ran on {ran_on} process(es) ({name}), this run on {world}; "
            f"resume it with {how} ... --resume, or pass --overwrite to restart"
        )


# ---- metadata ---------------------------------------------------------------------------------


def _metadata(model, tokenizer, neurons: ModelNeurons, corpus: Corpus, counts: dict, options: ProfileOptions) -> dict:
    if options.max_length is not None:
        options.position_edges = _position_edges(options)  # resolved like max_length: saved, checked on resume
    per_label = counts["documents_per_label"]
    labels = sorted(per_label) if corpus.label_field or corpus.label_from_folder else [UNLABELLED]
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model": {
            "name_or_path": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
            "model_type": neurons.model_type,
            "fingerprint": model_fingerprint(model),
            "num_layers": neurons.num_layers,
            "widths": neurons.widths,
            "gated": neurons.gated,
        },
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer),
        },
        "corpus": corpus.describe(),
        "labels": labels,
        "documents": counts["documents"],
        "options": asdict(options),
    }


def _check_same_run(saved: dict, current: dict) -> None:
    for key in ("model", "corpus", "labels"):
        if saved[key] != current[key]:
            raise NeuronAtlasError(
                f"--resume: the interrupted profile used another {key} "
                f"({_short(saved[key])} vs now {_short(current[key])}); rerun with the same arguments or pass --overwrite"
            )
    changed = {k: (saved["options"].get(k), v) for k, v in current["options"].items() if saved["options"].get(k) != v}
    if changed:
        listed = ", ".join(f"{k} was {old} now {new}" for k, (old, new) in changed.items())
        raise NeuronAtlasError(f"--resume: options differ from the interrupted profile ({listed}); rerun with the same options")


def _short(value) -> str:
    if isinstance(value, dict):
        for key in ("fingerprint", "path"):
            if key in value:
                return f"{key} {value[key]}"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 80 else text[:77] + "..."


# ---- the run ----------------------------------------------------------------------------------


class _ProfileRun:
    """The state of one profile: statistics so far and how many windows they cover."""

    def __init__(self, neurons: ModelNeurons, tokenizer, corpus: Corpus, meta: dict, options: ProfileOptions,
                 docpool_folder: Path | None = None, documents_per_label: dict | None = None, shard: Shard | None = None):
        self.neurons, self.tokenizer, self.corpus, self.meta, self.options = neurons, tokenizer, corpus, meta, options
        self.shard = shard  # this rank's block of documents; None: the whole corpus
        self.device = input_device(neurons.model)  # statistics live with the inputs (a device map spreads the layers)
        self.signals = new_signals(meta, self.device)
        self.labels = meta["labels"]
        self.tokens_per_label = torch.zeros(len(self.labels), dtype=torch.int64, device=self.device)
        self.positions = new_positions(meta, self.device)  # None when positions are off
        if self.positions is not None:
            edges = meta["options"]["position_edges"]
            self.position_edges = torch.tensor(edges, dtype=torch.long, device=self.device)
            self.position_tokens = torch.zeros(len(edges), dtype=torch.int64, device=self.device)
        self.docpool = None  # needs a folder for its files; then one row per sampled document
        if options.doc_sample and docpool_folder is not None:
            per_label = documents_per_label or {label: options.doc_sample for label in self.labels}
            self.docpool = DocPoolWriter(docpool_folder, neurons.widths, self.labels, options.doc_sample, per_label,
                                         self.device, sampled_before=shard.sampled_before if shard else None)
        self.windows_done = shard.batches_from if shard else 0  # the first window of its first batch
        self.documents_done = shard.first_doc if shard else 0
        self.base = neurons.model.base_model if hasattr(neurons.model, "base_model") else neurons.model
        self.takes_positions = "position_ids" in inspect.signature(self.base.forward).parameters

    # -- checkpoints

    def restore(self, path: Path) -> None:
        if not path.exists():
            return
        with safe_open(str(path), framework="pt") as handle:
            progress = json.loads(handle.metadata()["progress"])
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        _check_same_run(progress["meta"], self.meta)
        if progress.get("shard") != (self.shard.describe() if self.shard else None):
            raise NeuronAtlasError(
                f"--resume: {path.name} holds another block of the corpus ({progress.get('shard')}) than this rank's; "
                "rerun with the same number of processes or pass --overwrite"
            )
        restored = from_state(self.meta, state, self.device)
        self.signals, self.tokens_per_label = restored.signals, restored.tokens_per_label
        if self.positions is not None:
            self.positions, self.position_tokens = restored.positions, restored.position_tokens
        if self.docpool is not None:
            self.docpool.load_state(state)
            self.docpool.reopen()
        self.windows_done, self.documents_done = progress["windows_done"], progress["documents_done"]

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
                    "shard": self.shard.describe() if self.shard else None}
        partial = path.with_name(path.name + ".partial")
        save_file(state, str(partial), metadata={"progress": json.dumps(progress)})
        partial.replace(path)  # atomic: a kill leaves the old checkpoint or the new one

    # -- the pass

    def all_windows(self):
        """The windows this run profiles: the whole corpus, or the rank's block, numbered as in the corpus."""
        if self.shard is not None:
            return self.shard.windows_of(self.corpus, self.tokenizer, self.options.max_length)
        return iter_windows(self.corpus, self.tokenizer, self.options.max_length)

    def windows(self):
        return (window for window in self.all_windows() if window.seq >= self.windows_done)

    def run(self, checkpoint_path: Path, checkpoint_every: float, quiet: bool) -> None:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batches = iter_batches(self.windows(), self.options.batch_size, pad, self.options.padding_side)
        first, stop = (self.shard.first_doc, self.shard.stop_doc) if self.shard else (0, self.meta["documents"])
        bar = tqdm(total=stop - first, initial=self.documents_done - first, unit="doc", disable=quiet,
                   dynamic_ncols=True, desc="profile" if self.shard is None else f"profile (rank 0 of {self.shard.world})")
        started, tokens_at_start, last_checkpoint = time.monotonic(), int(self.tokens_per_label.sum()), time.monotonic()
        if self.docpool is not None and not self.docpool.arrays:
            self.docpool.create()  # a fresh run (a resumed one reopened its files in restore)
        with torch.inference_mode():
            for batch in batches:
                self.step(batch)
                done_docs = min(batch.windows[-1].doc + 1, stop)
                bar.update(done_docs - self.documents_done)
                self.documents_done = done_docs
                rate = (int(self.tokens_per_label.sum()) - tokens_at_start) / max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                if time.monotonic() - last_checkpoint >= checkpoint_every:
                    self.checkpoint(checkpoint_path)
                    last_checkpoint = time.monotonic()
        bar.close()

    def step(self, batch: Batch) -> None:
        """One forward pass; the hooks add every real token's activations to the statistics."""
        input_ids = batch.input_ids.to(self.device)
        real = batch.attention_mask.to(self.device).bool()  # (B, T) the tokens the model sees
        B, T = real.shape
        own = [self.shard is None or self.shard.owns(w.seq) for w in batch.windows]  # a rank's batch may hold
        mask = real & torch.tensor(own, device=self.device)[:, None]  # (B, T) ... other blocks' windows: not counted
        label_of_row = torch.tensor([self._label_index(w.label) for w in batch.windows], device=self.device)
        seq_of_row = torch.tensor([w.seq for w in batch.windows], device=self.device)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) position within the window
        token_labels = label_of_row[:, None].expand(B, T)[mask]  # (N,)
        uids = make_uid(seq_of_row[:, None].expand(B, T), positions)[mask]  # (N,) ascending
        if self.positions is not None:
            token_buckets = torch.bucketize(positions[mask], self.position_edges, right=True) - 1  # (N,)
            # tokens grouped by bucket: the statistics then see one run of rows per bucket, not one per window
            by_bucket = token_buckets.argsort(stable=True)
            sorted_buckets, sorted_uids = token_buckets[by_bucket], uids[by_bucket]
        pooling = self.docpool is not None and self.docpool.begin([w if o else None for w, o in zip(batch.windows, own)])

        def on_z(layer: int, z: torch.Tensor) -> None:
            z = z.reshape(B, T, -1).to(self.device)  # a no-op unless a device map put the layer elsewhere
            values = z[mask]
            self.signals["z"].update(layer, values, token_labels, uids)
            if self.positions is not None:
                self.positions.update(layer, values[by_bucket], sorted_buckets, sorted_uids)
            if pooling:
                self.docpool.add(layer, z, mask)

        def on_gate(layer: int, g: torch.Tensor) -> None:
            self.signals["gate"].update(layer, g.reshape(B, T, -1).to(self.device)[mask], token_labels, uids)

        kwargs = {"input_ids": input_ids, "attention_mask": real.long(), "use_cache": False}
        if self.takes_positions:
            kwargs["position_ids"] = positions
        with capture(self.neurons, on_z, on_gate if "gate" in self.signals else None):
            self.base(**kwargs)
        self.tokens_per_label += torch.bincount(token_labels, minlength=len(self.labels))
        if self.positions is not None:
            self.position_tokens += torch.bincount(token_buckets, minlength=len(self.position_tokens))
        if self.docpool is not None:
            self.docpool.end()
        self.windows_done = batch.windows[-1].seq + 1

    def _label_index(self, label: str | None) -> int:
        return 0 if label is None else self.labels.index(label)

    # -- the end

    def finish(self) -> Atlas:
        """The atlas of the whole corpus, with the contexts of its exemplars."""
        atlas = self.collect()
        atlas.contexts, atlas.vocab = self.exemplar_contexts(atlas)
        atlas.windows = self.activation_windows(atlas, windows_of(atlas.contexts))
        return atlas

    def collect(self) -> Atlas:
        """The statistics so far as an atlas (on the CPU), without contexts."""
        meta = dict(self.meta)
        meta["windows"] = self.windows_done
        meta["tokens"] = int(self.tokens_per_label.sum())
        meta["tokens_per_label"] = dict(zip(self.labels, self.tokens_per_label.tolist()))
        signals = {name: stats for name, stats in self.signals.items()}
        for stats in signals.values():
            stats.tensors = {key: tensor.cpu() for key, tensor in stats.tensors.items()}
            if stats.hist_edges is not None:
                stats.hist_edges = stats.hist_edges.cpu()
        atlas = Atlas(meta, signals, self.tokens_per_label.cpu())
        if self.positions is not None:
            self.positions.tensors = {key: tensor.cpu() for key, tensor in self.positions.tensors.items()}
            atlas.positions, atlas.position_tokens = self.positions, self.position_tokens.cpu()
        if self.docpool is not None:
            atlas.docpool = self.docpool.finish()
        return atlas

    def exemplar_contexts(self, atlas: Atlas) -> tuple[pa.Table, pa.Table]:
        """Re-tokenise the corpus (no model) to keep the windows that hold an exemplar."""
        contexts = self.context_rows(atlas)
        return contexts, self.vocab_of(contexts)

    def context_rows(self, atlas: Atlas) -> pa.Table:
        """seq, doc, label, start, token_ids of this run's windows that hold one of ``atlas``'s exemplars."""
        wanted = set()
        for layer in range(atlas.num_layers):
            if self.options.top_k:
                uid = atlas.stat("top_uid", layer)
                wanted.update((uid[uid >= 0] >> 24).unique().tolist())
        rows = {"seq": [], "doc": [], "label": [], "start": [], "token_ids": []}
        for window in self.all_windows():
            if window.seq in wanted and (self.shard is None or self.shard.owns(window.seq)):
                rows["seq"].append(window.seq)
                rows["doc"].append(window.doc)
                rows["label"].append(window.label)
                rows["start"].append(window.start)
                rows["token_ids"].append(list(window.input_ids))
        return pa.table({
            "seq": pa.array(rows["seq"], pa.int64()),
            "doc": pa.array(rows["doc"], pa.int64()),
            "label": pa.array(rows["label"], pa.string()),
            "start": pa.array(rows["start"], pa.int64()),
            "token_ids": pa.array(rows["token_ids"], pa.list_(pa.int32())),
        })

    def activation_windows(self, atlas: Atlas, windows: list) -> pa.Table | None:
        """z around each of ``atlas``'s exemplars whose window is in ``windows`` (None with radius 0)."""
        if not self.options.exemplar_radius or not self.options.top_k:
            return None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        top_uid = [atlas.stat("top_uid", layer) for layer in range(atlas.num_layers)]
        return exemplar_windows(self.neurons, windows, top_uid, self.options.exemplar_radius,
                                self.options.batch_size, pad)

    def vocab_of(self, contexts: pa.Table) -> pa.Table:
        """id -> decoded string of every token id in ``contexts``."""
        ids = sorted(set(pc.list_flatten(contexts["token_ids"]).to_pylist()))
        return pa.table({
            "id": pa.array(ids, pa.int32()),
            "token": pa.array([self.tokenizer.decode([i]) for i in ids], pa.string()),
        })
