"""BLOOM: ``dense_4h_to_h(gelu_impl(dense_h_to_4h(x)))`` (ALiBi positions)."""

from .base import Site

SITE = Site(
    model_types=("bloom",),
    blocks=("transformer.h", "h"),
    down="mlp.dense_4h_to_h",
    act="mlp.gelu_impl",
    up="mlp.dense_h_to_4h",
    final_norm=("transformer.ln_f", "ln_f"),
)
