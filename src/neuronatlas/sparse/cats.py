"""CATS (Lee et al. 2024): a per-layer threshold on the gate's activation of a gated MLP.

A gated MLP computes z = act(gate(x)) * up(x). CATS keeps the gate dense and, on each token,
skips neuron j when |act(gate(x))_j| is at most its layer's threshold: z_j is then 0, so row j of
up and column j of down are never read. The threshold is the quantile of |act(gate(x))| at the
plan's sparsity, over a calibration corpus's tokens (the paper's histogram; an atlas keeps no
histograms of the gate signal, so it cannot stand in). At most 2/3 of the FFN's bytes are skipped (the
gate is read whole): on a Llama, f = 4/9 of the weights (METHODS.md, "Bytes limit").

Plan tensors: ``quantiles.act.<layer>`` ((Q,) quantiles of |act(gate(x))| at probabilities
``linspace(0, 1, Q)``). The random control skips a random share ``sparsity`` of each token's neurons.

At inference, on a decode step (at most ``MAX_BAG_TOKENS`` tokens) the first of gate/up to be
called computes both: the gate dense (on :func:`.row_kernel.row_products` for a few tokens of a
large float32 weight), then up on the kept rows only (:func:`.row_kernel.kept_row_products`);
down reads only the rows of Wᵀ of the neurons whose z is not 0 (:func:`.row_kernel.thresholded_rows`
at threshold 0). When the tokens keep more rows together than the weight has (batched decode at
low sparsity), or on a CPU's other dtypes and on GPUs, the masked dense product runs instead. A
prompt's own tokens run the masked dense product, or the dense MLP with ``prefill="dense"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NeuronAtlasError
from . import row_kernel
from .ffn import FFNWeights, layer_weights, tokens_of
from .method import SparseMethod, always
from .teal import MAX_QUANTILE_SAMPLE, PREFILLS, dense_prefill, quantile_table
from .thresholds import MAX_BAG_TOKENS, threshold_at

OPTIONS = ("prefill", "seed")


def gate_and_up(weights: FFNWeights) -> tuple[tuple, tuple]:
    """((gate weight, bias), (up weight, bias)), each weight (d_ff, d_model): a fused gate/up weight
    (Phi-3: gate rows, then up rows) split into its halves (views)."""
    if not weights.fused:
        return (weights.gate, weights.gate_bias), (weights.up, weights.up_bias)
    width, bias = weights.width, weights.up_bias
    return ((weights.up[:width], None if bias is None else bias[:width]),
            (weights.up[width:], None if bias is None else bias[width:]))


class CatsRuntime:
    """One layer: the gate dense, up and down on the neurons whose |act(gate(x))| passes the threshold."""

    def __init__(self, layer, threshold: float, random_sparsity: float | None, phase, dense_prefill_phase=None):
        weights = layer_weights(layer)
        self.fused = weights.fused
        (self.gate_weight, self.gate_bias), (self.up_weight, self.up_bias) = gate_and_up(weights)  # (d_ff, d_model)
        self.down_t = weights.down.T.contiguous()  # (d_ff, d_model): row j is neuron j's value vector
        self.down_bias = weights.down_bias
        self.act, self.threshold, self.random_sparsity = layer.act, threshold, random_sparsity
        self.counts = phase.kernel_calls if phase is not None else None
        self.phase = dense_prefill_phase  # the Phase of the model's calls when prompts run dense, else None
        self.kernel = row_kernel.supports(self.up_weight) and row_kernel.supports(self.down_t)
        self.gate_kernel = row_kernel.products_pay(self.gate_weight)
        self.x: torch.Tensor | None = None  # the input whose other output is waiting
        self.waiting: dict[str, torch.Tensor] = {}

    def keep(self, gate: torch.Tensor) -> torch.Tensor:
        """(..., d_ff) bool: the neurons each token computes, from the gate's pre-activation (..., d_ff)."""
        if self.random_sparsity is not None:
            return torch.rand_like(gate, dtype=torch.float32) >= self.random_sparsity
        return self.act(gate).abs() > self.threshold

    def forward(self, role: str, x: torch.Tensor, original) -> torch.Tensor:
        if self.phase is not None and self.phase.prefill:
            return original(x)
        if role == "down":
            return self._down(x, original)
        if x is self.x and role in self.waiting:
            out = self.waiting.pop(role)
            if not self.waiting:
                self.x = None
            return out
        gate = self._gate(x)  # (..., d_ff), dense
        up = self._up(x, self.keep(gate))
        if self.fused:
            return torch.cat([gate, up], -1)  # the MLP's chunk(2) splits them
        outputs = {"gate": gate, "up": up}
        self.x, self.waiting = x, {name: out for name, out in outputs.items() if name != role}
        return outputs[role]

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """gate(x) (..., d_ff), every neuron: on the compiled row products for a decode step's few tokens."""
        if self.gate_kernel and tokens_of(x) <= row_kernel.MAX_PRODUCT_TOKENS:
            return row_kernel.linear(x, self.gate_weight, self.gate_bias)
        return F.linear(x, self.gate_weight, self.gate_bias)

    def _up(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """up(x) (..., d_ff) on the kept neurons, 0 elsewhere."""
        if self.kernel and tokens_of(x) <= MAX_BAG_TOKENS:
            flat = keep.reshape(-1, keep.shape[-1])
            out = row_kernel.kept_row_products(x.reshape(-1, x.shape[-1]), self.up_weight, flat, self.up_weight.shape[0])
            self._count(out)
            if out is not None:
                if self.up_bias is not None:
                    out = out + self.up_bias * flat
                return out.view(keep.shape)
        return F.linear(x, self.up_weight, self.up_bias) * keep

    def _down(self, z: torch.Tensor, original) -> torch.Tensor:
        """down(z), reading only the rows of Wᵀ whose z is not 0 on a decode step."""
        if self.kernel and tokens_of(z) <= MAX_BAG_TOKENS:
            flat = z.reshape(-1, z.shape[-1])
            out = row_kernel.thresholded_rows(flat, 0.0, None, self.down_t, self.down_t.shape[0])
            self._count(out)
            if out is not None:
                out = out.view(*z.shape[:-1], -1)
                return out if self.down_bias is None else out + self.down_bias
        return original(z)

    def _count(self, out) -> None:
        if self.counts is not None:
            self.counts["dense" if out is None else "rows"] += 1


def runtime(plan, layer, phase):
    kernel_only = plan.control == "kernel"  # the kernels at threshold -inf: every neuron computed, none skipped
    if plan.leaves_dense:
        return None
    threshold = threshold_at(plan.tensor("quantiles.act", layer.index), 0.0 if kernel_only else plan.sparsity)
    random = plan.sparsity if plan.control == "random" else None
    return CatsRuntime(layer, threshold, random, phase, phase if dense_prefill(plan) else None)


# ---- calibration --------------------------------------------------------------------------------


@torch.inference_mode()
def gate_quantiles(layer, x: torch.Tensor) -> torch.Tensor:
    """(QUANTILE_POINTS,) quantiles of |act(gate(x))| over the calibration inputs x (N, d_model)."""
    (weight, bias), _ = gate_and_up(layer_weights(layer))
    scores = torch.cat([layer.act(F.linear(rows.to(weight), weight, bias)).abs().float().cpu().reshape(-1)
                        for rows in x.split(1024)])
    if scores.numel() > MAX_QUANTILE_SAMPLE:
        generator = torch.Generator().manual_seed(layer.index)
        scores = scores[torch.randint(scores.numel(), (MAX_QUANTILE_SAMPLE,), generator=generator)]
    return quantile_table(scores)


def build(neurons, options, atlas, sample, plan) -> dict[str, torch.Tensor]:
    return {f"quantiles.act.{layer.index}": gate_quantiles(layer, sample.x[layer.index]) for layer in neurons.layers}


def check(options, atlas, corpus) -> None:
    if options.prefill not in PREFILLS:
        raise NeuronAtlasError(f"unknown prefill {options.prefill!r}; use one of {', '.join(PREFILLS)}")
    if corpus is None:
        raise NeuronAtlasError("cats calibrates its thresholds on a corpus (an atlas keeps no histograms of the gate "
                               "signal): pass --corpus FILE")


METHOD = SparseMethod("cats", build, runtime, options=OPTIONS, check=check, uses_corpus=always,
                      needs_gate="skips the neurons whose gate activation is small")
