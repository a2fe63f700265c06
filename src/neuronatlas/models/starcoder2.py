"""StarCoder2, GPT-BigCode (StarCoder, SantaCoder): ``c_proj(act(c_fc(x)))`` with Linear weights."""

from .base import Site

SITE = Site(
    model_types=("starcoder2", "gpt_bigcode"),
    blocks=("model.layers", "transformer.h"),
    down="mlp.c_proj",
    act="mlp.act",
    up="mlp.c_fc",
    final_norm=("model.norm", "transformer.ln_f"),
)
