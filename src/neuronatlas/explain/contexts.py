"""Scoring contexts from :mod:`neuronatlas.samples`: contexts from every quantile band of a neuron's
activation range (active) and contexts where it does not fire (inactive), as delphi scores.

A context is active when its peak is above the neuron's threshold: ``--active`` times the neuron's
top exemplar activation, the threshold of the exemplar scoring, rather than the atlas's (0 by
default, which a dense neuron passes on almost every context: its "non-activating" samples would
be the weakest contexts, not silent ones). One pass over the corpus serves every neuron of a set
(:func:`draw_samples`, with :mod:`neuronatlas.samples`'s own pass and draw per neuron); each
neuron's contexts become exemplars (:func:`sample_exemplars`) without the special tokens (which
have no value), and without the contexts that hold a shown exemplar's peak, so the explainer is
never scored on text it read.
"""

from __future__ import annotations

import numpy as np

from ..corpus import Corpus
from ..samples import NeuronSamples, sample_contexts
from .exemplars import Exemplar, SubjectModel, TokenStrings

PEAK_RADIUS = 2  # a shown exemplar's peak and 2 tokens either side: the text a sample must not repeat


def draw_samples(subject: SubjectModel, corpus: Corpus, thresholds: dict[tuple[int, int], float], options,
                 batch_size: int = 16) -> dict[tuple[int, int], NeuronSamples]:
    """Quantile-band and non-activating samples of the neurons of ``thresholds`` (each active above
    its own): contexts of ``2 * options.context + 1`` tokens (the exemplars' shape) from
    ``options.sample_docs`` corpus documents, drawn as :func:`neuronatlas.samples.sample_contexts`
    draws them (same seeds), in one pass."""
    return sample_contexts(subject.model, subject.tokenizer, corpus, sorted(thresholds), options.bands,
                           options.per_band, options.non_activating, options.seed, max_docs=options.sample_docs,
                           context_length=2 * options.context + 1, batch_size=batch_size, threshold=thresholds)


def sample_exemplars(samples: NeuronSamples, strings: TokenStrings, shown: list[Exemplar]) -> tuple[list[Exemplar], list[Exemplar], int]:
    """(active, inactive, dropped): the band contexts (strongest band first) and the non-activating
    ones as exemplars, and how many were dropped for repeating a shown exemplar's peak."""
    seen = [_peak_ids(e) for e in shown]
    active, inactive, dropped = [], [], 0
    drawn = [(c, "band") for band in sorted(samples.bands, reverse=True) for c in samples.bands[band]]
    for context, kind in drawn + [(c, "non-activating") for c in samples.non_activating]:
        exemplar = _exemplar(context, strings, kind)
        if any(_holds(exemplar.token_ids, ids) for ids in seen):
            dropped += 1
        elif exemplar.token_ids:
            (active if kind == "band" else inactive).append(exemplar)
    return active, inactive, dropped


def _exemplar(context: dict, strings: TokenStrings, kind: str) -> Exemplar:
    kept = [i for i, value in enumerate(context["activations"]) if value is not None]  # special tokens have none
    ids = [context["token_ids"][i] for i in kept]
    values = np.array([context["activations"][i] for i in kept], np.float32)
    return Exemplar(ids, strings(ids), values, context["doc"], kept[0] if kept else 0, kind, strings.pieces(ids))


def _peak_ids(exemplar: Exemplar) -> list[int]:
    peak = int(np.argmax(exemplar.activations))
    return exemplar.token_ids[max(peak - PEAK_RADIUS, 0):peak + PEAK_RADIUS + 1]


def _holds(ids: list[int], part: list[int]) -> bool:
    """Whether ``part`` occurs in ``ids`` as consecutive tokens."""
    return bool(part) and any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))
