"""The atlas on disk: per-neuron statistics of one model over one corpus.

An atlas is a directory::

    atlas.json           metadata: format version, model, tokenizer, corpus, labels, counts, options
    stats.safetensors    dense statistics, keys "<signal>.<stat>.<layer>" (see stats.SignalStats)
                         plus "tokens_per_label" (K,) and "hist_edges" (B - 1,)
    exemplars.parquet    one row per top-k exemplar: layer, neuron, rank, activation, seq, pos,
                         doc, label, and (unless profiled with --exemplar-radius 0) window_start
                         and window_activations: the neuron's z at positions window_start,
                         window_start + 1, ... of window seq, up to R tokens either side of pos
    contexts.parquet     the token ids of every window an exemplar points to: seq, doc, label,
                         start, token_ids
    vocab.parquet        token id -> the string it decodes to, to show contexts without the model
    docpool_mean.npy     (optional) float16 (docs, total neurons): each sampled document's mean z
    docpool_max.npy      (optional) float16 (docs, total neurons): each sampled document's max z
    docpool.parquet      (optional) the sampled documents, one row per matrix row: doc, label, tokens

Position statistics (unless profiled with ``--no-positions``): stats.safetensors also holds
"position.<stat>.<layer>" for stat in active, sum, sumsq, min, max, each (P, D) with one row per
position bucket instead of per label (z only, all labels together), and "position_tokens" (P,) the
tokens per bucket. A token's position is its index within its window (0 = the first token, the
``<s>`` of Llama-like tokenizers). The buckets' lower edges are ``options.position_edges`` in
atlas.json: by default 0, 1, 2, 3, 4, 8, 16, ... (powers of two below ``max_length``), so buckets
are 0, 1, 2, 3, 4-7, 8-15, ... and the last one ends at ``max_length - 1``.

The document sample (unless profiled with ``--doc-sample 0``): the first ``options.doc_sample``
documents of each label in corpus order (among documents with at least one token); for each, the
mean and max of z over all its real tokens (all its windows), for every neuron. Columns are
layer-major (layer 0's neurons, then layer 1's ...). See :mod:`neuronatlas.docpool`. Merging two
atlases concatenates their samples (the second's documents renumbered after the first's; the
per-label cap is not applied again, so a label may hold up to twice ``doc_sample`` documents).

Query the parquet files with duckdb, e.g.
``duckdb.sql("select * from 'ATLAS/exemplars.parquet' where layer = 3 and neuron = 17")``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .docpool import FILES as DOCPOOL_FILES
from .docpool import DocPool, load_docpool, merge_docpools
from .errors import NeuronAtlasError
from .stats import SignalStats, split_uid

FORMAT_VERSION = 1
EXEMPLAR_ROW_GROUP = 16_384  # rows are sorted by (layer, neuron): small groups let one neuron's query skip the rest
META_FILE = "atlas.json"
STATS_FILE = "stats.safetensors"
SIGNALS = ("z", "gate")
WINDOW_KEYS = ("layer", "neuron", "seq", "pos")
WINDOW_COLUMNS = ("window_start", "window_activations")
POSITION = "position"  # prefix of the position statistics in stats.safetensors


@dataclass
class Atlas:
    """Metadata plus statistics; ``signals['z']`` always, ``signals['gate']`` for gated families."""

    meta: dict
    signals: dict[str, SignalStats]
    tokens_per_label: torch.Tensor  # (K,) int64
    contexts: pa.Table | None = None  # seq, doc, label, start, token_ids
    windows: pa.Table | None = None  # layer, neuron, seq, pos, window_start, window_activations
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
        return self.signals[signal].tensors[f"{name}.{layer}"]

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
        return self.positions.tensors[f"{name}.{layer}"]

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
        if "gate" in self.signals:
            summary["gate_dead_fraction_per_layer"] = [
                self.dead_fraction(layer, "gate") for layer in range(self.num_layers)
            ]
        return summary

    def exemplars(self, layer: int, neuron: int) -> list[dict]:
        """Top-k exemplars of one neuron, best first: activation, seq, pos."""
        values = self.stat("top_values", layer)[neuron]
        seq, pos = split_uid(self.stat("top_uid", layer)[neuron])
        return [
            {"activation": float(v), "seq": int(s), "pos": int(p)}
            for v, s, p in zip(values, seq, pos) if s >= 0
        ]

    # ---- writing ------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"tokens_per_label": self.tokens_per_label.cpu()}
        for name, stats in self.signals.items():
            out.update(stats.state(name))
            if stats.hist_edges is not None:
                out["hist_edges"] = stats.hist_edges.cpu()
        if self.positions is not None:
            out.update(self.positions.state(POSITION))
            out["position_tokens"] = self.position_tokens.cpu()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the atlas into ``path`` atomically: a complete atlas or nothing."""
        path = Path(path)
        staging = path.with_name(path.name + ".writing")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(self.tensors(), str(staging / STATS_FILE))
        pq.write_table(self.exemplar_table(), staging / "exemplars.parquet", row_group_size=EXEMPLAR_ROW_GROUP)
        if self.contexts is not None:
            pq.write_table(self.contexts, staging / "contexts.parquet")
        if self.vocab is not None:
            pq.write_table(self.vocab, staging / "vocab.parquet")
        if self.docpool is not None:
            self.docpool.write(staging)
        (staging / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        path.mkdir(parents=True, exist_ok=True)
        if self.docpool is None:  # do not leave another atlas's document sample behind
            for name in DOCPOOL_FILES:
                (path / name).unlink(missing_ok=True)
        for item in staging.iterdir():
            os.replace(item, path / item.name)
        staging.rmdir()
        if self.docpool is not None:
            self.docpool.reopen(path)
        return path

    def exemplar_table(self) -> pa.Table:
        columns: dict[str, list] = {"layer": [], "neuron": [], "rank": [], "activation": [], "seq": [], "pos": []}
        if "top_values.0" in self.signals["z"].tensors:
            for layer in range(self.num_layers):
                values = self.stat("top_values", layer)
                seq, pos = split_uid(self.stat("top_uid", layer))
                filled = seq >= 0
                neuron, rank = filled.nonzero(as_tuple=True)
                columns["layer"] += [layer] * len(neuron)
                columns["neuron"] += neuron.tolist()
                columns["rank"] += rank.tolist()
                columns["activation"] += values[filled].tolist()
                columns["seq"] += seq[filled].tolist()
                columns["pos"] += pos[filled].tolist()
        table = pa.table({
            "layer": pa.array(columns["layer"], pa.int32()),
            "neuron": pa.array(columns["neuron"], pa.int32()),
            "rank": pa.array(columns["rank"], pa.int16()),
            "activation": pa.array(columns["activation"], pa.float32()),
            "seq": pa.array(columns["seq"], pa.int64()),
            "pos": pa.array(columns["pos"], pa.int32()),
        })
        return self._with_windows(self._with_documents(table))

    def window_table(self) -> pa.Table | None:
        """Every exemplar's activation window (see exemplar_windows.py), or None when not recorded."""
        if self.windows is None and self.path is not None and (self.path / "exemplars.parquet").exists():
            file = self.path / "exemplars.parquet"
            if "window_start" in pq.read_schema(file).names:
                self.windows = pq.read_table(file, columns=list(WINDOW_KEYS) + list(WINDOW_COLUMNS))
        return self.windows

    def _with_windows(self, table: pa.Table) -> pa.Table:
        """Add window_start and window_activations to the exemplar rows that have them."""
        windows = self.window_table()
        if windows is None or table.num_rows == 0:
            return table
        keyed = windows.select(list(WINDOW_KEYS)).append_column("window_row", pa.array(range(windows.num_rows), pa.int64()))
        ordered = table.append_column("exemplar_row", pa.array(range(table.num_rows), pa.int64()))
        joined = ordered.select([*WINDOW_KEYS, "exemplar_row"]).join(keyed, list(WINDOW_KEYS), join_type="left outer")
        joined = joined.sort_by("exemplar_row")
        rows = joined["window_row"]
        for name in WINDOW_COLUMNS:
            table = table.append_column(name, windows[name].take(rows))
        return table

    def _with_documents(self, table: pa.Table) -> pa.Table:
        """Add each exemplar's document index and label from the contexts table."""
        if self.contexts is None or table.num_rows == 0:
            return table
        doc_of = dict(zip(self.contexts["seq"].to_pylist(), self.contexts["doc"].to_pylist()))
        label_of = dict(zip(self.contexts["seq"].to_pylist(), self.contexts["label"].to_pylist()))
        seqs = table["seq"].to_pylist()
        table = table.append_column("doc", pa.array([doc_of.get(s) for s in seqs], pa.int64()))
        return table.append_column("label", pa.array([label_of.get(s) for s in seqs], pa.string()))


# ---- loading and merging ----------------------------------------------------------------------


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
    try:
        atlas = from_state(meta, load_file(str(path / STATS_FILE)))
        if (path / "contexts.parquet").exists():
            atlas.contexts = pq.read_table(path / "contexts.parquet")
        if (path / "vocab.parquet").exists():
            atlas.vocab = pq.read_table(path / "vocab.parquet")
        atlas.docpool = load_docpool(path, atlas.widths)
    except (OSError, KeyError, TypeError, ValueError, SafetensorError, pa.ArrowException) as error:
        raise _incomplete(path, error) from None
    atlas.path = path
    return atlas


def _incomplete(path: Path, error: BaseException) -> NeuronAtlasError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return NeuronAtlasError(f"{path} is not a complete atlas ({reason}); profile it again with `neuronatlas profile`")


def new_signals(meta: dict, device: torch.device | str = "cpu") -> dict[str, SignalStats]:
    """Empty statistics for the signals an atlas with this metadata keeps."""
    options = meta["options"]
    widths, labels = meta["model"]["widths"], meta["labels"]
    edges = torch.tensor(options["hist_edges"], dtype=torch.float32)
    signals = {"z": SignalStats(widths, len(labels), options["threshold"], edges, options["top_k"], device)}
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


def from_state(meta: dict, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> Atlas:
    signals = new_signals(meta, device)
    for name, stats in signals.items():
        stats.load_state(state, name)
    atlas = Atlas(meta, signals, state["tokens_per_label"].to(device))
    positions = new_positions(meta, device)
    if positions is not None and "position_tokens" in state:
        positions.load_state(state, POSITION)
        atlas.positions, atlas.position_tokens = positions, state["position_tokens"].to(device)
    return atlas


def merge_atlases(first: Atlas, second: Atlas) -> Atlas:
    """The atlas of corpus ``first`` followed by corpus ``second``, for the same model and options.

    Counts add exactly; second's windows and documents are numbered after first's, so the merged
    exemplars are those of one profile over the concatenated corpus.
    """
    _check_mergeable(first, second)
    labels = first.labels + [label for label in second.labels if label not in first.labels]
    meta = json.loads(json.dumps(first.meta))
    meta["labels"] = labels
    merged = Atlas(meta, new_signals(meta), torch.zeros(len(labels), dtype=torch.int64))
    seq_offset = first.meta["windows"]
    for part, offset in ((first, 0), (second, seq_offset)):
        aligned = _align_labels(part, labels)
        merged.tokens_per_label += aligned.tokens_per_label
        for name, stats in merged.signals.items():
            stats.merge_(aligned.signals[name], uid_offset=offset << 24)
    meta["tokens"] = int(merged.tokens_per_label.sum())
    meta["tokens_per_label"] = dict(zip(labels, merged.tokens_per_label.tolist()))
    for key in ("documents", "windows"):
        meta[key] = first.meta[key] + second.meta[key]
    parts = [first.meta["corpus"], second.meta["corpus"]]
    meta["corpus"] = {"path": " + ".join(part["path"] for part in parts), "parts": parts}
    merged.contexts = _merge_contexts(first, second, merged)
    merged.vocab = first.vocab
    merged.windows = _merge_windows(first, second)
    _merge_positions(first, second, merged)
    merged.docpool = merge_docpools(first.docpool, second.docpool, first.meta["documents"])
    meta["options"]["doc_sample"] = meta["options"].get("doc_sample", 0) if merged.docpool is not None else 0
    return merged


def _merge_windows(first: Atlas, second: Atlas) -> pa.Table | None:
    """Both atlases' exemplar windows, second's renumbered after first's windows (None if either lacks them)."""
    windows = [first.window_table(), second.window_table()]
    if any(table is None for table in windows):
        return None
    index = windows[1].schema.get_field_index("seq")
    windows[1] = windows[1].set_column(index, "seq", pc.add(windows[1]["seq"], first.meta["windows"]))
    return pa.concat_tables(windows)


def _merge_positions(first: Atlas, second: Atlas, merged: Atlas) -> None:
    """Add the position statistics when both atlases have them on compatible buckets, else drop them.

    Default buckets of two different ``max_length`` are compatible: the shorter list of edges is a
    prefix of the longer one, and its last bucket (up to its ``max_length - 1``) lies within the
    longer one's bucket of the same lower edge; its missing buckets count zero tokens.
    """
    options = merged.meta["options"]
    edges = [position_edges_of(part.meta) if part.positions is not None else None for part in (first, second)]
    merged.positions = merged.position_tokens = None
    if edges[0] is None or edges[1] is None:
        options["positions"], options["position_edges"] = False, None
        return
    longer, shorter = (0, 1) if len(edges[0]) >= len(edges[1]) else (1, 0)
    long_edges, short_edges = edges[longer], edges[shorter]
    short_max = (first, second)[shorter].meta["options"].get("max_length")
    fits = long_edges[: len(short_edges)] == short_edges and (
        len(short_edges) == len(long_edges)
        or (short_max is not None and short_max <= long_edges[len(short_edges)])
    )
    if not fits:
        options["positions"], options["position_edges"] = False, None
        return
    options["positions"], options["position_edges"] = True, long_edges
    options["max_length"] = max(part.meta["options"].get("max_length") or 0 for part in (first, second)) or None
    merged.positions = SignalStats(merged.widths, len(long_edges), options["threshold"], None, 0)
    merged.position_tokens = torch.zeros(len(long_edges), dtype=torch.int64)
    for part in (first, second):
        rows = len(part.position_tokens)
        merged.position_tokens[:rows] += part.position_tokens.cpu()
        padded = SignalStats(merged.widths, len(long_edges), options["threshold"], None, 0)
        for key, tensor in padded.tensors.items():
            tensor[:rows] = part.positions.tensors[key].cpu()
        merged.positions.merge_(padded)


def _check_mergeable(first: Atlas, second: Atlas) -> None:
    if first.meta["model"]["fingerprint"] != second.meta["model"]["fingerprint"]:
        raise NeuronAtlasError(
            f"cannot merge atlases of different models: {first.meta['model']['name_or_path']} and "
            f"{second.meta['model']['name_or_path']}"
        )
    keys = ("threshold", "top_k", "hist_edges")
    a = {k: first.meta["options"][k] for k in keys}
    b = {k: second.meta["options"][k] for k in keys}
    if a != b:
        raise NeuronAtlasError(f"cannot merge atlases profiled with different options: {a} vs {b}")


def _align_labels(atlas: Atlas, labels: list[str]) -> Atlas:
    """The same atlas with label rows reordered (and zero rows added) to match ``labels``."""
    if atlas.labels == labels:
        return atlas
    meta = dict(atlas.meta, labels=labels)
    aligned = Atlas(meta, new_signals(meta), torch.zeros(len(labels), dtype=torch.int64))
    rows = torch.tensor([labels.index(label) for label in atlas.labels])
    aligned.tokens_per_label[rows] = atlas.tokens_per_label
    for name, stats in aligned.signals.items():
        for key, tensor in stats.tensors.items():
            source = atlas.signals[name].tensors[key]
            if key.split(".")[0] in SignalStats.FIELDS:
                tensor[rows] = source
            else:
                stats.tensors[key] = source.clone()
    return aligned


def _merge_contexts(first: Atlas, second: Atlas, merged: Atlas) -> pa.Table | None:
    """Both atlases' context windows, renumbered, keeping those the merged exemplars point to."""
    if first.contexts is None or second.contexts is None:
        return None
    shifted = second.contexts.set_column(
        second.contexts.schema.get_field_index("seq"), "seq",
        pc.add(second.contexts["seq"], first.meta["windows"]),
    ).set_column(
        second.contexts.schema.get_field_index("doc"), "doc",
        pc.add(second.contexts["doc"], first.meta["documents"]),
    )
    contexts = pa.concat_tables([first.contexts, shifted])
    wanted = set()
    for layer in range(merged.num_layers):
        uid = merged.stat("top_uid", layer)
        wanted.update(split_uid(uid[uid >= 0])[0].unique().tolist())
    return contexts.filter(pc.is_in(contexts["seq"], pa.array(sorted(wanted), pa.int64())))
