"""Nemotron, Arcee: ungated ReLU² MLP, ``down_proj(act_fn(up_proj(x)))``."""

from .base import Site

SITE = Site(
    model_types=("nemotron", "arcee"),
    blocks=("model.layers", "layers"),
    down="mlp.down_proj",
    act="mlp.act_fn",
    up="mlp.up_proj",
    final_norm=("model.norm", "norm"),
)
