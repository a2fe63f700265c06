"""CoreInfer: sentence-level core neurons chosen at prefill, fixed for the whole decode.

At prefill, per token, the top ``limit`` neurons of z are marked (``limit = alpha`` x the mean
number of positive activations per token; signed z by default, ``score="abs"`` ranks |z|); the
``d_ff - round(s * d_ff)`` neurons marked on most of the prompt's tokens are the core set. At the
first decode step the core rows of W_in / W_gate and columns of W_out are compacted once; decode
runs dense products on them (the compiled kernel of hot neurons, :class:`.hot.CompactFFN`). With
several sequences in a batch each keeps its own core set and decode multiplies z by each
sequence's mask instead (same numbers, no compaction). The "kernel" control's core set is every
neuron: the compacted path's kernel with nothing skipped.

Similarity-guided variant (``clusters > 0``, calibrated on a corpus): core sets of the calibration
documents at one layer are clustered (k-means over multi-hot vectors); each cluster stores, per
layer, the neurons most often core among its documents. A prompt takes the cluster nearest to its
own core set at that layer and decodes with the cluster's sets, in every layer.

Plan tensors (variant only): ``centroids.<cluster_layer>`` (C, d_ff), ``cluster_score.<layer>``
(C, d_ff) how often each neuron is core among each cluster's documents.
"""

from __future__ import annotations

import time

import torch

from ..errors import NeuronAtlasError
from .calibrate import CalibrationSample
from .ffn import layer_weights, tokens_of
from .hot import CompactFFN, kept_count
from .method import SparseMethod, picked

DEFAULT_ALPHA = 0.2
SCORES = ("signed", "abs")


def core_frequency(z: torch.Tensor, alpha: float = DEFAULT_ALPHA, score: str = "signed") -> torch.Tensor:
    """(d_ff,) share of the tokens of z (T, d_ff) on which each neuron is among the top ``limit``."""
    positive = (z > 0).sum(-1).float().mean()
    limit = max(1, int(alpha * float(positive)))
    ranked = z.abs() if score == "abs" else z
    top = ranked.topk(min(limit, z.shape[-1]), dim=-1).indices  # (T, limit)
    counts = torch.zeros(z.shape[-1], device=z.device)
    counts.index_add_(0, top.reshape(-1), torch.ones(top.numel(), device=z.device))
    return counts / max(z.shape[0], 1)


def core_neurons(frequency: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sorted indices of the ``keep`` most frequent neurons; ties go to the lower index."""
    k = kept_count(frequency.numel(), sparsity)
    order = torch.argsort(-frequency, stable=True)
    return order[:k].sort().values


class CoreInferRuntime:
    """Dense at prefill (choosing the core set), compacted (or masked) while decoding."""

    def __init__(self, plan, layer, phase):
        self.plan, self.layer, self.phase = plan, layer, phase
        self.alpha = float(plan.options.get("alpha", DEFAULT_ALPHA))
        self.score = plan.options.get("score", "signed")
        self.weights = layer_weights(layer)
        self.keep: torch.Tensor | None = None  # (B, k) per sequence of the current prompt
        self.prompt = -1  # the prompt keep belongs to
        self.compact: CompactFFN | None = None  # its buffers are reused from prompt to prompt
        self.compacted = -1  # the prompt compact holds the core set of
        self.compaction_s = 0.0  # seconds the last prompt's compaction took

    def forward(self, role, x, original):
        if self.phase.prefill:
            if role == "down":
                self._choose(x)
            return original(x)
        if self.prompt != self.phase.prompt:
            return original(x)  # no prompt seen yet: nothing to restrict to
        if self.keep is None:  # similarity-guided: the prompt's clusters are known once prefill ended
            self.keep = torch.stack([self._cluster_core(c) for c in self.phase.clusters]).to(x.device)
        if self.keep.shape[0] == 1:
            if self.compacted != self.prompt:  # first decode step of this prompt
                self._compact(self.keep[0])
            return self.compact.forward(role, x)
        if role != "down":
            return original(x)
        return original(x * self._mask(x))

    def _choose(self, z: torch.Tensor) -> None:
        batch = self.phase.batch
        z = z.reshape(batch, -1, z.shape[-1])  # (B, T, d_ff), also for OPT's flattened tokens
        self.prompt, self.keep = self.phase.prompt, None
        if self.plan.control == "kernel":
            self.keep = torch.arange(z.shape[-1], device=z.device).expand(batch, -1)
            return
        if self.plan.options.get("clusters", 0) and self.plan.control is None:
            if self.layer.index == int(self.plan.options["cluster_layer"]):
                self.phase.clusters = [self._nearest_cluster(z[b]) for b in range(batch)]
            return
        sets = [core_neurons(self._frequency(z[b], b), self.plan.sparsity) for b in range(batch)]
        self.keep = torch.stack(sets)

    def _compact(self, keep: torch.Tensor) -> None:
        started = time.perf_counter()
        if self.compact is None:
            self.compact = CompactFFN(self.weights, keep, self.phase.kernel_calls)
        else:
            self.compact.refill(keep)
        self.compacted = self.prompt
        self.compaction_s = time.perf_counter() - started  # this prompt's gathering, reported by bench

    def _frequency(self, z: torch.Tensor, row: int) -> torch.Tensor:
        if self.plan.control == "random":
            generator = torch.Generator().manual_seed(self.phase.prompt * 7919 + self.layer.index * 31 + row)
            return torch.rand(z.shape[-1], generator=generator).to(z.device)
        return core_frequency(z, self.alpha, self.score)

    def _nearest_cluster(self, z: torch.Tensor) -> int:
        """The cluster whose centroid is nearest to the prompt's multi-hot core set at this layer."""
        multi_hot = torch.zeros(z.shape[-1], device=z.device)
        multi_hot[core_neurons(core_frequency(z, self.alpha, self.score), self.plan.sparsity)] = 1.0
        centroids = self.plan.tensor("centroids", self.layer.index).to(z.device)
        return int(((centroids - multi_hot) ** 2).sum(-1).argmin())

    def _cluster_core(self, cluster: int) -> torch.Tensor:
        return core_neurons(self.plan.tensor("cluster_score", self.layer.index)[cluster], self.plan.sparsity)

    def _mask(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 1, d_ff) or (B*T, d_ff) mask of each sequence's core set, shaped like z."""
        mask = torch.zeros(self.keep.shape[0], z.shape[-1], dtype=z.dtype, device=z.device)
        mask.scatter_(1, self.keep, 1.0)
        if z.dim() == 2:  # OPT: (B*T, d_ff)
            return mask.repeat_interleave(tokens_of(z) // mask.shape[0], dim=0)
        return mask[:, None, :]


def runtime(plan, layer, phase):
    layers = plan.options.get("layers")
    if plan.leaves_dense or (layers is not None and layer.index not in layers):
        return None
    return CoreInferRuntime(plan, layer, phase)


# ---- calibration --------------------------------------------------------------------------------


def cluster_tables(neurons, sample: CalibrationSample, options, cluster_layer: int) -> dict[str, torch.Tensor]:
    """k-means over the calibration windows' core frequencies at ``cluster_layer``; per-cluster frequencies per layer."""
    from sklearn.cluster import KMeans

    if not 0 <= cluster_layer < neurons.num_layers:
        raise NeuronAtlasError(f"cluster layer {cluster_layer} is outside the model's layers 0..{neurons.num_layers - 1}")
    windows = [(a, b) for a, b in sample.windows if b - a > 1]
    if len(windows) < options.clusters:
        raise NeuronAtlasError(f"{options.clusters} clusters need at least as many calibration windows (got {len(windows)})")
    frequency = {layer: torch.stack([core_frequency(sample.z[layer][a:b], options.alpha, options.core_score)
                                     for a, b in windows]) for layer in range(neurons.num_layers)}  # (W, d_ff)
    kmeans = KMeans(options.clusters, n_init=4, random_state=options.seed).fit(frequency[cluster_layer].numpy())
    labels = torch.from_numpy(kmeans.labels_).long()
    tensors = {f"centroids.{cluster_layer}": torch.from_numpy(kmeans.cluster_centers_).float()}
    for layer, table in frequency.items():
        tensors[f"cluster_score.{layer}"] = torch.stack([table[labels == c].mean(0) for c in range(options.clusters)])
    return tensors


def build(neurons, options, atlas, sample, plan) -> dict[str, torch.Tensor]:
    if not options.clusters:
        return {}
    return cluster_tables(neurons, sample, options, plan.options["cluster_layer"])


def check(options, atlas, corpus) -> None:
    if options.clusters and corpus is None:
        raise NeuronAtlasError("coreinfer --clusters (similarity-guided) clusters a calibration corpus: pass --corpus FILE")


def uses_corpus(options) -> bool:
    return bool(options.clusters)


def record(options, num_layers: int) -> dict:
    """Plan options: the core-set choice, and the cluster layer (middle by default) of the clustered variant."""
    chosen = picked(options, ("alpha", "core_score", "layers", "clusters", "seed"))
    chosen["score"] = chosen.pop("core_score")
    if options.clusters:
        chosen["cluster_layer"] = num_layers // 2 if options.cluster_layer is None else options.cluster_layer
    return chosen


METHOD = SparseMethod("coreinfer", build, runtime, check=check, uses_corpus=uses_corpus, record=record,
                      needs_decoding="picks core neurons at prefill and reuses them while decoding")
