"""Phi-1 / Phi-2: ``fc2(activation_fn(fc1(x)))``, biased linears."""

from .base import Site

SITE = Site(
    model_types=("phi",),
    blocks=("model.layers", "layers"),
    down="mlp.fc2",
    act="mlp.activation_fn",
    up="mlp.fc1",
    final_norm=("model.final_layernorm", "final_layernorm"),
)
