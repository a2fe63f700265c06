"""DistilBERT: ``lin2(activation(lin1(x)))`` in each layer's ``ffn``."""

from .base import Site

SITE = Site(
    model_types=("distilbert",),
    blocks=("transformer.layer",),
    down="ffn.lin2",
    act="ffn.activation",
    up="ffn.lin1",
    encoder=True,
    final_norm=(),  # post-LN: each layer ends in its own LayerNorm
)
