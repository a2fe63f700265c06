"""Gemma 1-3: gated GELU MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

from .base import Site

SITE = Site(
    # gemma3 is Gemma3ForConditionalGeneration: its language model's blocks, not the vision tower's
    model_types=("gemma", "gemma2", "gemma3_text", "gemma3"),
    blocks=("language_model.layers", "model.layers", "layers"),
    down="mlp.down_proj",
    act="mlp.act_fn",
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    final_norm=("language_model.norm", "model.norm", "norm"),
)
