"""One layer's FFN weights in one layout for every family, and swapping its projection modules.

Every family's MLP calls its projections as modules (``up(x)``, ``gate(x)``, ``down(z)``), so a
sparse layer stands in for them with :class:`Projection` modules of the same call signature: the
family's own MLP code keeps running (no patched forward), only the projections change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import LayerNeurons

ROLES = ("up", "gate", "down")


@dataclass
class FFNWeights:
    """Weights as (out, in). For fused gate/up (Phi-3) ``up`` holds gate rows, then up rows."""

    up: torch.Tensor  # (d_ff, d_model), or (2 d_ff, d_model) when fused
    up_bias: torch.Tensor | None
    gate: torch.Tensor | None  # (d_ff, d_model)
    gate_bias: torch.Tensor | None
    down: torch.Tensor  # (d_model, d_ff)
    down_bias: torch.Tensor | None
    fused: bool

    @property
    def width(self) -> int:
        return self.down.shape[1]

    def rows(self, role: str, keep: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the input projection ``role`` restricted to neurons ``keep`` (k,).

        ``out``: a buffer of the result's shape to gather the weight into instead of a new tensor.
        """
        weight, bias = (self.up, self.up_bias) if role == "up" else (self.gate, self.gate_bias)
        if role == "up" and self.fused:  # gate rows then up rows, so the MLP's chunk(2) still splits them
            keep = torch.cat([keep, keep + self.width])
        rows = torch.index_select(weight, 0, keep, out=out)
        return rows, None if bias is None else bias.index_select(0, keep)


def layer_weights(layer: LayerNeurons) -> FFNWeights:
    conv1d = layer.site.conv1d

    def weight(module):
        return (module.weight.T if conv1d else module.weight).detach()

    def bias(module):
        return None if getattr(module, "bias", None) is None else module.bias.detach()

    gate = layer.gate
    return FFNWeights(
        up=weight(layer.up), up_bias=bias(layer.up),
        gate=None if gate is None else weight(gate), gate_bias=None if gate is None else bias(gate),
        down=weight(layer.down), down_bias=bias(layer.down), fused=layer.site.fused_gate_up,
    )


def layer_roles(layer: LayerNeurons) -> dict[str, nn.Module]:
    """{role: the family's projection module} for this layer."""
    roles = {"up": layer.up, "down": layer.down}
    if layer.gate is not None:
        roles["gate"] = layer.gate
    return roles


class Projection(nn.Module):
    """Stands in for one FFN projection; the layer's runtime computes it.

    ``runtime`` is a plain object (not a submodule): ``forward(role, x, original)``.
    """

    def __init__(self, runtime, role: str, original: nn.Module):
        super().__init__()
        self.role = role
        self.__dict__["runtime"] = runtime  # kept out of the module tree on purpose
        self.__dict__["original"] = original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime.forward(self.role, x, self.original)

    def extra_repr(self) -> str:
        return f"role={self.role}, runtime={type(self.runtime).__name__}"


class ModuleSwap:
    """Put replacement modules in place of originals inside a model, and put the originals back."""

    def __init__(self, model: nn.Module, replacements: dict[nn.Module, nn.Module]):
        names = {id(module): name for name, module in model.named_modules()}
        self._slots = []  # (parent, attribute, original, replacement)
        for original, replacement in replacements.items():
            parent_name, _, attribute = names[id(original)].rpartition(".")
            self._slots.append((model.get_submodule(parent_name), attribute, original, replacement))

    def attach(self) -> None:
        for parent, attribute, _, replacement in self._slots:
            setattr(parent, attribute, replacement)

    def detach(self) -> None:
        for parent, attribute, original, _ in self._slots:
            setattr(parent, attribute, original)


def tokens_of(x: torch.Tensor) -> int:
    """Tokens in an activation (..., features): (B, T, F) or OPT's flattened (B*T, F)."""
    return x.numel() // x.shape[-1] if x.numel() else 0
