"""MPT: ``down_proj(act(up_proj(x)))`` in each block's ``ffn``."""

from .base import Site

SITE = Site(
    model_types=("mpt",),
    blocks=("transformer.blocks", "blocks"),
    down="ffn.down_proj",
    act="ffn.act",
    up="ffn.up_proj",
    final_norm=("transformer.norm_f", "norm_f"),
)
