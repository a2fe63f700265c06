"""The atlas on disk: per-neuron statistics of one model over one corpus.

An atlas is a directory::

    atlas.json           metadata: format version, model, tokenizer, corpus, labels, counts, options
    stats.safetensors    dense statistics, keys "<signal>.<stat>.<layer>" (see stats.SignalStats)
                         plus "tokens_per_label" (K,) and "hist_edges" (B - 1,); not the exemplar
                         lists (format 2): load_atlas reads them back from the exemplar tables;
                         nor the histograms (format 3); the sums as float32 and, for the sums of
                         squares, "<signal>.m2.<layer>" = sumsq - sum² / tokens in float32 (format
                         4; load_atlas gives sumsq back in float64, see centred_moments)
    histograms.parquet   the histograms "<signal>.hist.<layer>" (D, B) int32, one row per neuron: key,
                         counts; zstd packs their many empty bins (61 bytes a neuron on SmolLM2
                         over 60 documents, against 256 in stats.safetensors)
    exemplars.parquet    one row per top-k exemplar: layer, neuron, rank, activation, seq, pos,
                         doc, label, and (unless profiled with --exemplar-radius 0) window_start
                         window_scale, window_bits and window_codes: the neuron's z at positions
                         window_start, window_start + 1, ... of window seq, up to R tokens either
                         side of pos, as µ-law codes x scale (see exemplar_windows.py; the value
                         at pos is exact in activation)
    bottom_exemplars.parquet  (unless profiled with --bottom-k 0) the same for the bottom-k exemplars
                         of z, rank 0 the most negative; only those below zero (a ReLU neuron has none)
    contexts.parquet     the token ids of every window an exemplar points to: seq, doc, label,
                         start, token_ids
    vocab.parquet        token id -> the string it decodes to, to show contexts without the model
    docpool_mean.npy     (optional) uint8 (docs, total neurons): each sampled document's rank among
                         the sample by its mean z (or, with --doc-format float16, the float16 mean)
    docpool_mean_knots.npy  (with rank codes) float16 (17, total neurons): the values that decode them
    docpool_max.npy      (with --doc-pools mean,max) the same for each document's max z, and its knots
    docpool.parquet      (optional) the sampled documents, one row per matrix row: doc, label, tokens

Position statistics (unless profiled with ``--no-positions``): stats.safetensors also holds
"position.<stat>.<layer>" for stat in active, sum, sumsq, min, max, each (P, D) with one row per
position bucket instead of per label (z only, all labels together), and "position_tokens" (P,) the
tokens per bucket. A token's position is its index within its window (0 = the first token, the
``<s>`` of Llama-like tokenizers). The buckets' lower edges are ``options.position_edges`` in
atlas.json: by default 0, 1, 2, 3, 4, 8, 16, ... (powers of two below ``max_length``), so buckets
are 0, 1, 2, 3, 4-7, 8-15, ... and the last one ends at ``max_length - 1``.

The document sample (unless profiled with ``--doc-sample 0``): the first ``options.doc_sample``
documents of each label in corpus order (among documents with at least one token; by default 512
documents shared by the labels, 32 to 256 a label); for each, the mean (and with ``--doc-pools
mean,max`` the max) of z over all its real tokens (all its windows), for every neuron. Columns are
layer-major (layer 0's neurons, then layer 1's ...). See :mod:`neuronatlas.docpool`. Merging two
atlases concatenates samples of float16 values (the second's documents renumbered after the
first's; the per-label cap is not applied again, so a label may hold up to twice ``doc_sample``
documents); samples of rank codes, ranked each within its own, are dropped.

File names: :mod:`neuronatlas.files`. Merging two atlases: :mod:`neuronatlas.atlas_merge`. Shapes (K labels,
D neurons, P buckets ...): the legend in :mod:`neuronatlas.stats`.

Query the parquet files with duckdb, e.g.
``duckdb.sql("select * from 'ATLAS/exemplars.parquet' where layer = 3 and neuron = 17")``.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .docpool import DocPool, load_docpool
from .errors import NeuronAtlasError
from .files import (ATLAS_FILES, BOTTOM_EXEMPLARS_FILE, CONTEXTS_FILE, DOCPOOL_FILES, EXEMPLARS_FILE, HISTOGRAMS_FILE,
                    META_FILE, STAGING_SUFFIX, STATS_FILE, VOCAB_FILE, save_tensors)
from .exemplar_windows import WINDOW_COLUMNS, has_windows, with_window_codes
from .stats import REDUCTIONS, SignalStats, make_uid, split_uid

FORMAT_VERSION = 4  # 2: the exemplar lists live in the exemplar tables; 3: histograms.parquet, window_bits;
# 4: float32 sums and M2, the document sample as rank codes (its max pool optional)
EXEMPLAR_ROW_GROUP = 16_384  # rows are sorted by (layer, neuron): small groups let one neuron's query skip the rest
SIGNALS = ("z", "gate")
WINDOW_KEYS = ("layer", "neuron", "seq", "pos")
POSITION = "position"  # prefix of the position statistics in stats.safetensors
EXEMPLAR_FILES = {"top": EXEMPLARS_FILE, "bottom": BOTTOM_EXEMPLARS_FILE}  # each exemplar list's table


@dataclass
class Atlas:
    """Metadata plus statistics; ``signals['z']`` always, ``signals['gate']`` for gated families."""

    meta: dict
    signals: dict[str, SignalStats]
    tokens_per_label: torch.Tensor  # (K,) int64
    contexts: pa.Table | None = None  # seq, doc, label, start, token_ids
    windows: pa.Table | None = None  # layer, neuron, seq, pos, window_start, window_scale, window_codes
    bottom_windows: pa.Table | None = None  # the same for the bottom exemplars
    path: Path | None = None  # the folder it was loaded from (windows are read from it on demand)
    vocab: pa.Table | None = None  # id, token
    positions: SignalStats | None = None  # z per position bucket: "labels" are the buckets
    position_tokens: torch.Tensor | None = None  # (P,) int64 tokens per position bucket
    docpool: DocPool | None = None  # pooled z of the sampled documents (on disk)

    # ---- reading ------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def widths(self) -> list[int]:
        return list(self.meta["model"]["widths"])

    @property
    def num_layers(self) -> int:
        return len(self.widths)

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise NeuronAtlasError(f"unknown label {label!r}; this atlas has labels: {', '.join(self.labels)}")
        return self.labels.index(label)

    def stat(self, name: str, layer: int, signal: str = "z") -> torch.Tensor:
        """A raw statistic tensor, e.g. ``stat("active", 3)`` → (K, D) int64."""
        if signal not in self.signals:
            raise NeuronAtlasError(f"this atlas has no {signal!r} signal (it has: {', '.join(self.signals)})")
        return self.signals[signal].get(name, layer)

    def has_stat(self, name: str, signal: str = "z") -> bool:
        """Whether the atlas keeps this statistic, e.g. ``has_stat("hist")`` or ``has_stat("top_uid")``."""
        return signal in self.signals and self.signals[signal].has(name)

    def activation_probability(self, layer: int, signal: str = "z") -> torch.Tensor:
        """(K, D) share of each label's tokens on which the neuron was active."""
        tokens = self.tokens_per_label.clamp(min=1).double()[:, None]
        return self.stat("active", layer, signal).double() / tokens

    def mean(self, layer: int, signal: str = "z") -> torch.Tensor:
        """(K, D) mean activation per label."""
        tokens = self.tokens_per_label.clamp(min=1).double()[:, None]
        return self.stat("sum", layer, signal) / tokens

    def overall(self, name: str, layer: int, signal: str = "z") -> torch.Tensor:
        """(D,) a statistic over all labels: active/sum/sumsq add up, min/max reduce."""
        tensor = self.stat(name, layer, signal)
        if name == "min":
            return tensor.amin(0)
        if name == "max":
            return tensor.amax(0)
        return tensor.sum(0)

    @property
    def position_edges(self) -> list[int] | None:
        """Lower edges of the position buckets, or None when the atlas has no position statistics."""
        return position_edges_of(self.meta) if self.positions is not None else None

    def position_buckets(self) -> list[str]:
        """Names of the position buckets: "0", "1", "2", "3", "4-7", ..."""
        if self.positions is None:
            raise NeuronAtlasError("this atlas has no position statistics; profile again without --no-positions")
        return bucket_names(self.position_edges, self.meta["options"].get("max_length"))

    def position_stat(self, name: str, layer: int) -> torch.Tensor:
        """A position statistic, e.g. ``position_stat("sum", 3)`` → (P, D) float64, one row per bucket."""
        if self.positions is None:
            raise NeuronAtlasError("this atlas has no position statistics; profile again without --no-positions")
        return self.positions.get(name, layer)

    def dead_fraction(self, layer: int, signal: str = "z") -> float:
        return float((self.overall("active", layer, signal) == 0).double().mean())

    def summary(self) -> dict:
        """Metadata and the per-layer summary that ``neuronatlas info --json`` prints."""
        tokens = int(self.tokens_per_label.sum())
        rate = [float(self.overall("active", layer).double().sum() / max(tokens, 1) / width)
                for layer, width in enumerate(self.widths)]
        summary = {
            "format_version": self.meta["format_version"],
            "model": self.meta["model"]["name_or_path"],
            "model_type": self.meta["model"]["model_type"],
            "corpus": self.meta["corpus"]["path"],
            "tokens": tokens,
            "documents": self.meta["documents"],
            "windows": self.meta["windows"],
            "labels": self.labels,
            "tokens_per_label": dict(zip(self.labels, self.tokens_per_label.tolist())),
            "layers": self.num_layers,
            "neurons_per_layer": self.widths,
            "activation_rate_per_layer": rate,
            "dead_fraction_per_layer": [self.dead_fraction(layer) for layer in range(self.num_layers)],
            "options": self.meta["options"],
            "position_buckets": self.position_buckets() if self.positions is not None else None,
            "doc_sample_documents": len(self.docpool) if self.docpool is not None else 0,
        }
        if self.path is not None:
            summary["disk"] = self.disk_usage()
        if "gate" in self.signals:
            summary["gate_dead_fraction_per_layer"] = [
                self.dead_fraction(layer, "gate") for layer in range(self.num_layers)
            ]
        return summary

    def disk_usage(self) -> dict:
        """The saved atlas's bytes: total, per neuron, and per file (only its own files)."""
        files = {name: (self.path / name).stat().st_size for name in ATLAS_FILES if (self.path / name).is_file()}
        total = sum(files.values())
        return {"bytes": total, "bytes_per_neuron": round(total / max(sum(self.widths), 1), 1), "files": files}

    def exemplar_seqs(self) -> set[int]:
        """The windows (seq) that hold a saved exemplar of z: any top one, a bottom one below zero."""
        wanted = set()
        for layer, end in self.signals["z"].exemplar_lists():
            uid = self.stat(f"{end}_uid", layer)
            wanted.update(split_uid(uid[self.saved_exemplars(end, layer)])[0].unique().tolist())
        return wanted

    def saved_exemplars(self, end: str, layer: int) -> torch.Tensor:
        """(D, k) bool: the entries of one exemplar list the atlas saves: filled ones, and for the bottom
        list only those below zero (a ReLU neuron's zeros are not its negative end)."""
        filled = self.stat(f"{end}_uid", layer) >= 0
        return filled & (self.stat("bottom_values", layer) < 0) if end == "bottom" else filled

    def exemplars(self, layer: int, neuron: int, end: str = "top") -> list[dict]:
        """One neuron's exemplars of the list ``end``, best first (bottom: most negative first; every
        one kept, also those not below zero): activation, seq, pos."""
        values = self.stat(f"{end}_values", layer)[neuron]
        seq, pos = split_uid(self.stat(f"{end}_uid", layer)[neuron])
        return [
            {"activation": float(v), "seq": int(s), "pos": int(p)}
            for v, s, p in zip(values, seq, pos) if s >= 0
        ]

    # ---- writing ------------------------------------------------------------------------------

    def recount(self) -> None:
        """Set the token counts in the metadata from ``tokens_per_label``, after statistics were added up."""
        self.meta["tokens"] = int(self.tokens_per_label.sum())
        self.meta["tokens_per_label"] = dict(zip(self.labels, self.tokens_per_label.tolist()))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The contents of stats.safetensors (counts as int32 while they fit: half the bytes)."""
        out = {"tokens_per_label": self.tokens_per_label.cpu()}
        states = [stats.state(name) for name, stats in self.signals.items()]
        if self.positions is not None:
            states.append(self.positions.state(POSITION))
            out["position_tokens"] = self.position_tokens.cpu()
        for state in states:
            for key, tensor in state.items():
                field = key.split(".")[1]
                if field in ("hist", "active") and (not tensor.numel() or int(tensor.max()) < 2**31):
                    tensor = tensor.int()  # read back as int64 (SignalStats.load_state)
                if not field.endswith("_window"):  # exemplar windows live in the exemplar tables
                    out[key] = tensor
        for stats in self.signals.values():
            if stats.hist_edges is not None:
                out["hist_edges"] = stats.hist_edges.cpu()
        return centred_moments(out)

    def save(self, path: str | Path) -> Path:
        """Write the atlas into ``path`` atomically: a complete atlas or nothing."""
        path = Path(path)
        staging = path.with_name(path.name + STAGING_SUFFIX)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with ThreadPoolExecutor(max_workers=2) as pool:  # the writers compress without the GIL: side by side
            listed = {key: tensor for key, tensor in self.tensors().items() if not _is_exemplar_list(key)}
            histograms = {key: listed.pop(key) for key in list(listed) if _is_histogram(key)}
            writes = [pool.submit(save_tensors, listed, staging / STATS_FILE)]
            if histograms:
                writes.append(pool.submit(write_histograms, histograms, staging / HISTOGRAMS_FILE))
            for end, name in EXEMPLAR_FILES.items():
                if end == "top" or self.has_stat("bottom_values"):
                    writes.append(pool.submit(write_exemplars, self.exemplar_table(end), staging / name))
            if self.contexts is not None:
                pq.write_table(self.contexts, staging / CONTEXTS_FILE)
            if self.vocab is not None:
                pq.write_table(self.vocab, staging / VOCAB_FILE)
            if self.docpool is not None:
                self.docpool.write(staging)
            for write in writes:
                write.result()  # re-raises a writer's error
        self.meta["format_version"] = FORMAT_VERSION  # what was just written, whatever the atlas was read from
        (staging / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        path.mkdir(parents=True, exist_ok=True)
        if self.docpool is None:  # do not leave another atlas's document sample behind
            for name in DOCPOOL_FILES:
                (path / name).unlink(missing_ok=True)
        if not self.has_stat("bottom_values"):  # nor its bottom exemplars
            (path / BOTTOM_EXEMPLARS_FILE).unlink(missing_ok=True)
        if not histograms:  # nor its histograms
            (path / HISTOGRAMS_FILE).unlink(missing_ok=True)
        # atlas.json last: a folder that has it holds a whole atlas, even if a kill stops this loop
        for item in sorted(staging.iterdir(), key=lambda item: item.name == META_FILE):
            os.replace(item, path / item.name)
        staging.rmdir()
        if self.docpool is not None:
            self.docpool.reopen(path)
        self.path = path  # what is not in memory (the exemplar windows) is read from here from now on
        return path

    def exemplar_table(self, end: str = "top") -> pa.Table:
        """One row per exemplar of the list ``end`` ("top", or "bottom": only values below zero), by
        layer, neuron and rank, with its document, label and window where known."""
        columns = {"layer": [], "neuron": [], "rank": [], "activation": [], "seq": [], "pos": []}
        if self.has_stat(f"{end}_values"):
            for layer in range(self.num_layers):
                seq, pos = split_uid(self.stat(f"{end}_uid", layer).cpu())
                values = self.stat(f"{end}_values", layer).cpu()
                filled = self.saved_exemplars(end, layer).cpu()
                neuron, rank = filled.nonzero(as_tuple=True)
                columns["layer"].append(torch.full((len(neuron),), layer, dtype=torch.int32))
                columns["neuron"].append(neuron.int())
                columns["rank"].append(rank.short())
                columns["activation"].append(values[filled])
                columns["seq"].append(seq[filled])
                columns["pos"].append(pos[filled].int())
        types = {"layer": pa.int32(), "neuron": pa.int32(), "rank": pa.int16(), "activation": pa.float32(),
                 "seq": pa.int64(), "pos": pa.int32()}
        table = pa.table({name: pa.array(torch.cat(columns[name]).numpy() if columns[name] else [], kind)
                          for name, kind in types.items()})
        return self._with_windows(self._with_documents(table), end)

    def window_table(self, end: str = "top") -> pa.Table | None:
        """Every exemplar's activation window (see exemplar_windows.py), or None when not recorded."""
        attribute = "windows" if end == "top" else "bottom_windows"
        file = None if self.path is None else self.path / EXEMPLAR_FILES[end]
        if getattr(self, attribute) is None and file is not None and file.exists():
            names = pq.read_schema(file).names
            if has_windows(names):  # float windows of format 1 are coded as a new atlas's
                stored = [name for name in (*WINDOW_COLUMNS, "window_activations") if name in names]
                setattr(self, attribute, with_window_codes(pq.read_table(file, columns=list(WINDOW_KEYS) + stored)))
        return getattr(self, attribute)

    def _with_windows(self, table: pa.Table, end: str) -> pa.Table:
        """Add the window columns to the exemplar rows that have them."""
        windows = self.window_table(end)
        if windows is None or table.num_rows == 0:
            return table
        if windows.num_rows == table.num_rows and all(windows[key].equals(table[key]) for key in WINDOW_KEYS):
            return pa.table({**{name: table[name] for name in table.column_names},
                             **{name: windows[name] for name in WINDOW_COLUMNS}})  # row for row (a fresh profile)
        keyed = windows.select(list(WINDOW_KEYS)).append_column("window_row", pa.array(range(windows.num_rows), pa.int64()))
        ordered = table.append_column("exemplar_row", pa.array(range(table.num_rows), pa.int64()))
        joined = ordered.select([*WINDOW_KEYS, "exemplar_row"]).join(keyed, list(WINDOW_KEYS), join_type="left outer")
        joined = joined.sort_by("exemplar_row")
        rows = joined["window_row"]
        for name in WINDOW_COLUMNS:
            table = table.append_column(name, windows[name].take(rows))
        return table

    def _with_documents(self, table: pa.Table) -> pa.Table:
        """Add each exemplar's document index and label from the contexts table (empty columns for an
        empty list: a ReLU model's bottom exemplars, none below zero, have the columns of the top ones)."""
        if self.contexts is None:
            return table
        if table.num_rows == 0:
            return table.append_column("doc", pa.array([], pa.int64())).append_column("label", pa.array([], pa.string()))
        row = pc.index_in(table["seq"], value_set=self.contexts["seq"])  # null where no context
        table = table.append_column("doc", self.contexts["doc"].take(row).cast(pa.int64()))
        return table.append_column("label", self.contexts["label"].take(row).cast(pa.string()))


# ---- loading ---------------------------------------------------------------------------------------


def is_atlas(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_atlas(path: str | Path) -> Atlas:
    """Read an atlas directory written by :meth:`Atlas.save`."""
    path = Path(path)
    if not is_atlas(path):
        raise NeuronAtlasError(f"{path} is not an atlas (no {META_FILE}); make one with `neuronatlas profile`")
    try:
        meta = json.loads((path / META_FILE).read_text())
        version = meta.get("format_version")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise _incomplete(path, error) from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NeuronAtlasError(
            f"{path} was written in atlas format {version}, newer than this neuronatlas "
            f"{__version__} reads (format {FORMAT_VERSION}); upgrade neuronatlas"
        )
    check_exemplars_file(path, meta)
    try:
        state = raw_moments(load_file(str(path / STATS_FILE)))
        if (path / HISTOGRAMS_FILE).exists():  # format 3
            state.update(read_histograms(path / HISTOGRAMS_FILE))
        atlas = from_state(meta, state)
        if not any(_is_exemplar_list(key) for key in state):  # format 2: the lists are the exemplar tables
            _read_exemplar_lists(atlas, path)
        if (path / CONTEXTS_FILE).exists():
            atlas.contexts = pq.read_table(path / CONTEXTS_FILE)
        if (path / VOCAB_FILE).exists():
            atlas.vocab = pq.read_table(path / VOCAB_FILE)
        atlas.docpool = load_docpool(path, atlas.widths)
    except (OSError, KeyError, TypeError, ValueError, SafetensorError, pa.ArrowException) as error:
        raise _incomplete(path, error) from None
    atlas.path = path
    return atlas


def _moment_keys(state: dict[str, torch.Tensor], moment: str):
    """(key, its sum's key, the token counts of its rows) of every "<prefix>.<moment>.<layer>" in state."""
    for key in [key for key in state if key.count(".") == 2 and key.split(".")[1] == moment]:
        prefix, _, layer = key.split(".")
        tokens = state["position_tokens" if prefix == POSITION else "tokens_per_label"]
        yield key, f"{prefix}.sum.{layer}", tokens.double().clamp(min=1)[:, None]


def centred_moments(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sums as float32 and, instead of each sum of squares, the squares about the mean (M2 =
    sumsq - sum² / n) as float32 under "<prefix>.m2.<layer>": half the bytes, and a variance
    (M2 / n) as precise as float32 makes it (sumsq in float32 would lose it to cancellation
    wherever the mean is large beside the spread)."""
    for key, sum_key, tokens in list(_moment_keys(state, "sumsq")):
        total = state[sum_key].double()
        state[key.replace(".sumsq.", ".m2.")] = (state.pop(key).double() - total * total / tokens).clamp(min=0).float()
        state[sum_key] = total.float()
    return state


def raw_moments(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`centred_moments` (format 4); a format 3 state (float64 sumsq) as it is."""
    for key, sum_key, tokens in list(_moment_keys(state, "m2")):
        total = state[sum_key].double()
        state[key.replace(".m2.", ".sumsq.")] = state.pop(key).double() + total * total / tokens
        state[sum_key] = total
    return state


def _is_exemplar_list(key: str) -> bool:
    """Whether a stats key ("z.top_uid.3") is an exemplar list, saved in the exemplar tables instead."""
    parts = key.split(".")
    return len(parts) == 3 and REDUCTIONS.get(parts[1]) == "top_k"  # (the windows are never in the file)


def _read_exemplar_lists(atlas: Atlas, path: Path) -> None:
    """Fill the z statistics' exemplar lists from the exemplar tables (rank = slot in the list; a
    bottom list's entries not below zero were not saved and stay empty)."""
    stats = atlas.signals["z"]
    for end in stats.ends():
        file = path / EXEMPLAR_FILES[end]
        if not file.exists():
            continue
        table = pq.read_table(file, columns=["layer", "neuron", "rank", "activation", "seq", "pos"])
        columns = {name: table[name].to_numpy() for name in table.column_names}
        for layer in range(atlas.num_layers):
            rows = (columns["layer"] == layer) & (columns["rank"] < stats.kept(end))  # a list keeps its k
            if (columns["neuron"][rows] >= stats.widths[layer]).any():
                raise ValueError(f"{file.name} names a neuron beyond layer {layer}'s {stats.widths[layer]}")
            neuron = torch.from_numpy(columns["neuron"][rows].astype(np.int64))
            rank = torch.from_numpy(columns["rank"][rows].astype(np.int64))
            values, uid = stats.get(f"{end}_values", layer), stats.get(f"{end}_uid", layer)
            values[neuron, rank] = torch.from_numpy(columns["activation"][rows].astype(np.float32))
            uid[neuron, rank] = make_uid(torch.from_numpy(columns["seq"][rows]), torch.from_numpy(columns["pos"][rows]))


def write_exemplars(table: pa.Table, file: Path) -> None:
    floats = [name for name in ("activation", "window_scale") if name in table.column_names]
    # min/max statistics only where readers filter (a neuron's rows): those of the window lists cost
    # a seventh of the write
    pq.write_table(table, file, row_group_size=EXEMPLAR_ROW_GROUP, compression="zstd", use_byte_stream_split=floats,
                   write_statistics=[name for name in ("layer", "neuron", "rank") if name in table.column_names])


def _is_histogram(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[1] == "hist"


def write_histograms(histograms: dict[str, torch.Tensor], file: Path) -> None:
    """Each "<signal>.hist.<layer>" (D, B) int32 tensor as D rows (key, counts), zstd-compressed."""
    keys, counts = [], []
    for key, tensor in histograms.items():
        matrix = tensor.cpu().numpy()
        keys.append(pa.array([key] * len(matrix), pa.string()).dictionary_encode())
        counts.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1]))
    table = pa.table({"key": pa.chunked_array(keys), "counts": pa.chunked_array(counts)})
    pq.write_table(table, file, compression="zstd")


def read_histograms(file: Path) -> dict[str, torch.Tensor]:
    """The tensors :func:`write_histograms` wrote, by key (D, B) int32 (each key's rows are contiguous)."""
    table = pq.read_table(file)
    keys = table["key"].combine_chunks().cast(pa.string()).to_numpy(zero_copy_only=False)
    counts = table["counts"].combine_chunks()
    matrix = counts.flatten().to_numpy().reshape(len(counts), counts.type.list_size)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return {str(keys[start]): torch.from_numpy(matrix[start:end].copy()) for start, end in zip(starts, ends)}


def check_exemplars_file(path: Path, meta: dict) -> None:
    """Refuse an atlas whose exemplars.parquet is damaged (its footer unreadable) or gone while top_k > 0."""
    file = Path(path) / EXEMPLARS_FILE
    if not file.exists():
        if (meta.get("options") or {}).get("top_k", 0) > 0:
            raise NeuronAtlasError(f"{file} is missing (the atlas keeps exemplars); profile the atlas again "
                                   "with `neuronatlas profile`")
        return
    try:
        pq.read_metadata(file)
    except (OSError, pa.ArrowException) as error:
        raise damaged_parquet(file, error) from None


def damaged_parquet(file: Path, error: BaseException) -> NeuronAtlasError:
    """The one-line error of a parquet file of an atlas that cannot be read."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return NeuronAtlasError(f"{file} is damaged ({reason[:120]}); profile the atlas again with `neuronatlas profile`")


def _incomplete(path: Path, error: BaseException) -> NeuronAtlasError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return NeuronAtlasError(f"{path} is not a complete atlas ({reason}); profile it again with `neuronatlas profile`")


def new_signals(meta: dict, device: torch.device | str = "cpu", windows: bool = False) -> dict[str, SignalStats]:
    """Empty statistics for the signals an atlas with this metadata keeps; ``windows``: with the
    exemplar windows as payloads (a profile and its checkpoints; a saved atlas keeps them in a table)."""
    options = meta["options"]
    widths, labels = meta["model"]["widths"], meta["labels"]
    edges = torch.tensor(options["hist_edges"], dtype=torch.float32)
    radius = options.get("exemplar_radius", 0) if windows else 0
    signals = {"z": SignalStats(widths, len(labels), options["threshold"], edges, options["top_k"], device, radius,
                                options.get("bottom_k", 0))}
    if meta["model"]["gated"] and options.get("gate", True):
        signals["gate"] = SignalStats(widths, len(labels), options["threshold"], None, 0, device)
    return signals


def default_position_edges(max_length: int) -> list[int]:
    """Lower edges 0, 1, 2, 3, 4, 8, 16, ... below ``max_length``: buckets 0, 1, 2, 3, 4-7, 8-15, ..."""
    edges = [edge for edge in (0, 1, 2, 3) if edge < max_length]
    edge = 4
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    return edges


def position_edges_of(meta: dict) -> list[int] | None:
    options = meta["options"]
    if not options.get("positions", False) or not options.get("position_edges"):
        return None
    return [int(edge) for edge in options["position_edges"]]


def bucket_names(edges: list[int], max_length: int | None) -> list[str]:
    """"0", "1", ..., "4-7", ...; the last bucket ends at ``max_length - 1`` ("16+" without it)."""
    names = []
    for i, low in enumerate(edges):
        high = edges[i + 1] - 1 if i + 1 < len(edges) else (max_length - 1 if max_length else None)
        names.append(str(low) if high == low else f"{low}-{high}" if high is not None else f"{low}+")
    return names


def new_positions(meta: dict, device: torch.device | str = "cpu") -> SignalStats | None:
    """Empty position statistics (one "label" per bucket), or None when the atlas keeps none."""
    edges = position_edges_of(meta)
    if edges is None:
        return None
    return SignalStats(meta["model"]["widths"], len(edges), meta["options"]["threshold"], None, 0, device)


def from_state(meta: dict, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
               windows: bool = False) -> Atlas:
    signals = new_signals(meta, device, windows)
    for name, stats in signals.items():
        stats.load_state(state, name)
    atlas = Atlas(meta, signals, state["tokens_per_label"].to(device))
    positions = new_positions(meta, device)
    if positions is not None and "position_tokens" in state:
        positions.load_state(state, POSITION)
        atlas.positions, atlas.position_tokens = positions, state["position_tokens"].to(device)
    return atlas
