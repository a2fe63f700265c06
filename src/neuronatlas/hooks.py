"""Hooks on neuron sites. Every hook is removed when its context exits, also after an exception.

Activation callbacks receive ``(layer_index, tensor)`` with the tensor shaped (..., d_ff): usually
(batch, time, d_ff); some families (OPT) flatten it to (batch * time, d_ff).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .models import ModelNeurons

Callback = Callable[[int, torch.Tensor], None]


@contextmanager
def capture(
    neurons: ModelNeurons,
    on_activation: Callback | None = None,
    on_gate: Callback | None = None,
) -> Iterator[None]:
    """Call ``on_activation(l, z)`` with each block's z and ``on_gate(l, g)`` with its gate signal.

    The callbacks only read: the model's outputs stay bit-identical to running it without hooks.
    ``on_gate`` is ignored for families without a gate.
    """
    handles = []
    try:
        for layer in neurons.layers:
            if on_activation is not None:
                handles.append(layer.down.register_forward_pre_hook(_reader(on_activation, layer.index)))
            if on_gate is not None and neurons.gated:
                handles.append(layer.act.register_forward_hook(_gate_reader(on_gate, layer.index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _reader(callback: Callback, index: int):
    def hook(module, args):
        callback(index, args[0])

    return hook


def _gate_reader(callback: Callback, index: int):
    def hook(module, args, output):
        callback(index, output)

    return hook
