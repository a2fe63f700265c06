"""Neuron sets: what an identification method found, as a JSON file a person can read.

    {"format_version": 1, "method": "lape", "params": {...},
     "model": {"name_or_path": ..., "fingerprint": ..., "widths": [...]},
     "neurons": [{"layer": 3, "index": 17, "score": 0.12, "label": "de"}, ...]}

A neuron may appear once per label (LAPE assigns a neuron to every language above the cut).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import NeuronAtlasError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    score: float = 0.0
    label: str | None = None


@dataclass
class NeuronSet:
    method: str
    model: dict  # name_or_path, fingerprint, widths
    neurons: list[Neuron] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def labels(self) -> list[str]:
        return sorted({n.label for n in self.neurons if n.label is not None})

    def for_label(self, label: str | None) -> NeuronSet:
        """The neurons assigned to one label (all of them for None)."""
        if label is not None and label not in self.labels:
            raise NeuronAtlasError(f"unknown label {label!r}; this neuron set has labels: {', '.join(self.labels) or 'none'}")
        chosen = [n for n in self.neurons if label is None or n.label == label]
        return NeuronSet(self.method, self.model, chosen, dict(self.params, label=label))

    def per_layer(self) -> dict[int, torch.Tensor]:
        """{layer: sorted unique neuron indices (long)}."""
        table: dict[int, set[int]] = defaultdict(set)
        for neuron in self.neurons:
            table[neuron.layer].add(neuron.index)
        return {layer: torch.tensor(sorted(indices), dtype=torch.long) for layer, indices in sorted(table.items())}

    def check_model(self, fingerprint: str, widths: list[int]) -> None:
        """Refuse a set made for another model, or one that names a neuron the model lacks."""
        if self.model.get("fingerprint") and self.model["fingerprint"] != fingerprint:
            raise NeuronAtlasError(
                f"this neuron set was made for another model ({self.model.get('name_or_path')}, "
                f"fingerprint {self.model['fingerprint']} vs {fingerprint}); find the neurons again on this model"
            )
        check_indices(self.neurons, widths)

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "params": self.params,
            "model": self.model,
            "count": len(self.neurons),
            "labels": self.labels,
            "neurons": [asdict(n) for n in self.neurons],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        partial.replace(path)
        return path


def check_indices(neurons, widths: list[int]) -> None:
    for neuron in neurons:
        if not 0 <= neuron.layer < len(widths):
            raise NeuronAtlasError(f"neuron layer {neuron.layer} is out of range: the model has {len(widths)} layers (0-{len(widths) - 1})")
        if not 0 <= neuron.index < widths[neuron.layer]:
            raise NeuronAtlasError(
                f"neuron index {neuron.index} is beyond layer {neuron.layer}'s width {widths[neuron.layer]} (0-{widths[neuron.layer] - 1})"
            )


def load_neuron_set(path: str | Path) -> NeuronSet:
    path = Path(path)
    if not path.is_file():
        raise NeuronAtlasError(f"neuron set not found: {path} (make one with `neuronatlas find`)")
    try:
        data = json.loads(path.read_text())
        neurons = [Neuron(int(n["layer"]), int(n["index"]), float(n.get("score", 0.0)), n.get("label")) for n in data["neurons"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise NeuronAtlasError(f"{path} is not a neuron set ({type(error).__name__}: {error}); expected JSON with a 'neurons' list of {{layer, index, score, label}}") from error
    if data.get("format_version", 1) > FORMAT_VERSION:
        raise NeuronAtlasError(f"{path} is a neuron set of format {data['format_version']}, newer than this neuronatlas reads; upgrade neuronatlas")
    return NeuronSet(data.get("method", "unknown"), data.get("model", {}), neurons, data.get("params", {}))


def model_info(atlas_meta: dict) -> dict:
    """The model block of a neuron set, taken from an atlas's metadata."""
    model = atlas_meta["model"]
    return {"name_or_path": model["name_or_path"], "fingerprint": model["fingerprint"], "widths": model["widths"]}
