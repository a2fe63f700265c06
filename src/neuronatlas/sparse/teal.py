"""TEAL: per-token magnitude thresholds on the inputs of the FFN projections.

For each layer and projection (``up``, ``gate``: their input is the FFN input x; ``down``: its
input is z), an input channel is kept on a token when its score exceeds the layer's threshold; the
projection then reads only the kept rows of its transposed weight (see :mod:`.kernels`). TEAL's
score is ``|x_i|``; WINA's is ``|x_i| * ||W[:, i]||_2`` (:mod:`.wina`).

The plan stores, per layer and projection, the score's quantile table ``quantiles.<role>.<layer>``
((Q,) at probabilities ``linspace(0, 1, Q)``), calibrated on a corpus (a calibration pass over
the inputs) or, for ``down``, from the atlas's per-neuron histograms of z (then up and gate stay
dense). The threshold at sparsity s is the table interpolated at s: every projection of every
layer drops the same share s of its input channels.
"""

from __future__ import annotations

import torch

from .ffn import FFNWeights, layer_weights, tokens_of
from .kernels import masked_input_matmul, sparse_input_matvec

QUANTILE_POINTS = 1001


def threshold_at(quantiles: torch.Tensor, sparsity: float) -> float:
    """The score below which a share ``sparsity`` of the calibration inputs fall."""
    if sparsity <= 0:
        return float("-inf")
    position = sparsity * (quantiles.numel() - 1)
    low = int(position)
    high = min(low + 1, quantiles.numel() - 1)
    fraction = position - low
    return float(quantiles[low] * (1 - fraction) + quantiles[high] * fraction)


def quantile_table(scores: torch.Tensor) -> torch.Tensor:
    """(QUANTILE_POINTS,) quantiles of a 1-D sample of scores."""
    ordered = scores.reshape(-1).float().sort().values
    positions = torch.linspace(0, ordered.numel() - 1, QUANTILE_POINTS)
    low = positions.floor().long()
    high = positions.ceil().long()
    fraction = positions - low
    return ordered[low] * (1 - fraction) + ordered[high] * fraction


class SparseInputProjection:
    """One projection whose input channels are dropped per token when their score is below a threshold."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 scale: torch.Tensor | None, random_sparsity: float | None):
        self.weight_t = weight.T.contiguous()  # (in, out): row i = input channel i
        self.bias = bias
        self.threshold = threshold
        self.scale = scale  # (in,) WINA's column norms, None for TEAL
        self.random_sparsity = random_sparsity  # the random control drops this share of channels

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_sparsity is not None:
            return torch.rand_like(x) >= self.random_sparsity
        score = x.abs() if self.scale is None else x.abs() * self.scale
        return score > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask(x)
        if tokens_of(x) == 1:  # decode: read only the kept rows
            out = sparse_input_matvec(x.reshape(-1), self.weight_t, mask.reshape(-1)).reshape(*x.shape[:-1], -1)
        else:
            out = masked_input_matmul(x, self.weight_t, mask)
        return out if self.bias is None else out + self.bias


class ThresholdRuntime:
    def __init__(self, projections: dict[str, SparseInputProjection]):
        self.projections = projections

    def forward(self, role, x, original):
        projection = self.projections.get(role)
        return original(x) if projection is None else projection.forward(x)


def role_weights(weights: FFNWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    roles = {"up": (weights.up, weights.up_bias), "down": (weights.down, weights.down_bias)}
    if weights.gate is not None:
        roles["gate"] = (weights.gate, weights.gate_bias)
    return roles


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """(in,) ||W[:, i]||_2 of a (out, in) weight."""
    return weight.float().norm(dim=0)


def threshold_runtime(plan, layer, weighted: bool):
    if plan.sparsity == 0:
        return None
    weights = layer_weights(layer)
    projections = {}
    for role, (weight, bias) in role_weights(weights).items():
        if not plan.has(f"quantiles.{role}", layer.index):
            continue  # this input was not calibrated (e.g. x from an atlas alone): stays dense
        threshold = threshold_at(plan.tensor(f"quantiles.{role}", layer.index), plan.sparsity)
        scale = column_norms(weight).to(weight.dtype) if weighted else None
        random = plan.sparsity if plan.control == "random" else None
        projections[role] = SparseInputProjection(weight, bias, threshold, scale, random)
    return ThresholdRuntime(projections) if projections else None


def runtime(plan, layer, phase):
    return threshold_runtime(plan, layer, weighted=False)
