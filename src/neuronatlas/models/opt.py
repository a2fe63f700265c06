"""OPT: ``fc2(activation_fn(fc1(x)))`` inside the decoder layer, on tokens flattened to (B*T, d)."""

from .base import Site

SITE = Site(
    model_types=("opt",),
    blocks=("decoder.layers",),
    down="fc2",
    act="activation_fn",
    up="fc1",
    # every layer has its own ``final_layer_norm`` too: only the decoder's is the final one
    final_norm=("decoder.final_layer_norm",),
)
