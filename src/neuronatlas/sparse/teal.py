"""TEAL: per-token magnitude thresholds on the inputs of the FFN projections.

For each layer and projection (``up``, ``gate``: their input is the FFN input x; ``down``: its
input is z), an input channel is kept on a token when its score exceeds the layer's threshold; the
projection then reads only the kept rows of its transposed weight (see :mod:`.kernels`); in gated
MLPs gate and up share one table and one ``embedding_bag`` per decode token (:class:`GateUpPair`).
TEAL's score is ``|x_i|``; WINA's is ``|x_i| * ||W[:, i]||_2`` (:mod:`.wina`).

The plan stores, per layer and projection, the score's quantile table ``quantiles.<role>.<layer>``
((Q,) at probabilities ``linspace(0, 1, Q)``), calibrated on a corpus (a calibration pass over
the inputs) or, for ``down``, from the atlas's per-neuron histograms of z (then up and gate stay
dense). The threshold at sparsity s is the table interpolated at s: every projection of every
layer drops the same share s of its input channels.
"""

from __future__ import annotations

import torch

from .ffn import FFNWeights, layer_weights, tokens_of
from .kernels import masked_input_matmul, sparse_input_matvec, weighted_row_sums

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

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 scale: torch.Tensor | None, random_sparsity: float | None):
        self.weight_t = weight_t  # (in, out) contiguous: row i = input channel i
        self.bias = bias
        self.threshold = threshold
        self.scale = scale  # (in,) WINA's column norms, None for TEAL
        self.random_sparsity = random_sparsity  # the random control drops this share of channels

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_sparsity is not None:
            return torch.rand_like(x) >= self.random_sparsity
        score = x.abs() if self.scale is None else x.abs() * self.scale
        return score > self.threshold

    def same_mask_as(self, other: SparseInputProjection) -> bool:
        """Whether both always keep the same channels of the same input (TEAL's gate and up)."""
        return (self.random_sparsity is None and other.random_sparsity is None and self.scale is None
                and other.scale is None and self.threshold == other.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask(x)
        if tokens_of(x) == 1:  # decode: read only the kept rows
            out = sparse_input_matvec(x.reshape(-1), self.weight_t, mask.reshape(-1)).reshape(*x.shape[:-1], -1)
        else:
            out = masked_input_matmul(x, self.weight_t, mask)
        return self.with_bias(out)

    def with_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias


class GateUpPair:
    """Gate and up of a gated MLP on one decode token, computed together by one ``embedding_bag``.

    Both read the same x: the first of the two calls thresholds x once (once per projection for
    WINA and the random control, whose masks differ) and computes both outputs from one table
    ``[W_gateᵀ; W_upᵀ]`` (2 d_model, d_ff); the second call returns the output kept for it.
    """

    def __init__(self, gate: SparseInputProjection, up: SparseInputProjection, table: torch.Tensor):
        self.gate, self.up, self.table = gate, up, table
        self.shared_mask = gate.same_mask_as(up)
        self.rows = gate.weight_t.shape[0]  # d_model: up's rows follow gate's in the table
        self.x: torch.Tensor | None = None  # the input whose other output is waiting
        self.waiting: dict[str, torch.Tensor] = {}

    def forward(self, role: str, x: torch.Tensor) -> torch.Tensor:
        if x is self.x and role in self.waiting:
            out = self.waiting.pop(role)
            self.x = None
            return out
        flat = x.reshape(-1)  # (d_model,)
        kept_gate = self.gate.mask(flat).nonzero().squeeze(1)
        kept_up = kept_gate if self.shared_mask else self.up.mask(flat).nonzero().squeeze(1)
        values = flat[kept_gate]
        gate, up = weighted_row_sums(self.table, [kept_gate, kept_up + self.rows],
                                     [values, values if self.shared_mask else flat[kept_up]])
        outputs = {"gate": self.gate.with_bias(gate.view(*x.shape[:-1], -1)),
                   "up": self.up.with_bias(up.view(*x.shape[:-1], -1))}
        self.x, self.waiting = x, {name: out for name, out in outputs.items() if name != role}
        return outputs[role]


class ThresholdRuntime:
    def __init__(self, projections: dict[str, SparseInputProjection], pair: GateUpPair | None):
        self.projections = projections
        self.pair = pair

    def forward(self, role, x, original):
        projection = self.projections.get(role)
        if projection is None:
            return original(x)
        if self.pair is not None and role != "down" and tokens_of(x) == 1:
            return self.pair.forward(role, x)
        return projection.forward(x)


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
    roles = {role: weight_bias for role, weight_bias in role_weights(weights).items()
             if plan.has(f"quantiles.{role}", layer.index)}
    if not roles:  # no input was calibrated (e.g. x from an atlas alone): the layer stays dense
        return None
    paired = "gate" in roles and "up" in roles
    table = torch.cat([roles["gate"][0].T, roles["up"][0].T]).contiguous() if paired else None  # (2 d_model, d_ff)
    projections = {}
    for role, (weight, bias) in roles.items():
        threshold = threshold_at(plan.tensor(f"quantiles.{role}", layer.index), plan.sparsity)
        scale = column_norms(weight).to(weight.dtype) if weighted else None
        random = plan.sparsity if plan.control == "random" else None
        if paired and role in ("gate", "up"):  # views of the shared table: no second copy
            rows = weight.shape[1]
            weight_t = table[:rows] if role == "gate" else table[rows:]
        else:
            weight_t = weight.T.contiguous()
        projections[role] = SparseInputProjection(weight_t, bias, threshold, scale, random)
    pair = GateUpPair(projections["gate"], projections["up"], table) if paired else None
    return ThresholdRuntime(projections, pair)


def runtime(plan, layer, phase):
    return threshold_runtime(plan, layer, weighted=False)
