"""What a model family adapter declares, and the neurons it locates in a loaded model.

A *site* names modules relative to one transformer block. The neuron activation ``z`` of block
``l`` is the input of its FFN output projection, shape (batch, time, d_ff); for gated MLPs the
gate signal ``g = act(gate(x))`` is the output of the activation module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Site:
    """Where one model family keeps its FFN neurons. Paths are relative to one block."""

    model_types: tuple[str, ...]  # values of config.model_type this site serves
    blocks: tuple[str, ...]  # suffixes of the block ModuleList's path, tried in order
    down: str  # output projection: W_out; its input is z, (B, T, d_ff)
    act: str  # activation module: its output is g for gated MLPs
    up: str  # W_in: the (up) input projection, rows = neurons
    gate: str | None = None  # gate projection of gated MLPs
    conv1d: bool = False  # GPT-2's Conv1D keeps weights as (in, out) instead of (out, in)
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, gate rows first, then up rows
    final_norm: tuple[str, ...] = ()  # suffixes of the final norm before the unembedding
    encoder: bool = False  # attends both ways (masked LM): no next-token loss, no decoding

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


def _weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """Weight as (out_features, in_features) whatever the module kind."""
    return module.weight.T if conv1d else module.weight


@dataclass
class LayerNeurons:
    """The neurons of one block, bound to the modules of a loaded model."""

    index: int
    site: Site
    down: nn.Module
    act: nn.Module
    up: nn.Module
    gate: nn.Module | None

    @property
    def width(self) -> int:
        return self.w_out().shape[1]

    def w_out(self) -> torch.Tensor:
        """(d_model, d_ff): column j is neuron j's value vector."""
        return _weight(self.down, self.site.conv1d)

    def w_in(self) -> torch.Tensor:
        """(d_ff, d_model): row j reads neuron j's (up) input."""
        weight = _weight(self.up, self.site.conv1d)
        if self.site.fused_gate_up:
            return weight[weight.shape[0] // 2 :]
        return weight

    def w_gate(self) -> torch.Tensor | None:
        """(d_ff, d_model) gate rows of a gated MLP, else None."""
        if self.site.fused_gate_up:
            weight = _weight(self.up, self.site.conv1d)
            return weight[: weight.shape[0] // 2]
        if self.gate is None:
            return None
        return _weight(self.gate, self.site.conv1d)


@dataclass
class ModelNeurons:
    """All FFN neurons of a loaded model: ``layers[l]`` holds block ``l``."""

    model: nn.Module
    model_type: str
    site: Site
    layers: list[LayerNeurons]
    final_norm: nn.Module | None

    @property
    def gated(self) -> bool:
        return self.site.gated

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        return [layer.width for layer in self.layers]
