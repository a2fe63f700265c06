"""Llama and the families that copy its MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

from .base import Site

SITE = Site(
    model_types=("llama", "smollm3", "olmo", "olmo2", "olmo3", "stablelm", "granite", "cohere", "cohere2", "helium",
                 "exaone4", "seed_oss"),
    blocks=("model.layers", "layers"),
    down="mlp.down_proj",
    act="mlp.act_fn",
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    final_norm=("model.norm", "norm"),
)
