"""ModernBERT: gated MLP, ``Wo(act(gate) * up)`` with ``gate, up = Wi(x).chunk(2)``."""

from .base import Site

SITE = Site(
    model_types=("modernbert",),
    blocks=("model.layers", "layers"),
    down="mlp.Wo",
    act="mlp.act",
    up="mlp.Wi",
    fused_gate_up=True,
    encoder=True,
    final_norm=("model.final_norm", "final_norm"),
)
