"""Mistral: gated SiLU MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

from .base import Site

SITE = Site(
    model_types=("mistral", "ministral"),
    blocks=("model.layers", "layers"),
    down="mlp.down_proj",
    act="mlp.act_fn",
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    final_norm=("model.norm", "norm"),
)
