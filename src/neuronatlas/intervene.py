"""Interventions on FFN neurons: plain data, applied by a context manager that always cleans up.

An :class:`Intervention` names neurons (a :class:`~neuronatlas.neuronset.NeuronSet` or
``{layer: LongTensor of indices}``), an operation, and where it acts::

    from neuronatlas.intervene import Intervention, intervene

    german = neuron_set.for_label("de")
    with intervene(model, [Intervention(german, "zero")]):
        out = model(**batch)                    # German neurons silenced in every layer
    with intervene(model, [Intervention(german, "constant", value=-1.0, signal="gate"),
                           Intervention(french, "add_label_mean", label="fr", signal="gate")],
                   atlas=atlas):
        model.generate(...)                     # Language Arithmetics: steer de -> fr

Operations (``value`` in brackets where it is used):

=====================  =======================================================================
``zero``               a = 0
``constant``           a = value
``mean``               a = the atlas's mean activation of the neuron over all tokens
``scale``              a = value * a
``add``                a = a + value
``replace_label_mean`` a = mean of the neuron on ``label``'s tokens (from the atlas)
``add_label_mean``     a = a + value * mean on ``label``'s tokens (value defaults to 1.0: the
                       lambda of Language Arithmetics)
``diff_mean``          a = a + value * (mean on ``label`` - mean of the other labels' means)
                       (value defaults to 1.0)
=====================  =======================================================================

Signals: ``"z"`` edits the input of the FFN output projection (a forward pre-hook on it returns the
modified input); ``"gate"`` edits the gate signal ``g = act(gate(x))`` of gated families (a
forward hook on the activation module returns the modified output), so ``z = g' * up(x)``.

Positions index the sequence of the *current* forward pass: ``"all"``, ``"last"`` (the last
column: with left padding, every row's newest token; during ``generate()`` with a KV cache every
decoding step is one column, so ``"last"`` edits the prompt's last token and then every new token),
or a list of ints (negative ones count from the end; those beyond the current length are skipped).

Everything is checked before any hook is registered; the hooks are removed when the ``with``
block ends, also after an exception. Several interventions on the same layer and signal apply in
the order given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NeuronAtlasError
from .hooks import before, hook_sites
from .models import ModelNeurons, locate_neurons
from .neuronset import NeuronSet

OPS = ("zero", "constant", "mean", "scale", "add", "replace_label_mean", "add_label_mean", "diff_mean")
NEEDS_ATLAS = ("mean", "replace_label_mean", "add_label_mean", "diff_mean")
NEEDS_LABEL = ("replace_label_mean", "add_label_mean", "diff_mean")
NEEDS_VALUE = ("constant", "scale", "add")
SIGNALS = ("z", "gate")


@dataclass
class Intervention:
    """One operation on a set of neurons; see the module docstring for the operations."""

    neurons: NeuronSet | dict[int, torch.Tensor]
    op: str
    value: float | None = None
    label: str | None = None
    signal: str = "z"
    positions: str | Sequence[int] = "all"

    def describe(self) -> str:
        parts = [f"op {self.op}"]
        if self.label is not None:
            parts.append(f"label {self.label}")
        if self.value is not None:
            parts.append(f"value {self.value}")
        parts.append(f"signal {self.signal}")
        return ", ".join(parts)

    def per_layer(self) -> dict[int, torch.Tensor]:
        """{layer: LongTensor of unique sorted neuron indices}."""
        if isinstance(self.neurons, NeuronSet):
            return self.neurons.per_layer()
        if not isinstance(self.neurons, dict):
            raise NeuronAtlasError(
                f"intervention neurons must be a NeuronSet or a dict {{layer: indices}}, not {type(self.neurons).__name__}"
            )
        table = {}
        for layer, indices in self.neurons.items():
            tensor = torch.as_tensor(indices)
            if tensor.numel() and (tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool):
                raise NeuronAtlasError(
                    f"neuron indices of layer {layer} must be a 1-D tensor of integers, not {tuple(tensor.shape)} {tensor.dtype}"
                )
            table[int(layer)] = torch.unique(tensor.reshape(-1).long())
        return dict(sorted(table.items()))

    def count(self) -> int:
        return sum(len(indices) for indices in self.per_layer().values())


@dataclass
class _Edit:
    """One compiled operation on one layer: ``kind`` set/mul/add with a per-neuron vector."""

    index: torch.Tensor  # (n,) long
    kind: str  # "set", "mul" or "add"
    vector: torch.Tensor  # (n,) float32
    positions: str | tuple[int, ...]
    _cache: dict = field(default_factory=dict)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.index.to(device), self.vector.to(device, dtype))
        return self._cache[key]


def check_interventions(neurons: ModelNeurons, interventions: Sequence[Intervention], atlas=None,
                        allow_empty: bool = True) -> dict[tuple[int, str], list[_Edit]]:
    """Validate every intervention against the model (and atlas) and compile it per (layer, signal).

    Raises :class:`NeuronAtlasError` on the first problem, before anything touches the model.
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    widths = neurons.widths
    if atlas is not None and list(atlas.widths) != widths:
        raise NeuronAtlasError(
            f"the atlas was made for a model with layer widths {atlas.widths}, but this model has {widths}; "
            "profile this model to get its atlas"
        )
    plan: dict[tuple[int, str], list[_Edit]] = {}
    for number, item in enumerate(interventions):
        if not isinstance(item, Intervention):
            raise NeuronAtlasError(f"intervention {number} is a {type(item).__name__}, not an Intervention")
        where = f"intervention {number} ({item.describe()})"
        if item.op not in OPS:
            raise NeuronAtlasError(f"{where}: unknown op {item.op!r}; use one of {', '.join(OPS)}")
        if item.signal not in SIGNALS:
            raise NeuronAtlasError(f"{where}: unknown signal {item.signal!r}; use 'z' or 'gate'")
        if item.signal == "gate" and not neurons.gated:
            raise NeuronAtlasError(
                f"{where}: signal 'gate' needs a gated MLP, but {neurons.model_type} has none; use signal 'z'"
            )
        if item.op in NEEDS_ATLAS and atlas is None:
            raise NeuronAtlasError(f"{where}: op {item.op!r} reads mean activations from an atlas; pass atlas=...")
        if item.op in NEEDS_VALUE and item.value is None:
            raise NeuronAtlasError(f"{where}: op {item.op!r} needs a value, e.g. value=2.0")
        if item.op in NEEDS_LABEL:
            if item.label is None:
                raise NeuronAtlasError(f"{where}: op {item.op!r} needs a label (one of {', '.join(atlas.labels)})")
            atlas.label_index(item.label)  # raises for an unknown label
            if item.op == "diff_mean" and len(atlas.labels) < 2:
                raise NeuronAtlasError(f"{where}: op 'diff_mean' needs an atlas with at least two labels")
        positions = _check_positions(item.positions, where)
        table = item.per_layer()
        if not allow_empty and not any(len(indices) for indices in table.values()):
            raise NeuronAtlasError(f"{where}: the neuron set is empty; this op needs at least one neuron")
        for layer, index in table.items():
            if not 0 <= layer < len(widths):
                raise NeuronAtlasError(
                    f"{where}: layer {layer} is out of range: the model has {len(widths)} layers (0-{len(widths) - 1})"
                )
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= widths[layer]):
                bad = int(index.max()) if int(index.max()) >= widths[layer] else int(index.min())
                raise NeuronAtlasError(
                    f"{where}: neuron index {bad} is beyond layer {layer}'s width {widths[layer]} (0-{widths[layer] - 1}); "
                    "was the neuron set made for another model?"
                )
            kind, vector = _compile(item, layer, index, atlas)
            plan.setdefault((layer, item.signal), []).append(_Edit(index, kind, vector, positions))
    return plan


def _check_positions(positions, where: str) -> str | tuple[int, ...]:
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise NeuronAtlasError(f"{where}: positions must be 'all', 'last' or a list of ints, not {positions!r}")
        return positions
    try:
        values = tuple(int(p) for p in positions)
        if any(int(p) != p for p in positions):
            raise ValueError
    except (TypeError, ValueError):
        raise NeuronAtlasError(f"{where}: positions must be 'all', 'last' or a list of ints, not {positions!r}") from None
    return values


def _compile(item: Intervention, layer: int, index: torch.Tensor, atlas) -> tuple[str, torch.Tensor]:
    """(kind, per-neuron vector) of one intervention on one layer."""
    n = len(index)
    op = item.op
    if op == "zero":
        return "set", torch.zeros(n)
    if op == "constant":
        return "set", torch.full((n,), float(item.value))
    if op == "scale":
        return "mul", torch.full((n,), float(item.value))
    if op == "add":
        return "add", torch.full((n,), float(item.value))
    if op == "mean":
        tokens = max(int(atlas.tokens_per_label.sum()), 1)
        return "set", (atlas.overall("sum", layer, item.signal) / tokens)[index].float()
    means = atlas.mean(layer, item.signal)  # (K, D)
    k = atlas.label_index(item.label)
    own = means[k, index].float()
    if op == "replace_label_mean":
        return "set", own
    scale = 1.0 if item.value is None else float(item.value)
    if op == "add_label_mean":
        return "add", scale * own
    others = torch.cat([means[:k], means[k + 1:]])[:, index].float().mean(0)
    return "add", scale * (own - others)  # diff_mean


def _apply(x: torch.Tensor, edits: list[_Edit], shape: tuple[int, int] | None) -> torch.Tensor:
    """A copy of x (..., T, D) or (B*T, D) with every edit applied."""
    out = x.clone()
    for edit in edits:
        index, vector = edit.on(out.device, out.dtype)
        if index.numel() == 0:
            continue
        view = out
        if edit.positions != "all" and out.dim() == 2:  # OPT flattens (B, T, D) to (B*T, D)
            if shape is None or shape[0] * shape[1] != out.shape[0]:
                raise RuntimeError("cannot tell the sequence length of a flattened activation")
            view = out.view(shape[0], shape[1], out.shape[-1])
        if edit.positions == "all":
            columns = view[..., index]
            view[..., index] = combine(edit.kind, columns, vector)
            continue
        length = view.shape[-2]
        if edit.positions == "last":
            selected = [length - 1]
        else:
            selected = sorted({p % length for p in edit.positions if -length <= p < length})
        if not selected:
            continue
        rows = torch.tensor(selected, device=view.device)
        block = view[..., rows, :]  # (..., P, D) copy
        block[..., index] = combine(edit.kind, block[..., index], vector)
        view[..., rows, :] = block
    return out


def combine(kind: str, columns: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """What a compiled edit (kind set / mul / add, a per-neuron ``vector``) makes of ``columns`` (..., n)."""
    if kind == "set":
        return vector.expand_as(columns)
    if kind == "mul":
        return columns * vector
    return columns + vector


@contextmanager
def intervene(model: nn.Module, interventions: Sequence[Intervention] | Intervention, atlas=None,
              allow_empty: bool = True) -> Iterator[ModelNeurons]:
    """Apply ``interventions`` to every forward pass of ``model`` inside the ``with`` block.

    Works for plain forwards, padded batches and ``generate()`` (each decoding step is a forward).
    ``atlas`` is needed by the ops that read mean activations. An intervention whose neuron set is
    empty changes nothing (unless ``allow_empty=False``, which raises instead). Yields the
    model's :class:`~neuronatlas.models.ModelNeurons`.
    """
    neurons = model if isinstance(model, ModelNeurons) else locate_neurons(model)
    plan = check_interventions(neurons, interventions, atlas, allow_empty=allow_empty)
    needs_shape = any(edit.positions != "all" for edits in plan.values() for edit in edits)
    state: dict = {"shape": None}  # (B, T) of the current forward, for positions of flattened sites
    on = {signal: {layer: edits for (layer, kind), edits in plan.items() if kind == signal} for signal in SIGNALS}

    def edit(signal: str):
        return lambda layer, x: _apply(x, on[signal][layer], state["shape"])

    with ExitStack() as stack:
        if needs_shape:
            stack.enter_context(before(neurons.model, _shape_recorder(state), with_kwargs=True))
        if on["z"]:
            stack.enter_context(hook_sites(neurons, before_down=edit("z"), layers=sorted(on["z"])))
        if on["gate"]:
            stack.enter_context(hook_sites(neurons, after_act=edit("gate"), layers=sorted(on["gate"])))
        yield neurons


def _shape_recorder(state: dict):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            state["shape"] = (ids.shape[0], ids.shape[1])

    return hook


__all__ = ["Intervention", "intervene", "check_interventions", "OPS"]
