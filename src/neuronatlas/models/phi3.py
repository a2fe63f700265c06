"""Phi-3, GLM, GLM-4: ``down_proj(up * activation_fn(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``."""

from .base import Site

SITE = Site(
    model_types=("phi3", "glm", "glm4"),
    blocks=("model.layers", "layers"),
    down="mlp.down_proj",
    act="mlp.activation_fn",
    up="mlp.gate_up_proj",
    fused_gate_up=True,
    final_norm=("model.norm", "norm"),
)
