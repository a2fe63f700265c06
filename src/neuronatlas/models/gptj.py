"""GPT-J, CodeGen: ``fc_out(act(fc_in(x)))``, biased linears, attention in parallel with the MLP."""

from .base import Site

SITE = Site(
    model_types=("gptj", "codegen"),
    blocks=("transformer.h", "h"),
    down="mlp.fc_out",
    act="mlp.act",
    up="mlp.fc_in",
    final_norm=("transformer.ln_f", "ln_f"),
)
