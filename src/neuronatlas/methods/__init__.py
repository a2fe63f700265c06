"""Identification methods: each takes an atlas or a loaded model and returns a :class:`NeuronSet`.

* :func:`find_lape` — language (label) specific neurons by activation-probability entropy (Tang et al.)
* :func:`find_dead` — neurons never (or rarely) active over the profiled corpus (Voita et al.)
* :func:`find_vocab` — prediction / suppression neurons by vocabulary kurtosis (Gurnee et al.)
* :func:`vocab_projection` — the tokens a neuron's value vector promotes and suppresses (Geva et al.)
* :func:`weight_classes`, :func:`find_weight_class` — gated input/output classes (Gerstner & Schütze)

See docs/methods.md for definitions, defaults and the CLI lines.
"""

from __future__ import annotations

from ..errors import NeuronAtlasError

SIGNAL_NAMES = ("z", "gate")


def resolve_signal(atlas, signal: str | None) -> str:
    """The atlas signal to read: ``None`` picks "gate" when the atlas has it, else "z"."""
    if signal is None:
        return "gate" if "gate" in atlas.signals else "z"
    if signal not in SIGNAL_NAMES:
        raise NeuronAtlasError(f"unknown signal {signal!r}; use gate or z")
    if signal not in atlas.signals:
        raise NeuronAtlasError(
            f"this atlas has no {signal!r} signal (it has: {', '.join(atlas.signals)}); "
            "the gate signal exists only for gated families profiled without --no-gate; use --signal z"
        )
    return signal


def model_block(model) -> dict:
    """The model block of a neuron set (name_or_path, fingerprint, widths) from a loaded model."""
    from ..loading import model_fingerprint
    from ..models import locate_neurons

    neurons = locate_neurons(model)
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    return {"name_or_path": name, "fingerprint": model_fingerprint(model), "widths": neurons.widths}


def model_block_for(model, atlas_meta: dict | None) -> dict:
    """The model block from an atlas's metadata when given (checked against the model), else the model's."""
    block = model_block(model)
    if atlas_meta is None:
        return block
    from ..neuronset import model_info

    info = model_info(atlas_meta)
    if info["fingerprint"] != block["fingerprint"] or list(info["widths"]) != list(block["widths"]):
        raise NeuronAtlasError(
            f"the atlas was made for another model ({info['name_or_path']}, fingerprint {info['fingerprint']}) "
            f"than {block['name_or_path'] or 'the model given'} (fingerprint {block['fingerprint']}); "
            f"pass the model the atlas was made with (--model {info['name_or_path']}) or the atlas of this model"
        )
    return info


def layer_of(widths: list[int]):
    """A function flat neuron index -> (layer, index within the layer) for these layer widths."""
    import torch

    offsets = torch.tensor([0, *widths]).cumsum(0)

    def locate(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = torch.searchsorted(offsets, flat, right=True) - 1
        return layer, flat - offsets[layer]

    return locate


from .dead import find_dead  # noqa: E402
from .lape import find_lape, lape_select  # noqa: E402
from .vocab import find_vocab, vocab_projection, vocab_statistics  # noqa: E402
from .weight_classes import CLASSES, find_weight_class, weight_classes  # noqa: E402

__all__ = [
    "CLASSES", "find_dead", "find_lape", "find_vocab", "find_weight_class", "lape_select",
    "resolve_signal", "vocab_projection", "vocab_statistics", "weight_classes",
]
