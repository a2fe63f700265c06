"""Neuron sets: what an identification method found, as a JSON file a person can read.

    {"format_version": 1, "method": "lape", "signal": "gate", "params": {...},
     "model": {"name_or_path": ..., "fingerprint": ..., "widths": [...]},
     "count": 250, "unique_neurons": 205, "labels": [...], "per_label": {"de": 52, "xx": 0, ...},
     "null": {"method": ..., "permutations": 20, "best": ..., "null_best": ..., "chance": ...,
              "min_docs": 20, "refused_labels": {"yy": 3}},
     "neurons": [{"layer": 3, "index": 17, "score": 0.12, "label": "de", "q": 0.001}, ...]}

A neuron may appear once per label (LAPE assigns a neuron to every language above the cut): ``count``
counts neuron-label pairs, ``unique_neurons`` neurons. ``per_label`` lists every label the method
tested, 0 for a label that got no neuron. ``signal`` is the activation the neurons were selected on
("z" or "gate"; "z" for sets written before it was recorded): evaluate, steer, the viewer and
explain read it. ``null`` and the per-neuron ``q`` (or ``p``) come from the permutation null of
:mod:`neuronatlas.methods.nulls`; absent when the method ran without one. Its ``refused_labels``
were left out for having fewer than ``min_docs`` documents (not in ``per_label``: not tested).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
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
    q: float | None = None  # FDR q-value (or p-value, see the set's null) from the permutation null

    def to_json(self) -> dict:
        out = {"layer": self.layer, "index": self.index, "score": self.score, "label": self.label}
        if self.q is not None:
            out["q"] = self.q
        return out


@dataclass
class NeuronSet:
    method: str
    model: dict  # name_or_path, fingerprint, widths
    neurons: list[Neuron] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    signal: str = "z"  # the activation the neurons were selected on: "z" or "gate"
    null: dict | None = None  # the permutation null (see neuronatlas.methods.nulls), None without one
    tested_labels: list[str] | None = None  # every label scored, with or without neurons

    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def labels(self) -> list[str]:
        return sorted({n.label for n in self.neurons if n.label is not None})

    def for_label(self, label: str | None) -> NeuronSet:
        """The neurons assigned to one label (all of them for None)."""
        if label is not None:
            self.require_label(label)
        chosen = [n for n in self.neurons if label is None or n.label == label]
        return NeuronSet(self.method, self.model, chosen, dict(self.params, label=label), self.signal, self.null,
                         self.tested_labels)

    def require_label(self, label: str, flag: str | None = None) -> None:
        """Refuse, in one line, a label without neurons: one the set never had, or one whose neurons its
        method (or its null) kept none of; ``flag`` names the option that gave the label."""
        if label in self.labels:
            return
        if label in (self.tested_labels or ()):
            raise NeuronAtlasError(f"{flag or 'label'} {label}: {self.why_no_neurons(label)}")
        raise NeuronAtlasError(f"unknown label {label!r}{f' for {flag}' if flag else ''}; this neuron set has labels: "
                               f"{', '.join(self.labels) or 'none'}")

    def why_no_neurons(self, label: str | None = None) -> str:
        """Why ``label`` (a tested one), or the whole set for None, has no neurons, and what to try."""
        where = f"for label {label!r}" if label is not None else "for any label"
        null = "" if self.null is None else f", after its permutation null (q < {self.null.get('fdr', 0.05)})"
        fix = " (e.g. a larger corpus" + (", or find again with --no-null" if self.null is not None else "") + ")"
        return f"{self.method} kept no neuron {where}{null}; find more neurons{fix}"

    @property
    def unique_neurons(self) -> int:
        """Distinct (layer, index): a neuron kept for two labels counts once."""
        return len({(n.layer, n.index) for n in self.neurons})

    def label_counts(self) -> dict[str, int]:
        """{label: neuron-label pairs} for every tested label (0 where none was kept), then any other label."""
        counts = {label: 0 for label in self.tested_labels or []}
        for neuron in self.neurons:
            if neuron.label is not None:
                counts[neuron.label] = counts.get(neuron.label, 0) + 1
        return counts

    def summary_lines(self, extra: str = "") -> list[str]:
        """What a find prints: neurons vs pairs, per label (0s included), per layer, signal and null."""
        widths = self.model.get("widths") or []
        unique = {(n.layer, n.index) for n in self.neurons}
        total = sum(widths)
        share = f" ({100 * len(unique) / total:.2f}% of {total:,})" if total else ""
        counts = self.label_counts()
        pairs = f" in {len(self.neurons):,} neuron-label pairs" if counts and len(self.neurons) != len(unique) else ""
        lines = [f"{self.method}: {len(unique):,} neurons{share}{pairs}, selected on signal {self.signal}"
                 + (f"; {extra}" if extra else "")]
        if counts:
            lines.append("per label (neurons): " + ", ".join(f"{label} {count:,}" for label, count in sorted(counts.items())))
        layers = defaultdict(int)
        for layer, _ in unique:
            layers[layer] += 1
        if layers:
            lines.append("per layer (neurons): " + ", ".join(
                f"{layer}: {layers.get(layer, 0):,}" for layer in range(len(widths) or max(layers) + 1)))
        if self.null is not None:
            lines.append(null_line(self.null))
            if self.null.get("refused_labels"):
                lines.append(refused_line(self.null))
        return lines

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
        out = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "signal": self.signal,
            "params": self.params,
            "model": self.model,
            "count": len(self.neurons),
            "unique_neurons": self.unique_neurons,
            "labels": self.labels,
            "per_label": self.label_counts(),
            "neurons": [n.to_json() for n in self.neurons],
        }
        if self.tested_labels is not None:
            out["tested_labels"] = list(self.tested_labels)
        if self.null is not None:
            out["null"] = self.null
        return out

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
        neurons = [Neuron(int(n["layer"]), int(n["index"]), float(n.get("score", 0.0)), n.get("label"),
                          None if n.get("q", n.get("p")) is None else float(n.get("q", n.get("p"))))
                   for n in data["neurons"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise NeuronAtlasError(f"{path} is not a neuron set ({type(error).__name__}: {error}); expected JSON with a 'neurons' list of {{layer, index, score, label}}") from error
    if data.get("format_version", 1) > FORMAT_VERSION:
        raise NeuronAtlasError(f"{path} is a neuron set of format {data['format_version']}, newer than this neuronatlas reads; upgrade neuronatlas")
    params = data.get("params", {})
    signal = data.get("signal") or params.get("signal") or "z"
    return NeuronSet(data.get("method", "unknown"), data.get("model", {}), neurons, params, signal, data.get("null"),
                     data.get("tested_labels"))


def null_line(null: dict) -> str:
    """One line: the real best next to the null's best and the chance level."""
    def number(value) -> str:
        return "-" if value is None else f"{value:.3g}"

    line = (f"null: {null['permutations']} permutations of {null['shuffles']}; best real {number(null.get('best'))}"
            f" vs best null {number(null.get('null_best'))}")
    if null.get("chance") is not None:
        line += f" (chance {number(null['chance'])})"
    per_label = null.get("per_label") or {}
    if len(per_label) > 1:
        line += "; per label real/null/chance: " + ", ".join(
            f"{label} {number(e.get('best'))}/{number(e.get('null_best'))}/{number(e.get('chance'))}"
            for label, e in per_label.items())
    return line + f"; kept q < {null['fdr']:g}" if null.get("fdr") is not None else line


def refused_line(null: dict) -> str:
    """One line: the labels left out of the test for too few documents, with their counts."""
    refused = ", ".join(f"{label!r} ({count})" for label, count in null["refused_labels"].items())
    return (f"left out, fewer than --min-docs {null.get('min_docs')} documents: {refused}; add documents of them "
            "or lower --min-docs to test them")


def model_info(atlas_meta: dict) -> dict:
    """The model block of a neuron set, taken from an atlas's metadata."""
    model = atlas_meta["model"]
    return {"name_or_path": model["name_or_path"], "fingerprint": model["fingerprint"], "widths": model["widths"]}
