"""Dead and rare neurons (Voita et al. 2023): overall activation rate over the profiled corpus.

rate(l, j) = (tokens on which the neuron was active, all labels) / (all tokens). A neuron is kept
when rate <= ``max_rate``: 0 (the default) keeps the neurons never active (dead), a small value such
as 1e-4 also the rare ones. "Active" is the atlas's own test (activation > the profile's
``--threshold``, 0 by default). score = rate, label None.
"""

from __future__ import annotations

import torch

from ..errors import NeuronAtlasError
from ..neuronset import Neuron, NeuronSet, model_info
from . import resolve_signal


def activation_rates(atlas, signal: str = "z") -> list[torch.Tensor]:
    """Per layer, (D,) float64 share of all profiled tokens on which each neuron was active."""
    tokens = int(atlas.tokens_per_label.sum())
    if tokens <= 0:
        raise NeuronAtlasError("this atlas holds no tokens; profile a non-empty corpus first")
    return [atlas.overall("active", layer, signal).double() / tokens for layer in range(atlas.num_layers)]


def find_dead(atlas, max_rate: float = 0.0, signal: str = "z") -> NeuronSet:
    """Neurons whose overall activation rate is at most ``max_rate`` (0: never active)."""
    if not 0 <= max_rate < 1:
        raise NeuronAtlasError(f"max rate must be in [0, 1) (got {max_rate}); 0 finds neurons never active")
    signal = resolve_signal(atlas, signal)
    neurons = []
    per_layer = []
    for layer, rate in enumerate(activation_rates(atlas, signal)):
        chosen = (rate <= max_rate).nonzero().flatten()
        per_layer.append(int(chosen.numel()))
        neurons += [Neuron(layer, int(j), float(rate[j]), None) for j in chosen.tolist()]
    params = {
        "max_rate": max_rate, "signal": signal, "threshold": atlas.meta.get("options", {}).get("threshold", 0.0),
        "tokens": int(atlas.tokens_per_label.sum()), "per_layer": per_layer,
        "score": "overall activation rate (active tokens / tokens)",
    }
    return NeuronSet("dead", model_info(atlas.meta), neurons, params, signal)
