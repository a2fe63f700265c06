"""OPT, XGLM, BioGPT: ``fc2(activation_fn(fc1(x)))`` inside the decoder layer (OPT: on tokens flattened to (B*T, d))."""

from .base import Site

SITE = Site(
    model_types=("opt", "xglm", "biogpt"),
    blocks=("decoder.layers", "model.layers", "biogpt.layers"),
    down="fc2",
    act="activation_fn",
    up="fc1",
    # every layer has its own ``final_layer_norm`` too: only the decoder's (OPT) or the model's is the final one
    final_norm=("decoder.final_layer_norm", "model.layer_norm", "biogpt.layer_norm"),
)
