"""GPT-NeoX / Pythia, Falcon, Persimmon: ``dense_4h_to_h(act(dense_h_to_4h(x)))``, biased linears."""

from .base import Site

SITE = Site(
    model_types=("gpt_neox", "falcon", "persimmon"),
    blocks=("gpt_neox.layers", "transformer.h", "model.layers"),
    down="mlp.dense_4h_to_h",
    act="mlp.act",
    up="mlp.dense_h_to_4h",
    final_norm=("gpt_neox.final_layer_norm", "transformer.ln_f", "model.final_layernorm"),
)
