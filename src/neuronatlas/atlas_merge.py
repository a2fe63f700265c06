"""Merging two atlases of one model: the atlas of one profile over the concatenated corpora.

Statistics combine by each field's rule (:data:`neuronatlas.stats.REDUCTIONS`); the second atlas's
windows and documents are numbered after the first's, so its exemplar uids, contexts and exemplar
windows move along. Labels are the union (first's order, then second's new ones); position
statistics are kept when the two atlases' buckets fit (see :func:`merge_positions`).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import torch

from .atlas import Atlas, new_signals, position_edges_of
from .docpool import merge_docpools
from .errors import NeuronAtlasError
from .stats import SignalStats, uid_offset


def merge_atlases(first: Atlas, second: Atlas) -> Atlas:
    """The atlas of corpus ``first`` followed by corpus ``second``, for the same model and options.

    Counts add exactly; second's windows and documents are numbered after first's, so the merged
    exemplars are those of one profile over the concatenated corpus.
    """
    check_mergeable(first, second)
    labels = first.labels + [label for label in second.labels if label not in first.labels]
    meta = json.loads(json.dumps(first.meta))
    meta["labels"] = labels
    merged = Atlas(meta, new_signals(meta), torch.zeros(len(labels), dtype=torch.int64))
    for part, windows_before in ((first, 0), (second, first.meta["windows"])):
        aligned = align_labels(part, labels)
        merged.tokens_per_label += aligned.tokens_per_label
        for name, stats in merged.signals.items():
            stats.merge_(aligned.signals[name], uid_offset=uid_offset(windows_before))
    merged.recount()
    for key in ("documents", "windows"):
        meta[key] = first.meta[key] + second.meta[key]
    parts = [first.meta["corpus"], second.meta["corpus"]]
    meta["corpus"] = {"path": " + ".join(part["path"] for part in parts), "parts": parts}
    merged.contexts = _merge_contexts(first, second, merged)
    merged.vocab = first.vocab
    merged.windows = _merge_windows(first, second, "top")
    merged.bottom_windows = _merge_windows(first, second, "bottom")
    merge_positions(first, second, merged)
    merged.docpool = merge_docpools(first.docpool, second.docpool, first.meta["documents"])
    meta["options"]["doc_sample"] = meta["options"].get("doc_sample", 0) if merged.docpool is not None else 0
    return merged


def check_mergeable(first: Atlas, second: Atlas) -> None:
    if first.meta["model"]["fingerprint"] != second.meta["model"]["fingerprint"]:
        raise NeuronAtlasError(
            f"cannot merge atlases of different models: {first.meta['model']['name_or_path']} and "
            f"{second.meta['model']['name_or_path']}"
        )
    keys = ("threshold", "top_k", "bottom_k", "hist_edges")
    a = {k: first.meta["options"].get(k, 0) for k in keys}
    b = {k: second.meta["options"].get(k, 0) for k in keys}
    if a != b:
        raise NeuronAtlasError(f"cannot merge atlases profiled with different options: {a} vs {b}")


def align_labels(atlas: Atlas, labels: list[str]) -> Atlas:
    """The same atlas with label rows reordered (and zero rows added) to match ``labels``."""
    if atlas.labels == labels:
        return atlas
    rows = torch.tensor([labels.index(label) for label in atlas.labels])
    tokens_per_label = torch.zeros(len(labels), dtype=torch.int64)
    tokens_per_label[rows] = atlas.tokens_per_label
    signals = {name: stats.with_rows(rows, len(labels)) for name, stats in atlas.signals.items()}
    return Atlas(dict(atlas.meta, labels=labels), signals, tokens_per_label)


def merge_positions(first: Atlas, second: Atlas, merged: Atlas) -> None:
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
        buckets = len(part.position_tokens)  # the shorter list's buckets are the longer one's first
        merged.position_tokens[:buckets] += part.position_tokens.cpu()
        merged.positions.merge_(part.positions.with_rows(torch.arange(buckets), len(long_edges)))


def _merge_windows(first: Atlas, second: Atlas, end: str) -> pa.Table | None:
    """Both atlases' exemplar windows of one list, second's renumbered after first's windows (None if
    either lacks them)."""
    windows = [first.window_table(end), second.window_table(end)]
    if any(table is None for table in windows):
        return None
    index = windows[1].schema.get_field_index("seq")
    windows[1] = windows[1].set_column(index, "seq", pc.add(windows[1]["seq"], first.meta["windows"]))
    return pa.concat_tables(windows)


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
    wanted = merged.exemplar_seqs()
    return contexts.filter(pc.is_in(contexts["seq"], pa.array(sorted(wanted), pa.int64())))
