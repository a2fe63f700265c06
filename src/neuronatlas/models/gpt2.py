"""GPT-2: ``c_proj(act(c_fc(x)))`` with Conv1D weights stored (in, out)."""

from .base import Site

SITE = Site(
    model_types=("gpt2",),
    blocks=("transformer.h", "h"),
    down="mlp.c_proj",
    act="mlp.act",
    up="mlp.c_fc",
    conv1d=True,
    final_norm=("transformer.ln_f", "ln_f"),
)
