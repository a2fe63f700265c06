"""Contexts across a neuron's whole activation range, drawn by a short pass over the corpus.

Top exemplars show what a neuron does at its strongest; they say little about where it is weak
or silent. Explaining and reading a neuron wants both (as delphi and Neuronpedia do): contexts
from every *band* of the activation range and contexts where it does not fire.

    >>> found = sample_contexts(model, tokenizer, "ATLAS", [(3, 17)])          # doctest: +SKIP
    >>> found[(3, 17)].bands[9]        # contexts whose peak is in the top tenth of (0, max]
    >>> found[(3, 17)].non_activating  # random contexts whose peak is <= the threshold

A pass reads up to ``max_docs`` documents (a seeded random sample of the first
``SCANNED_PER_DOC * max_docs``), cuts them into contexts of ``context_length`` tokens, runs the
model once over them and keeps the z of the neurons asked for (float16, contexts x tokens x
neurons). For each neuron the range (threshold, max] of the contexts' peaks is cut into ``bands``
equal bands (special tokens such as ``<s>`` have no value: they neither peak nor count); ``per_band`` contexts are drawn at random from each band (band 0 the weakest), and
``non_activating`` from the contexts whose peak is at most the threshold (the atlas's, else 0).
A neuron that fires on every context has too few of those: the weakest contexts fill the rest, and
``non_activating_max`` says how high their peaks go.

A context is a dict as the viewer's exemplars: token_ids, tokens (each readable), text, spans
(tokens joined into whole characters: text and token indices), activations, peak (index of the
highest), activation (its value), doc, label. :func:`cached_samples` keeps each neuron's samples
in ATLAS/samples/ so they are drawn once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .corpus import Corpus, iter_batches, iter_windows, read_corpus
from .errors import NeuronAtlasError
from .files import write_text_whole
from .hooks import activation_module, capture, forward_batch, pad_token_id
from .tokens import decode_bytes, display_spans, piece_text, token_bytes

SCANNED_PER_DOC = 50  # documents read per document kept: the sample is drawn from the first 50 x max_docs
SAMPLES_DIR = "samples"


@dataclass
class NeuronSamples:
    """One neuron's samples: contexts per band of (threshold, max], and non-activating contexts."""

    layer: int
    index: int
    edges: list[float]  # bands + 1 edges: band b holds peaks in (edges[b], edges[b + 1]]
    bands: dict[int, list[dict]] = field(default_factory=dict)
    non_activating: list[dict] = field(default_factory=list)
    non_activating_max: float | None = None  # highest peak among non_activating (<= threshold unless filled)
    contexts: int = 0  # contexts seen in the pass
    active_contexts: int = 0  # of which peaked above the threshold

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> NeuronSamples:
        return cls(**dict(data, bands={int(band): items for band, items in data["bands"].items()}))


@dataclass
class _Pass:
    """What one pass over the corpus saw: the contexts and the z of each neuron asked for."""

    token_ids: list[list[int]]  # per context
    docs: list[tuple[int, str | None]]  # (doc, label) per context
    values: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # neuron -> (C, T) float16, NaN = padding and special tokens


def sample_contexts(model, tokenizer, corpus_or_atlas, neurons, bands: int = 10, per_band: int = 2,
                    non_activating: int = 5, seed: int = 0, *, max_docs: int = 256, context_length: int = 32,
                    batch_size: int = 16, threshold: float | dict | None = None) -> dict[tuple[int, int], NeuronSamples]:
    """{(layer, index): NeuronSamples} of ``neurons`` ((layer, index) pairs or objects with .layer/.index).

    ``corpus_or_atlas``: a corpus (path or :class:`~neuronatlas.corpus.Corpus`), or an atlas (folder
    or :class:`~neuronatlas.atlas.Atlas`), whose corpus and threshold are used. ``threshold``: of
    "active", for every neuron, or per neuron as {(layer, index): value}; None (or a neuron the dict
    leaves out): the atlas's (else 0).
    """
    if bands < 1 or per_band < 0 or non_activating < 0:
        raise NeuronAtlasError(f"bands must be at least 1 and the counts 0 or more (got {bands}, {per_band}, {non_activating})")
    corpus, atlas_threshold = corpus_of(corpus_or_atlas)
    wanted = neuron_pairs(neurons)
    if isinstance(threshold, dict):  # a neuron the dict leaves out: the atlas's
        thresholds = {neuron: threshold.get(neuron, atlas_threshold) for neuron in wanted}
    else:
        thresholds = dict.fromkeys(wanted, atlas_threshold if threshold is None else threshold)
    seen = _run_pass(model, tokenizer, corpus, wanted, max_docs, context_length, batch_size, seed)
    found = {}
    for layer, index in wanted:
        generator = np.random.default_rng([seed, layer, index])  # the same draw whichever neurons come along
        found[(layer, index)] = _draw(seen, tokenizer, (layer, index), bands, per_band, non_activating,
                                      float(thresholds[(layer, index)]), generator)
    return found


def neuron_pairs(neurons) -> list[tuple[int, int]]:
    """Sorted unique (layer, index) of pairs, of objects with .layer and .index, or of a neuron set."""
    items = getattr(neurons, "neurons", neurons)
    return sorted({(int(n.layer), int(n.index)) if hasattr(n, "layer") else (int(n[0]), int(n[1])) for n in items})


def corpus_of(corpus_or_atlas) -> tuple[Corpus, float]:
    """The corpus to read and the threshold of "active": an atlas's own, else 0."""
    from .atlas import Atlas, is_atlas, load_atlas

    if isinstance(corpus_or_atlas, Corpus):
        return corpus_or_atlas, 0.0
    if not isinstance(corpus_or_atlas, Atlas) and is_atlas(corpus_or_atlas):
        corpus_or_atlas = load_atlas(corpus_or_atlas)
    if isinstance(corpus_or_atlas, Atlas):
        described = corpus_or_atlas.meta["corpus"]
        if not Path(described["path"]).exists():
            raise NeuronAtlasError(f"the atlas's corpus {described['path']} is not there; give a corpus to sample from")
        corpus = read_corpus(described["path"], described.get("text_field", "text"), described.get("label_field"),
                             described.get("format"), described.get("label_from_folder", False))
        return corpus, float(corpus_or_atlas.meta["options"].get("threshold", 0.0))
    return read_corpus(corpus_or_atlas), 0.0


def _documents(corpus: Corpus, max_docs: int, seed: int) -> list:
    """A seeded random sample of ``max_docs`` documents among the first SCANNED_PER_DOC x max_docs, in corpus order."""
    generator = np.random.default_rng(seed)
    kept: list = []
    for seen, doc in enumerate(corpus):
        if seen >= SCANNED_PER_DOC * max_docs:
            break
        if len(kept) < max_docs:
            kept.append(doc)
        elif (slot := int(generator.integers(seen + 1))) < max_docs:  # reservoir sampling
            kept[slot] = doc
    return sorted(kept, key=lambda doc: doc.index)


@torch.no_grad()
def _run_pass(model, tokenizer, corpus: Corpus, wanted: list[tuple[int, int]], max_docs: int, context_length: int,
              batch_size: int, seed: int) -> _Pass:
    from .models import locate_neurons

    neurons = locate_neurons(model)
    per_layer: dict[int, list[int]] = {}
    for layer, index in wanted:
        per_layer.setdefault(layer, []).append(index)
    columns = {layer: torch.tensor(indices) for layer, indices in per_layer.items()}
    windows = list(iter_windows(_documents(corpus, max_docs, seed), tokenizer, context_length))
    seen = _Pass([list(w.input_ids) for w in windows], [(w.doc, w.label) for w in windows])
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in per_layer}
    device = next(model.parameters()).device
    specials = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)  # <s> and the like: no peaks there

    def keep(layer: int, z: torch.Tensor) -> None:
        if layer in columns:
            batch, width = current.input_ids.shape
            z = z.reshape(batch, width, -1)[:, :, columns[layer].to(z.device)].float().cpu()  # (B, T, n)
            z[(current.attention_mask == 0) | torch.isin(current.input_ids, specials)] = float("nan")
            chunks[layer].append(torch.nn.functional.pad(z, (0, 0, 0, context_length - width), value=float("nan")))

    with capture(neurons, on_activation=keep):
        for current in iter_batches(windows, batch_size, pad_token_id(tokenizer)):
            forward_batch(activation_module(model), current.input_ids.to(device), current.attention_mask.to(device))
    for layer, indices in per_layer.items():
        stacked = torch.cat(chunks[layer]).half().numpy() if chunks[layer] else np.zeros((0, context_length, len(indices)), np.float16)
        for column, index in enumerate(indices):
            seen.values[(layer, index)] = stacked[:, :, column]  # (C, T)
    return seen


def _draw(seen: _Pass, tokenizer, neuron: tuple[int, int], bands: int, per_band: int, non_activating: int,
          threshold: float, generator: np.random.Generator) -> NeuronSamples:
    values = seen.values[neuron].astype(np.float32)  # (C, T)
    peaks = np.nanmax(values, axis=1) if len(values) else np.zeros(0, np.float32)  # (C,)
    top = float(peaks.max()) if len(peaks) else threshold
    edges = np.linspace(threshold, max(top, threshold), bands + 1)
    active = np.flatnonzero(peaks > threshold)
    found = NeuronSamples(*neuron, edges=edges.tolist(), contexts=len(peaks), active_contexts=len(active))
    if len(active):
        band_of = np.clip(np.searchsorted(edges, peaks[active], side="left") - 1, 0, bands - 1)
        for band in range(bands):
            members = active[band_of == band]
            chosen = generator.choice(members, min(per_band, len(members)), replace=False) if len(members) else []
            found.bands[band] = [_context(seen, tokenizer, values, int(c)) for c in sorted(chosen, key=lambda c: -peaks[c])]
    quiet = np.flatnonzero(peaks <= threshold)
    chosen = list(generator.choice(quiet, min(non_activating, len(quiet)), replace=False)) if len(quiet) else []
    if len(chosen) < non_activating:  # a neuron that fires everywhere: the weakest contexts fill the rest
        taken = set(chosen)
        chosen += [c for c in np.argsort(peaks, kind="stable") if c not in taken][: non_activating - len(chosen)]
    found.non_activating = [_context(seen, tokenizer, values, int(c)) for c in chosen]
    found.non_activating_max = float(max(peaks[chosen])) if chosen else None
    return found


def _context(seen: _Pass, tokenizer, values: np.ndarray, row: int) -> dict:
    ids = seen.token_ids[row]
    row_values = values[row, : len(ids)]  # NaN on special tokens
    activations = [None if np.isnan(v) else float(v) for v in row_values]
    pieces = token_bytes(tokenizer, ids)
    peak = int(np.nanargmax(row_values))
    doc, label = seen.docs[row]
    return {"token_ids": ids, "tokens": [piece_text(p) for p in pieces], "text": decode_bytes(pieces),
            "spans": [{"text": s.text, "tokens": s.tokens} for s in display_spans(pieces)],
            "activations": activations, "peak": peak, "activation": activations[peak], "doc": doc, "label": label}


# ---- the cache next to an atlas ------------------------------------------------------------------


def cache_key(atlas_meta: dict, **options) -> str:
    """A name for one way of sampling one atlas: its model and corpus fingerprints, threshold and the options."""
    described = {"model": atlas_meta["model"].get("fingerprint"), "corpus": atlas_meta["corpus"].get("fingerprint"),
                 "threshold": atlas_meta["options"].get("threshold", 0.0), **options}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def cached_samples(atlas_path: str | Path, atlas_meta: dict, neurons, draw, **options) -> dict[tuple[int, int], NeuronSamples]:
    """{neuron: NeuronSamples}, read from ATLAS/samples/KEY/L/I.json where drawn before, else drawn by
    ``draw(missing, **options)`` (:func:`sample_contexts` with its model, tokenizer and corpus bound) and
    written there. KEY (:func:`cache_key`) names the atlas's model and corpus and ``options``.

    A folder that cannot be written only loses the cache.
    """
    folder = Path(atlas_path) / SAMPLES_DIR / cache_key(atlas_meta, **options)
    found = {}
    for layer, index in neuron_pairs(neurons):
        file = folder / str(layer) / f"{index}.json"
        if file.is_file():
            found[(layer, index)] = NeuronSamples.from_json(json.loads(file.read_text(encoding="utf-8")))
    missing = [n for n in neuron_pairs(neurons) if n not in found]
    if missing:
        drawn = draw(missing, **options)
        for (layer, index), samples in drawn.items():
            try:
                (folder / str(layer)).mkdir(parents=True, exist_ok=True)
                write_text_whole(folder / str(layer) / f"{index}.json", json.dumps(samples.to_json()))  # the viewer's
                # other threads read this file (read_cached) while it is written: never half of it
            except OSError:
                pass  # a read-only atlas: drawn again next time
        found.update(drawn)
    return found


def read_cached(atlas_path: str | Path, atlas_meta: dict, neuron: tuple[int, int], **options) -> NeuronSamples | None:
    """One neuron's samples if they were drawn before with these options, else None (nothing is drawn)."""
    file = Path(atlas_path) / SAMPLES_DIR / cache_key(atlas_meta, **options) / str(neuron[0]) / f"{neuron[1]}.json"
    return NeuronSamples.from_json(json.loads(file.read_text(encoding="utf-8"))) if file.is_file() else None
