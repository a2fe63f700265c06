"""Explanation: the explainer reads a neuron's top exemplars and writes one short phrase."""

from __future__ import annotations

import re

from ..errors import NeuronAtlasError
from .exemplars import Exemplar, discretise
from .prompts import CUE

MAX_CHARACTERS = 200


def explain(explainer, exemplars: list[Exemplar], scale: float) -> str:
    """The explainer's phrase for these exemplars; activations shown as 0-10 with 10 = ``scale``."""
    excerpts = excerpts_of(exemplars, scale)
    text = clean_explanation(explainer.explain(excerpts))
    if not text:
        raise NeuronAtlasError(f"the explainer {explainer.name} wrote an empty explanation; use a larger explainer model")
    return text


def explain_candidates(explainer, exemplars: list[Exemplar], scale: float, count: int, temperature: float,
                       seed: int = 0) -> list[str]:
    """``count`` explanations sampled at ``temperature`` (one call of a backend's ``explain_samples``
    when it has one); empty replies are dropped, and all of them empty is the error of :func:`explain`."""
    if count <= 1:
        return [explain(explainer, exemplars, scale)]
    excerpts = excerpts_of(exemplars, scale)
    sampler = getattr(explainer, "explain_samples", None)
    replies = sampler(excerpts, count, temperature, seed) if sampler else [explainer.explain(excerpts) for _ in range(count)]
    texts = [text for text in map(clean_explanation, replies) if text]
    if not texts:
        raise NeuronAtlasError(f"the explainer {explainer.name} wrote {count} empty explanations; use a larger explainer model")
    return texts


def excerpts_of(exemplars: list[Exemplar], scale: float) -> list[tuple[list[str], list[int]]]:
    """(pieces of whole characters, levels 0-10 with 10 = ``scale``) of each exemplar, as the explainer reads it."""
    readable = [e.readable() for e in exemplars]
    return [(texts, discretise(values, scale)) for texts, values in readable]


def clean_explanation(reply: str) -> str:
    """The first non-empty line, without the echoed cue, quotes or a final full stop."""
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    for prefix in (CUE, CUE.removeprefix("Explanation: ")):
        if line.lower().startswith(prefix.lower()):
            line = line[len(prefix):].strip()
    line = line.strip("\"'`*").rstrip(".").strip()
    return re.sub(r"\s+", " ", line)[:MAX_CHARACTERS]
