"""Input/output classes of gated neurons from their weights alone (Gerstner & Schütze 2025,
"Understanding Gated Neurons in Transformers from Their Input-Output Functionality").

For neuron j with gate row w_gate, up (input) row w_in and value vector w_out:

* c_gi = cos(w_gate, w_in), c_go = cos(w_gate, w_out), c_io = cos(w_in, w_out).
* The neuron computes act(w_gate·x) (w_in·x) w_out, unchanged when w_in and w_out are both negated:
  that flip negates c_gi and c_go and leaves c_io alone. Flip where c_gi < 0 so that c_gi >= 0.
* Round each cosine to -1, 0 or 1: sign(c) where |c| >= ``threshold`` (0.5), else 0.
* typical = (c_gi == c_io * c_go) on the rounded values.
* Class by (c_io, |c_go|) for typical neurons: (1, 1) enrichment, (1, 0) conditional enrichment,
  (-1, 1) depletion, (-1, 0) conditional depletion, (0, 1) proportional change, (0, 0) orthogonal
  output; every non-typical neuron is atypical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NeuronAtlasError
from ..models import locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import model_block_for

CLASSES = (
    "enrichment", "conditional_enrichment", "depletion", "conditional_depletion",
    "proportional_change", "orthogonal_output", "atypical",
)
_BY_KEY = {(1, 1): 0, (1, 0): 1, (-1, 1): 2, (-1, 0): 3, (0, 1): 4, (0, 0): 5}
ATYPICAL = CLASSES.index("atypical")


def class_name(name: str) -> str:
    """The canonical class name: accepts hyphens or spaces for underscores, any case."""
    canonical = name.strip().lower().replace("-", "_").replace(" ", "_")
    if canonical not in CLASSES:
        raise NeuronAtlasError(f"unknown weight class {name!r}; use one of: {', '.join(CLASSES)}")
    return canonical


def round_cosine(c: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """-1, 0 or 1 (long): the sign of c where |c| >= threshold, else 0."""
    return torch.where(c.abs() >= threshold, torch.sign(c), torch.zeros_like(c)).long()


@torch.no_grad()
def layer_cosines(layer) -> dict[str, torch.Tensor]:
    """(D,) cosines of one gated layer after the flip that makes c_gi >= 0."""
    w_gate = layer.w_gate().detach().float()  # (D, d)
    w_in = layer.w_in().detach().float()  # (D, d)
    w_out = layer.w_out().detach().float().T  # (D, d)
    c_gi = F.cosine_similarity(w_gate, w_in, dim=1)
    c_go = F.cosine_similarity(w_gate, w_out, dim=1)
    c_io = F.cosine_similarity(w_in, w_out, dim=1)
    flip = torch.where(c_gi < 0, -1.0, 1.0)
    return {"gate_in": c_gi * flip, "gate_out": c_go * flip, "in_out": c_io}


def classify(cosines: dict[str, torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """(D,) class ids (indices into CLASSES) from flipped cosines."""
    gi, go, io = (round_cosine(cosines[k], threshold) for k in ("gate_in", "gate_out", "in_out"))
    ids = torch.full_like(io, ATYPICAL)
    typical = gi == io * go
    for (c_io, abs_go), cls in _BY_KEY.items():
        ids[typical & (io == c_io) & (go.abs() == abs_go)] = cls
    return ids


def _gated(model):
    neurons = locate_neurons(model)
    if not neurons.gated:
        raise NeuronAtlasError(
            f"weight classes need a gated MLP (gate, up and down projections); {neurons.model_type} models are not gated"
        )
    return neurons


def weight_classes(model, threshold: float = 0.5) -> dict:
    """Per layer: class counts, per-neuron class names and ids, and the flipped cosines.

    Returns {"threshold", "classes": CLASSES, "counts": [{class: n} per layer],
    "names": [[class per neuron] per layer], "ids": [(D,) long per layer],
    "cosines": [{"gate_in", "gate_out", "in_out": (D,)} per layer]}.
    """
    if not 0 < threshold < 1:
        raise NeuronAtlasError(f"threshold must be in (0, 1) (got {threshold}); the paper rounds at 0.5")
    neurons = _gated(model)
    result = {"threshold": threshold, "classes": list(CLASSES), "counts": [], "names": [], "ids": [], "cosines": []}
    for layer in neurons.layers:
        cosines = layer_cosines(layer)
        ids = classify(cosines, threshold)
        counts = torch.bincount(ids, minlength=len(CLASSES)).tolist()
        result["counts"].append(dict(zip(CLASSES, counts)))
        result["names"].append([CLASSES[i] for i in ids.tolist()])
        result["ids"].append(ids)
        result["cosines"].append(cosines)
    return result


def find_weight_class(model, cls: str, threshold: float = 0.5, atlas_meta: dict | None = None,
                      classes: dict | None = None) -> NeuronSet:
    """The neurons of one weight class; score = c_io (cos(w_in, w_out)), label = the class name.

    ``classes`` may pass an already computed :func:`weight_classes` result.
    """
    cls = class_name(cls)
    classes = classes or weight_classes(model, threshold)
    block = model_block_for(model, atlas_meta)
    wanted = CLASSES.index(cls)
    neurons = []
    for layer, (ids, cosines) in enumerate(zip(classes["ids"], classes["cosines"])):
        for j in (ids == wanted).nonzero().flatten().tolist():
            neurons.append(Neuron(layer, j, float(cosines["in_out"][j]), cls))
    params = {"class": cls, "threshold": classes["threshold"], "counts": classes["counts"],
              "score": "cos(w_in, w_out)"}
    return NeuronSet("weights", block, neurons, params)
