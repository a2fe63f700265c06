"""Pieces shared by the gradient methods (attribution, ig, atp, cett): activations with their
gradients at the neuron site, patching hooks, the answer metric and the JSONL readers.

The site is the input z of each block's FFN output projection, (batch, time, d_ff). To read
d metric / d z without detaching anything, a forward pre-hook adds a zero leaf tensor to z: the
forward values stay exactly the same and the leaf's gradient is the total derivative with respect
to z (every path, later layers included). The hooks come from :mod:`neuronatlas.hooks`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import NeuronAtlasError
from ..hooks import after, hook_sites
from ..models import ModelNeurons, find_blocks


def as_sequences(z: torch.Tensor, length: int) -> torch.Tensor:
    """z as (B, T, d_ff): some families (OPT) flatten the site's input to (B * T, d_ff)."""
    return z.reshape(-1, length, z.shape[-1])


class SiteGradients:
    """What :func:`track_neurons` records during one forward: z and the leaves added to it."""

    def __init__(self) -> None:
        self.activations: dict[int, torch.Tensor] = {}  # layer -> z, (B, T, d_ff), detached
        self.leaves: dict[int, torch.Tensor] = {}  # layer -> zero leaf added to z, (B, T, d_ff)

    def gradients(self, metric: torch.Tensor, retain_graph: bool = False) -> dict[int, torch.Tensor]:
        """{layer: d metric / d z}, (B, T, d_ff), for a scalar metric of the recorded forward."""
        layers = sorted(self.leaves)
        grads = torch.autograd.grad(metric, [self.leaves[layer] for layer in layers], retain_graph=retain_graph,
                                    allow_unused=True)
        return {layer: torch.zeros_like(self.leaves[layer]) if grad is None else grad
                for layer, grad in zip(layers, grads)}


@contextmanager
def track_neurons(neurons: ModelNeurons, layers: list[int] | None = None) -> Iterator[SiteGradients]:
    """Record z of ``layers`` (default: all) in a way that lets :meth:`SiteGradients.gradients` differentiate."""
    record = SiteGradients()

    def add_leaf(layer: int, z: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros_like(z, requires_grad=True)
        record.activations[layer] = z.detach()
        record.leaves[layer] = leaf
        return z + leaf

    with hook_sites(neurons, before_down=add_leaf, layers=layers):
        yield record


@contextmanager
def drop_block_gradient(neurons: ModelNeurons, layer: int) -> Iterator[None]:
    """GradDrop: block ``layer``'s residual write keeps its value but passes no gradient back.

    out = x + (block(x) - x).detach(): the skip path still carries the gradient to earlier layers.
    """
    block = find_blocks(neurons.model, neurons.site)[layer]

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        first = output[0] if isinstance(output, tuple) else output
        dropped = hidden + (first - hidden).detach()
        return (dropped,) + tuple(output[1:]) if isinstance(output, tuple) else dropped

    with after(block, hook, with_kwargs=True):
        yield


@contextmanager
def patch_per_row(neurons: ModelNeurons, rows: list[tuple[int, int]], source: dict[int, torch.Tensor]) -> Iterator[None]:
    """Row r of the batch gets neuron ``rows[r] = (layer, index)`` set to ``source[layer][0, :, index]``.

    ``source[layer]`` is z of one sequence, (1, T, d_ff) or (T, d_ff), as long as the batch's sequences.
    """
    targets: dict[int, list[tuple[int, int]]] = {}  # layer -> [(batch row, neuron index)]
    for row, (layer, index) in enumerate(rows):
        targets.setdefault(layer, []).append((row, index))
    where = {layer: torch.tensor(pairs).T for layer, pairs in targets.items()}  # layer -> (2, n): rows, indices

    def patch(layer: int, flat: torch.Tensor) -> torch.Tensor:
        row_ids, index_ids = where[layer]
        length = source[layer].shape[-2]
        z = as_sequences(flat.clone(), length)  # (B, T, d_ff)
        z[row_ids, :, index_ids] = as_sequences(source[layer], length)[0, :, index_ids].T.to(z.dtype)  # (n, T)
        return z.reshape(flat.shape)

    with hook_sites(neurons, before_down=patch, layers=list(where)):
        yield


def first_token(tokenizer, text: str, where: str) -> int:
    """The first token id of ``text`` (no special tokens); an error naming ``where`` when it has none."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise NeuronAtlasError(f"{where}: {text!r} gives no tokens; give a non-empty target")
    return int(ids[0])


def prompt_ids(tokenizer, text: str, where: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's special tokens (bos for Llama)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids or not text.strip():
        raise NeuronAtlasError(f"{where}: the prompt is empty; give some text")
    return ids


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for softmax; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def answer_logprob(logits: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """log P(answer | prompt) per row from logits (B, T, V) of prompt + answer[:-1], (B,)."""
    steps = len(answer)
    logp = F.log_softmax(at_least_float32(logits[:, -steps:]), dim=-1)  # (B, steps, V)
    index = torch.tensor(answer, device=logits.device).expand(logits.shape[0], steps)
    return logp.gather(-1, index[..., None]).squeeze(-1).sum(-1)


def read_jsonl(path: str | Path, required: tuple[str, ...], what: str) -> list[dict]:
    """Records of a JSONL file, each with the ``required`` string fields; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise NeuronAtlasError(f"{what} file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NeuronAtlasError(f"{path}:{number} is not JSON ({error.msg}); write one {what} object per line") from None
        if not isinstance(record, dict):
            raise NeuronAtlasError(f"{path}:{number} is a {type(record).__name__}, not a {what} object")
        missing = [name for name in required if not isinstance(record.get(name), str)]
        if missing:
            raise NeuronAtlasError(f"{path}:{number} has no text field(s) {', '.join(missing)}; "
                                   f"each {what} needs: {', '.join(required)}")
        records.append(record)
    if not records:
        raise NeuronAtlasError(f"{path} holds no {what} records; write one JSON object per line")
    return records


def flat_scores(per_layer: dict[int, torch.Tensor], widths: list[int]) -> torch.Tensor:
    """(N,) float64: per-layer (d_ff,) scores concatenated over all layers (zeros where missing)."""
    out = torch.zeros(sum(widths), dtype=torch.float64)
    start = 0
    for layer, width in enumerate(widths):
        if layer in per_layer:
            out[start : start + width] = per_layer[layer].double()
        start += width
    return out
