"""Hot neurons (PowerInfer's offline profile): a static mask of each layer's most active neurons.

The plan stores a score per neuron (``score.<layer>``, (d_ff,)), read from the atlas:

- ``rate``: share of tokens with z > the atlas threshold (PowerInfer's activation frequency);
- ``rms``: root mean square of z, sqrt(sumsq / tokens) (for gated families, whose z is signed);

optionally of the gate signal (``signal="gate"``). At sparsity s the ``d_ff - round(s * d_ff)``
best-scoring neurons are kept; their rows of W_in / W_gate and columns of W_out are compacted once
into dense weights, so there is no per-token or per-prompt work at all. A decode step on a CPU in
float32 multiplies them with the compiled :func:`.row_kernel.row_products`, other calls with
``F.linear``. The "kernel" control keeps every neuron on the same kernel: the kernel's own share
of the speedup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NeuronAtlasError
from . import row_kernel
from .ffn import FFNWeights, layer_weights, tokens_of
from .method import SparseMethod

SCORES = ("rate", "rms")


def kept_count(width: int, sparsity: float) -> int:
    return width - int(round(sparsity * width))


def hot_scores(atlas, score: str = "rms", signal: str = "z") -> dict[str, torch.Tensor]:
    """{"score.<layer>": (d_ff,)} from the atlas."""
    if score not in SCORES:
        raise NeuronAtlasError(f"unknown hot-neuron score {score!r}; use one of {', '.join(SCORES)}")
    tokens = float(atlas.tokens_per_label.sum().clamp(min=1))
    tensors = {}
    for layer in range(atlas.num_layers):
        if score == "rate":
            value = atlas.overall("active", layer, signal).double() / tokens
        else:
            value = (atlas.overall("sumsq", layer, signal).double() / tokens).sqrt()
        tensors[f"score.{layer}"] = value.float()
    return tensors


def chosen_neurons(scores: torch.Tensor, sparsity: float, control: str | None, seed: int, layer: int) -> torch.Tensor:
    """Sorted indices of the kept neurons: the best scores, a random same-size set for the random
    control, or every neuron for the kernel control."""
    width = scores.numel()
    if control == "kernel":
        return torch.arange(width)
    k = kept_count(width, sparsity)
    if control == "random":
        generator = torch.Generator().manual_seed(seed * 1009 + layer)
        return torch.randperm(width, generator=generator)[:k].sort().values
    return scores.topk(k).indices.sort().values


class CompactFFN:
    """One layer run on a subset of its neurons, with weights compacted into dense matrices.

    :meth:`refill` gathers another subset of the same size into the same buffers (CoreInfer, once
    per prompt): no new allocation, so no page faults on half the layer's weight bytes per prompt.
    ``counts`` (the Phase's ``kernel_calls``) counts the calls on the compiled kernel ("rows") and, where it
    could run but the call has too many tokens for it, on ``F.linear`` ("dense").
    """

    def __init__(self, weights: FFNWeights, keep: torch.Tensor, counts=None):
        self.weights, self.counts = weights, counts
        self.up = self.gate = self.down = None  # buffers, allocated by the first refill
        self.refill(keep)

    @torch.inference_mode(False)  # normal tensors, refillable inside and outside inference mode
    @torch.no_grad()
    def refill(self, keep: torch.Tensor) -> None:
        """Gather the rows of W_in / W_gate and the columns of W_out of ``keep`` (k,), sorted indices."""
        if self.down is not None and self.down.shape[1] != keep.numel():
            self.up = self.gate = self.down = None  # another size: new buffers
        weights, self.keep = self.weights, keep
        self.up, self.up_bias = weights.rows("up", keep, out=self.up)  # (k or 2k, d_model)
        self.gate, self.gate_bias = weights.rows("gate", keep, out=self.gate) if weights.gate is not None else (None, None)
        self.down = torch.index_select(weights.down, 1, keep, out=self.down)  # (d_model, k)
        self.down_bias = weights.down_bias
        self.products = {role: (weight, bias, row_kernel.products_pay(weight)) for role, weight, bias in
                         (("up", self.up, self.up_bias), ("gate", self.gate, self.gate_bias),
                          ("down", self.down, self.down_bias))}  # role: (weight, bias, on the kernel when few tokens)

    def forward(self, role: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias, kernel = self.products[role]
        on_kernel = kernel and tokens_of(x) <= row_kernel.MAX_PRODUCT_TOKENS
        if self.counts is not None and kernel:
            self.counts["rows" if on_kernel else "dense"] += 1
        return row_kernel.linear(x, weight, bias) if on_kernel else F.linear(x, weight, bias)


class HotRuntime:
    def __init__(self, compact: CompactFFN):
        self.compact = compact

    def forward(self, role, x, original):
        return self.compact.forward(role, x)


def runtime(plan, layer, phase):
    if plan.leaves_dense:
        return None
    scores = plan.tensor("score", layer.index)
    keep = chosen_neurons(scores, plan.sparsity, plan.control, plan.options.get("seed", 0), layer.index)
    counts = phase.kernel_calls if phase is not None else None
    return HotRuntime(CompactFFN(layer_weights(layer), keep.to(layer.down.weight.device), counts))


def build(neurons, options, atlas, sample, plan) -> dict[str, torch.Tensor]:
    if atlas.widths != neurons.widths:
        raise NeuronAtlasError(f"atlas widths {atlas.widths} differ from the model's {neurons.widths}; profile this model")
    if options.hot_signal not in atlas.signals:
        raise NeuronAtlasError(f"this atlas has no {options.hot_signal!r} signal (it has: {', '.join(atlas.signals)}); "
                               "use --hot-signal z")
    return hot_scores(atlas, options.hot_score, options.hot_signal)


def check(options, atlas, corpus) -> None:
    if atlas is None:
        raise NeuronAtlasError("hot needs an atlas (its activation frequencies): pass --atlas ATLAS from `neuronatlas profile`")


METHOD = SparseMethod("hot", build, runtime, options=("hot_score", "hot_signal", "seed"), check=check)
