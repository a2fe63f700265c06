"""The most a plan can speed up batch-1 decode: the weight bytes a step reads, dense over sparse,
and what that leaves once the rest of a step (norms, attention, the framework's own time) is counted.

Batch-1 decode is memory-bound: a step reads every weight once (the LM head included; of the input
embedding only one row, so it is left out unless it is the LM head's own, tied, matrix). A plan
skips a share of some projections' bytes: TEAL/WINA the byte-weighted sparsity of each thresholded
input's projections, hot and CoreInfer ``sparsity`` of the FFN's gate/up/down bytes in the layers
they convert, CATS ``sparsity`` of their up/down bytes. The limit is ``read / (read - skipped)``
(METHODS.md, "Bytes limit"). MoE plans (an expert share plus a router) get none.

The bytes limit holds for the linear layers alone. On a CPU, eager PyTorch spends a good part of a
small model's step elsewhere (SmolLM2-135M at 1 thread: 73-76% in its linear layers, the rest in
norms, rotary embeddings, attention over the cache and Python), which no sparsity removes:
:func:`step_limit` is Amdahl's law over that share, the most the plan can give on this machine.
"""

from __future__ import annotations

from torch import nn

from .attention import sparse_layers
from .ffn import layer_weights
from .plan import SparsePlan
from .teal import role_sparsities, role_weights


def bytes_limit(model: nn.Module, plan: SparsePlan) -> float | None:
    """read / (read - skipped) weight bytes of a batch-1 decode step with ``plan``; None for MoE."""
    skipped = skipped_bytes(model, plan)
    if skipped is None:
        return None
    read = weight_bytes_read(model)
    return read / max(read - skipped, 1)


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter once, but the input embedding only
    when the LM head shares it."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    skip = set() if tied or embedding is None else {id(embedding.weight)}
    unique = {id(p): p for p in model.parameters() if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in unique.values())


def skipped_bytes(model: nn.Module, plan: SparsePlan) -> float | None:
    """Weight bytes the plan skips on a decode step (an average over tokens for per-token masks)."""
    if plan.sparsity == 0:
        return 0.0
    layers = sparse_layers(model)
    if plan.method in ("teal", "wina"):
        total = 0.0
        for layer in layers:
            roles = {role: weight_bias for role, weight_bias in role_weights(layer).items()
                     if plan.has(f"quantiles.{role}", layer.index)}
            if roles:
                sparsity = role_sparsities(plan, layer.index, roles)
                total += sum(sparsity[role] * weight.numel() * weight.element_size() for role, (weight, _) in roles.items())
        return total
    if plan.method == "cats":  # up's rows and down's columns of the skipped neurons; the gate is read whole
        return sum(plan.sparsity * _ffn_bytes(layer, ("up", "down")) for layer in layers)
    if plan.method in ("hot", "coreinfer"):
        converted = plan.options.get("layers")
        return sum(plan.sparsity * _ffn_bytes(layer) for layer in layers if converted is None or layer.index in converted)
    return None


def _ffn_bytes(layer, roles: tuple[str, ...] = ("up", "gate", "down")) -> int:
    """Bytes of the FFN's weights of ``roles``; a fused gate/up weight (Phi-3) is half gate, half up."""
    weights = layer_weights(layer)

    def size(weight) -> int:
        return 0 if weight is None else weight.numel() * weight.element_size()

    if weights.fused:
        per_role = {"up": size(weights.up) // 2, "gate": size(weights.up) // 2, "down": size(weights.down)}
    else:
        per_role = {"up": size(weights.up), "gate": size(weights.gate), "down": size(weights.down)}
    return sum(per_role[role] for role in roles)


def step_limit(bytes_limit: float, linear_share: float) -> float:
    """The decode speedup left when only the linear layers' share of a step (``linear_share``) gets
    ``bytes_limit`` times faster: 1 / ((1 - share) + share / bytes_limit)."""
    return 1.0 / ((1.0 - linear_share) + linear_share / bytes_limit)
