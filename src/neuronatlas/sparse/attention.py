"""The attention projections of each block, found by name for every family, and the blocks themselves.

TEAL and WINA with ``scope="all"`` threshold the inputs of the attention projections too: the
query/key/value projections read one input (the normalised hidden state, (..., d_model)) and the
output projection reads the heads' concatenated values (..., d_attn). Families name them
differently (Llama ``self_attn.q_proj``/``o_proj``, GPT-2 ``attn.c_attn``/``c_proj`` with Conv1D
weights, GPT-NeoX ``attention.query_key_value``/``dense``, OPT ``out_proj``, BERT
``attention.self.query``/``attention.output.dense``); roles are ``q``, ``k``, ``v`` (or one fused
``qkv``) and ``o``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NeuronAtlasError
from ..models import LayerNeurons, find_blocks, locate_neurons

ATTENTION_CHILDREN = ("self_attn", "attn", "attention", "self_attention")
INPUT_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "query": "q", "key": "k", "value": "v",
               "query_proj": "q", "key_proj": "k", "value_proj": "v", "q_lin": "q", "k_lin": "k", "v_lin": "v",
               "attn.q": "q", "attn.k": "k", "attn.v": "v",  # MPNet
               "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv"}
OUTPUT_LEAVES = ("o_proj", "out_proj", "c_proj", "out_lin", "Wo")  # at any depth under the attention module
OUTPUT_PATHS = ("dense", "output.dense", "attn.o")  # only at these paths: too common a name deeper down
OUTPUT_NAMES = OUTPUT_LEAVES + OUTPUT_PATHS
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def projection_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of a Linear or of GPT-2's Conv1D (which stores (in, out))."""
    weight = module.weight
    return weight.T if type(module).__name__ == "Conv1D" else weight


def attention_roles(block: nn.Module) -> dict[str, nn.Module]:
    """{role: projection module} of one block's attention; {} when none is recognised."""
    attention = next((getattr(block, name) for name in ATTENTION_CHILDREN
                      if isinstance(getattr(block, name, None), nn.Module)), None)
    if attention is None:
        return {}
    roles = {}
    for path, module in attention.named_modules():
        if not is_projection(module):
            continue
        leaf = path.rpartition(".")[2]
        if leaf in INPUT_ROLES or path in INPUT_ROLES:
            roles[INPUT_ROLES.get(path, INPUT_ROLES.get(leaf))] = module
        elif path in OUTPUT_PATHS or leaf in OUTPUT_LEAVES:
            roles["o"] = module
    complete = "o" in roles and ("qkv" in roles or {"q", "k", "v"} <= set(roles))
    return roles if complete else {}


@dataclass
class SparseLayer(LayerNeurons):
    """One block's FFN neurons (as :class:`LayerNeurons`), its attention projections and the block."""

    attention: dict[str, nn.Module] = field(default_factory=dict)  # role -> module, {} if not found
    block: nn.Module | None = None


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    """Every block of ``model`` with its FFN and attention projections."""
    neurons = locate_neurons(model)
    blocks = find_blocks(model, neurons.site)
    return [SparseLayer(**vars(layer), attention=attention_roles(block), block=block)
            for layer, block in zip(neurons.layers, blocks)]


def check_attention(layers: list[SparseLayer], model_type: str) -> None:
    """Refuse ``scope="all"`` for a family whose attention projections are not recognised."""
    if not all(layer.attention for layer in layers):
        raise NeuronAtlasError(
            f"could not find the attention projections of this {model_type} model (looked for "
            f"{', '.join(INPUT_ROLES)} and {', '.join(OUTPUT_NAMES)} under {', '.join(ATTENTION_CHILDREN)}); "
            "use --scope mlp"
        )
