"""MoEfication: each layer's neurons split into E equal experts, the top-k run per token.

Experts (``split``): balanced k-means of the L2-normalised W_in rows (gate and up rows side by
side for gated MLPs), or of co-activation: per calibration token the top ``active`` share of
neurons by |z| are marked (CMoE), and neurons with similar markers share an expert. The weights
are permuted so every expert is a contiguous block: a decode step runs the chosen experts as
slices of the permuted weights (views, no copy). Router (``router``): ``centroid`` scores expert
e by x · c_e, c_e the mean normalised W_in row of its neurons; ``mlp`` is MoEfication's
d -> E (tanh) -> E network, centroid-initialised and trained with BCE to predict the experts whose
summed |z| is in the top k on calibration tokens. At sparsity s, ``k = E - round(s * E)``.

Plan tensors per layer: ``order`` (d_ff,) neuron at each permuted position, ``bounds`` (E + 1,)
expert e = positions bounds[e]:bounds[e + 1], ``centroids`` (E, d_model), and for the MLP router
``router_w1`` (E, d_model), ``router_b1`` (E,), ``router_w2`` (E, E), ``router_b2`` (E,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NeuronAtlasError
from .ffn import FFNWeights, layer_weights, tokens_of
from .kernels import expert_runs
from .method import SparseMethod

SPLITS = ("weights", "coactivation")
ROUTERS = ("centroid", "mlp")
DEFAULT_EXPERTS = 16


def experts_used(experts: int, sparsity: float) -> int:
    return max(1, experts - int(round(sparsity * experts)))


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """(N,) cluster of each row of features (N, F); clusters differ in size by at most one.

    Lloyd's iterations with a capacity-constrained assignment: (point, cluster) pairs are taken in
    order of distance and a point joins its nearest cluster that still has room.
    """
    n = features.shape[0]
    if clusters > n:
        raise NeuronAtlasError(f"{clusters} experts for a layer of {n} neurons: use at most {n} experts")
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=generator)[:clusters]].clone()
    capacity = torch.full((clusters,), n // clusters, dtype=torch.long)
    capacity[: n % clusters] += 1
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(features, centroids)  # (N, E)
        assignment = _capacity_assign(distances, capacity)
        for cluster in range(clusters):
            centroids[cluster] = features[assignment == cluster].mean(0)
    return assignment


def _capacity_assign(distances: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    n, clusters = distances.shape
    order = distances.reshape(-1).argsort()
    points, chosen = (order // clusters).tolist(), (order % clusters).tolist()
    room, assignment, done = capacity.tolist(), [-1] * n, 0
    for point, cluster in zip(points, chosen):
        if assignment[point] < 0 and room[cluster] > 0:
            assignment[point], room[cluster] = cluster, room[cluster] - 1
            done += 1
            if done == n:
                break
    return torch.tensor(assignment)


def weight_features(weights: FFNWeights) -> torch.Tensor:
    """(d_ff, F) normalised W_in rows (gate and up rows side by side for gated MLPs)."""
    width = weights.width
    up = weights.up[width:] if weights.fused else weights.up
    gate = weights.up[:width] if weights.fused else weights.gate
    rows = up.float() if gate is None else torch.cat([gate.float(), up.float()], 1)
    return F.normalize(rows, dim=1)


def router_rows(weights: FFNWeights) -> torch.Tensor:
    """(d_ff, d_model) normalised rows that decide whether a neuron fires: the gate's, else W_in's."""
    if weights.fused:
        return F.normalize(weights.up[: weights.width].float(), dim=1)
    return F.normalize((weights.up if weights.gate is None else weights.gate).float(), dim=1)


def coactivation_features(z: torch.Tensor, active: float) -> torch.Tensor:
    """(d_ff, N) per neuron, 1 on the calibration tokens where it is in the top ``active`` share by |z|."""
    k = max(1, int(active * z.shape[1]))
    top = z.abs().topk(k, dim=1).indices  # (N, k)
    marks = torch.zeros_like(z, dtype=torch.float32).scatter_(1, top, 1.0)
    return marks.T.contiguous()


def layer_experts(weights: FFNWeights, experts: int, features: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """order, bounds and centroid router of one layer."""
    assignment = balanced_kmeans(features, experts, seed=seed)
    order = torch.argsort(assignment, stable=True)
    sizes = torch.bincount(assignment, minlength=experts)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    rows = router_rows(weights)
    centroids = torch.stack([rows[assignment == e].mean(0) for e in range(experts)])
    return {"order": order, "bounds": bounds, "centroids": centroids}


def train_mlp_router(x: torch.Tensor, z: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor,
                     centroids: torch.Tensor, top: int, steps: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    """MoEfication's router d -> E (tanh) -> E, trained to predict each token's top-``top`` experts."""
    torch.manual_seed(seed)
    x, z = x.clone(), z.clone()  # the calibration pass made them in inference mode: autograd cannot save those
    experts = centroids.shape[0]
    mass = torch.stack([z[:, order[bounds[e]:bounds[e + 1]]].abs().sum(1) for e in range(experts)], 1)  # (N, E)
    target = torch.zeros_like(mass).scatter_(1, mass.topk(top, dim=1).indices, 1.0)
    first, second = torch.nn.Linear(x.shape[1], experts), torch.nn.Linear(experts, experts)
    with torch.no_grad():
        first.weight.copy_(centroids)
        first.bias.zero_()
    optimizer = torch.optim.Adam([*first.parameters(), *second.parameters()], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(second(torch.tanh(first(x))), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {"router_w1": first.weight.detach(), "router_b1": first.bias.detach(),
            "router_w2": second.weight.detach(), "router_b2": second.bias.detach()}


class ExpertFFN:
    """One layer with permuted, expert-contiguous weights; runs the routed experts per token."""

    def __init__(self, plan, layer):
        weights, i = layer_weights(layer), layer.index
        self.order = plan.tensor("order", i).to(weights.down.device)
        self.bounds = plan.tensor("bounds", i).tolist()
        self.experts = len(self.bounds) - 1
        self.top = experts_used(self.experts, plan.sparsity)
        self.router = {name: plan.tensor(name, i).to(weights.down.device, weights.down.dtype)
                       for name in ("centroids", "router_w1", "router_b1", "router_w2", "router_b2") if plan.has(name, i)}
        self.random = plan.control == "random"
        self.width = weights.width
        self.up, self.up_bias = weights.rows("up", self.order)  # (d_ff or 2 d_ff, d): expert-contiguous rows
        self.gate, self.gate_bias = weights.rows("gate", self.order) if weights.gate is not None else (None, None)
        self.down_t = weights.down.index_select(1, self.order).T.contiguous()  # (d_ff, d_model)
        self.down_bias = weights.down_bias
        self.fused = weights.fused
        self._routed_for, self._choice = None, None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) router scores of the tokens x (N, d_model)."""
        if self.random:
            return torch.rand(x.shape[0], self.experts, device=x.device)
        if "router_w1" in self.router:
            hidden = torch.tanh(F.linear(x, self.router["router_w1"], self.router["router_b1"]))
            return F.linear(hidden, self.router["router_w2"], self.router["router_b2"])
        return x @ self.router["centroids"].T

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N, k) experts of each token; computed once per FFN call (up and gate share x)."""
        if self._routed_for is not x:
            flat = x.reshape(-1, x.shape[-1])
            self._choice = self.scores(flat).topk(self.top, dim=1).indices
            self._routed_for = x
        return self._choice

    def forward(self, role, x, original):
        choice = self.route(x) if role != "down" else self._choice
        if tokens_of(x) == 1:
            return self._decode(role, x, choice[0].tolist())
        return self._masked(role, x, choice)

    def _decode(self, role, x, experts):
        runs = expert_runs(experts, self.bounds)
        if role == "down":
            parts, start = [], 0
            for begin, stop in runs:
                parts.append(x[..., start : start + stop - begin] @ self.down_t[begin:stop])
                start += stop - begin
            out = torch.stack(parts).sum(0)
            return out if self.down_bias is None else out + self.down_bias
        weight, bias = (self.gate, self.gate_bias) if role == "gate" else (self.up, self.up_bias)
        offsets = (0, self.width) if self.fused and role == "up" else (0,)  # fused: gate rows, then up rows
        parts = [F.linear(x, weight[o + b : o + s], None if bias is None else bias[o + b : o + s])
                 for o in offsets for b, s in runs]
        return torch.cat(parts, -1)

    def _masked(self, role, x, choice):
        """Many tokens: the dense permuted computation with each token's unrouted neurons zeroed."""
        if role != "down":
            weight, bias = (self.gate, self.gate_bias) if role == "gate" else (self.up, self.up_bias)
            return F.linear(x, weight, bias)
        mask = torch.zeros(choice.shape[0], self.experts, dtype=x.dtype, device=x.device).scatter_(1, choice, 1.0)
        sizes = torch.tensor([b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])], device=x.device)
        mask = mask.repeat_interleave(sizes, dim=1).reshape(*x.shape)  # (.., d_ff) per token
        out = (x * mask) @ self.down_t
        return out if self.down_bias is None else out + self.down_bias


def runtime(plan, layer, phase):
    if plan.sparsity == 0 and plan.control is None:
        return None
    return ExpertFFN(plan, layer)


def build(neurons, options, atlas, sample, plan) -> dict[str, torch.Tensor]:
    """Experts (and router) of every layer, from the weights or the sample's z (N, d_ff) and x (N, d_model)."""
    tensors = {}
    for layer in neurons.layers:
        weights = layer_weights(layer)
        if options.experts > weights.width:
            raise NeuronAtlasError(f"{options.experts} experts for layer {layer.index} of {weights.width} neurons: "
                                   f"use --experts {weights.width} or fewer")
        if options.split == "coactivation":
            features = coactivation_features(sample.z[layer.index], options.active)
        else:
            features = weight_features(weights).cpu()
        parts = layer_experts(weights, options.experts, features, options.seed)
        if options.router == "mlp":
            top = experts_used(options.experts, plan.sparsity)
            parts |= train_mlp_router(sample.x[layer.index], sample.z[layer.index], parts["order"], parts["bounds"],
                                      parts["centroids"].cpu(), top, options.router_steps, options.seed)
        tensors |= {f"{name}.{layer.index}": value.cpu() for name, value in parts.items()}
    return tensors


def uses_corpus(options) -> bool:
    return options.split == "coactivation" or options.router == "mlp"


def check(options, atlas, corpus) -> None:
    if options.split not in SPLITS:
        raise NeuronAtlasError(f"unknown expert split {options.split!r}; use one of {', '.join(SPLITS)}")
    if options.router not in ROUTERS:
        raise NeuronAtlasError(f"unknown router {options.router!r}; use one of {', '.join(ROUTERS)}")
    if uses_corpus(options) and corpus is None:
        raise NeuronAtlasError(f"moe --split {options.split} --router {options.router} learns from activations: pass --corpus FILE")


METHOD = SparseMethod("moe", build, runtime, options=("experts", "split", "router", "active", "seed"),
                      check=check, uses_corpus=uses_corpus)
