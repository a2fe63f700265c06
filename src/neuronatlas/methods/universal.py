"""Universal neurons (Gurnee et al. 2024, "Universal Neurons in GPT2 Language Models").

Two models (e.g. the same architecture trained from two seeds) read the same tokens; for every
neuron a of model A and every neuron b of model B, the Pearson correlation of their activations z
over all those tokens (padding and special tokens such as <s> left out). The correlations come
from sums streamed batch by batch in float64 (Σa, Σa², Σb, Σb², Σab; never the per-token
activations of the corpus), so memory is O(N_A · N_B) whatever the corpus length.

* best match of a = max_b corr(a, b) over all of B's neurons (all layers);
* baseline of a = the same after a random rotation of B's neurons: each of B's layers is mixed by
  its own Haar-random orthogonal matrix R (b' = R b). The rotated correlations follow exactly from
  the streamed sums and B's per-layer Gram matrices Σ b bᵀ, so no second pass is needed;
* excess = best match − baseline; a is **universal** when excess > ``threshold`` (0.5).

The same is done the other way (B's neurons against rotated A). Neurons that never vary have no
correlation and are never universal.

:func:`weight_statistics` gives each neuron's ‖w_in‖, ‖w_out‖, cos(w_in, w_out) and the moments of
its vocabulary composition (cos(w_out, W_U[v]) over the vocabulary: skew, kurtosis; see
:mod:`neuronatlas.methods.vocab`); with the activation frequency (share of tokens with z > 0) from
the same stream, :func:`compare_groups` reports how universal neurons differ from the rest: means,
medians, the mean within-layer z-score of the universal ones (each statistic standardised within
its layer, as universal neurons cluster in some layers), a Mann-Whitney U test, and the Spearman
correlation of each statistic with the excess over all neurons (no threshold needed).
"""

from __future__ import annotations

import math

import torch

from ..errors import NeuronAtlasError
from ..hooks import activation_module, capture_activations, forward_batch, pad_token_id
from ..loading import max_positions, window_length
from ..models import locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import layer_of, model_block_for
from .nulls import NullOptions, null_block, pooled_p, q_values
from .nulls import best as nulls_best

ROTATIONS = 10  # default rotations of the null: each is a pass over the (N_A, N_B) correlations
STATISTICS = ("w_in_norm", "w_out_norm", "in_out_cos", "vocab_skew", "vocab_kurtosis", "activation_frequency")


class PairCorrelation:
    """Streaming float64 sums for the correlation of every neuron of A with every neuron of B."""

    def __init__(self, widths_a: list[int], widths_b: list[int]):
        self.widths = {"a": list(widths_a), "b": list(widths_b)}
        self.tokens = 0
        self.sum = {side: torch.zeros(sum(w), dtype=torch.float64) for side, w in self.widths.items()}
        self.active = {side: torch.zeros(sum(w), dtype=torch.float64) for side, w in self.widths.items()}
        self.gram = {side: [torch.zeros((d, d), dtype=torch.float64) for d in w] for side, w in self.widths.items()}
        self.cross = torch.zeros((sum(widths_a), sum(widths_b)), dtype=torch.float64)  # Σ a bᵀ

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a (n, N_A), b (n, N_B): the activations of the same n tokens, layers concatenated."""
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"both models must see the same tokens ({a.shape[0]} vs {b.shape[0]})")
        values = {"a": a.double(), "b": b.double()}
        self.tokens += a.shape[0]
        for side, x in values.items():
            self.sum[side] += x.sum(0)
            self.active[side] += (x > 0).sum(0)
            start = 0
            for layer, width in enumerate(self.widths[side]):
                block = x[:, start : start + width]
                self.gram[side][layer] += block.T @ block
                start += width
        self.cross += values["a"].T @ values["b"]

    def sumsq(self, side: str) -> torch.Tensor:
        return torch.cat([gram.diagonal() for gram in self.gram[side]])

    def correlation(self) -> torch.Tensor:
        """(N_A, N_B) Pearson correlations; NaN where a neuron never varies."""
        return _pearson(self.tokens, self.sum["a"], self.sumsq("a"), self.sum["b"], self.sumsq("b"), self.cross)

    def rotated_correlation(self, side: str, generator: torch.Generator) -> torch.Tensor:
        """Correlations with ``side``'s neurons rotated per layer by random orthogonal matrices (N_A, N_B)."""
        rotation = [_haar(width, generator) for width in self.widths[side]]
        total = _block_apply(self.sum[side][None], rotation)[0]  # Σ (R b) written as Σ b R: columns are new neurons
        sumsq = torch.cat([(r * (gram @ r)).sum(0) for gram, r in zip(self.gram[side], rotation)])  # diag(Rᵀ G R)
        if side == "b":
            return _pearson(self.tokens, self.sum["a"], self.sumsq("a"), total, sumsq, _block_apply(self.cross, rotation))
        cross = _block_apply(self.cross.T, rotation).T
        return _pearson(self.tokens, total, sumsq, self.sum["b"], self.sumsq("b"), cross)

    def activation_frequency(self, side: str) -> torch.Tensor:
        return self.active[side] / max(self.tokens, 1)


def _pearson(n, sum_a, sumsq_a, sum_b, sumsq_b, cross) -> torch.Tensor:
    var_a = n * sumsq_a - sum_a * sum_a  # n² Var(a)
    var_b = n * sumsq_b - sum_b * sum_b
    covariance = n * cross - sum_a[:, None] * sum_b[None]
    scale = (var_a.clamp(min=0).sqrt()[:, None] * var_b.clamp(min=0).sqrt()[None])
    corr = covariance / scale
    flat_a = var_a <= 1e-12 * n * sumsq_a.clamp(min=1e-300)
    flat_b = var_b <= 1e-12 * n * sumsq_b.clamp(min=1e-300)
    corr[flat_a] = float("nan")
    corr[:, flat_b] = float("nan")
    return corr.clamp(-1, 1)


def _haar(width: int, generator: torch.Generator) -> torch.Tensor:
    """A (width, width) random orthogonal matrix, uniform (Haar) over the orthogonal group."""
    q, r = torch.linalg.qr(torch.randn((width, width), generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


def _block_apply(matrix: torch.Tensor, rotations: list[torch.Tensor]) -> torch.Tensor:
    """matrix (m, Σ widths) with each layer's block of columns multiplied by its rotation."""
    out, start = torch.empty_like(matrix), 0
    for rotation in rotations:
        width = rotation.shape[0]
        out[:, start : start + width] = matrix[:, start : start + width] @ rotation
        start += width
    return out


def _best(corr: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max correlation and its index along ``dim``, ignoring NaN (NaN when all are)."""
    filled = torch.where(torch.isnan(corr), torch.full_like(corr, -float("inf")), corr)
    values, index = filled.max(dim)
    return torch.where(torch.isinf(values), torch.full_like(values, float("nan")), values), index


def universality(stats: PairCorrelation, threshold: float = 0.5, seed: int = 0,
                 null: NullOptions | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{"a": {...}, "b": {...}}, each with (N,) "best", "match" (flat index in the other model),
    "baseline", "excess" and bool "universal". With ``null``: also (N,) "q", the best correlation
    against ``null.count(10)`` more random rotations (pooled standardised p, BH q), and "null_best";
    "universal" then also needs q < fdr."""
    generator = torch.Generator().manual_seed(seed)
    corr = stats.correlation()
    out = {}
    for side, other, dim in (("a", "b", 1), ("b", "a", 0)):
        best, match = _best(corr, dim)
        baseline, _ = _best(stats.rotated_correlation(other, generator), dim)
        excess = best - baseline
        out[side] = {"best": best, "match": match, "baseline": baseline, "excess": excess,
                     "universal": torch.nan_to_num(excess, nan=-1.0) > threshold}
        if null is not None:
            rotated = torch.stack([_best(stats.rotated_correlation(other, generator), dim)[0]
                                   for _ in range(null.count(ROTATIONS))])  # (P, N)
            q = q_values({side: pooled_p(best.nan_to_num(float("-inf")), rotated.nan_to_num(float("-inf")))})[side]
            out[side].update(q=q, null_best=nulls_best(rotated.flatten()))
            out[side]["universal"] &= q < null.fdr
    return out


# ---- streaming two models over a corpus -----------------------------------------------------------


@torch.no_grad()
def correlate_models(model_a, model_b, tokenizer, corpus, max_tokens: int = 20_000, max_length: int | None = None,
                     batch_size: int = 8) -> PairCorrelation:
    """Run both models over the first ``max_tokens`` real, non-special tokens of ``corpus``; the streamed sums."""
    from ..corpus import iter_batches, iter_windows

    if max_tokens < 2:
        raise NeuronAtlasError(f"max tokens must be at least 2 (got {max_tokens})")
    sites = [locate_neurons(model_a), locate_neurons(model_b)]
    stats = PairCorrelation(sites[0].widths, sites[1].widths)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    shorter = min((model_a.config, model_b.config), key=lambda config: max_positions(config) or math.inf)
    max_length = window_length(shorter, max_length)  # windows both models can read
    windows = iter_windows(corpus, tokenizer, max_length)
    for batch in iter_batches(windows, batch_size, pad_token_id(tokenizer), "right"):
        keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)  # (B, T)
        room = max_tokens - stats.tokens
        if room < int(keep.sum()):  # the last batch: only the first tokens that fit
            keep &= keep.flatten().cumsum(0).reshape(keep.shape) <= room
        if keep.any():
            stats.update(*[_activations(model, site, batch, keep) for model, site in zip((model_a, model_b), sites)])
        if stats.tokens >= max_tokens:
            break
    if stats.tokens < 2:
        raise NeuronAtlasError(f"corpus {corpus.path} gave {stats.tokens} token(s); correlations need at least 2")
    return stats


def _activations(model, site, batch, keep: torch.Tensor) -> torch.Tensor:
    """(n kept tokens, all neurons) float64 z of one model, layers concatenated."""
    device = next(model.parameters()).device
    with capture_activations(site, batch.input_ids.shape) as captured:
        forward_batch(activation_module(model), batch.input_ids.to(device), batch.attention_mask.to(device))
    mask = keep.to(device)
    return torch.cat([captured[layer][mask].double().cpu() for layer in range(site.num_layers)], 1)


# ---- weight statistics and the comparison -----------------------------------------------------------


@torch.no_grad()
def weight_statistics(model) -> dict[str, torch.Tensor]:
    """Per neuron (all layers concatenated, (N,) float64): the weight statistics of the module docstring."""
    from .vocab import vocab_statistics

    site = locate_neurons(model)
    vocab = vocab_statistics(model)
    parts = {name: [] for name in STATISTICS if name != "activation_frequency"}
    for layer in site.layers:
        w_in = layer.w_in().detach().double().cpu()  # (D, d)
        w_out = layer.w_out().detach().double().cpu().T  # (D, d)
        parts["w_in_norm"].append(w_in.norm(dim=1))
        parts["w_out_norm"].append(w_out.norm(dim=1))
        parts["in_out_cos"].append(torch.nn.functional.cosine_similarity(w_in, w_out, dim=1))
        parts["vocab_skew"].append(vocab[layer.index]["skew"])
        parts["vocab_kurtosis"].append(vocab[layer.index]["kurtosis"])
    return {name: torch.cat(values).double() for name, values in parts.items()}


def compare_groups(statistics: dict[str, torch.Tensor], universal: torch.Tensor, widths: list[int],
                   excess: torch.Tensor | None = None) -> dict:
    """{statistic: {"universal": {"mean", "median"}, "rest": {...}, "layer_z", "p_value"[, "spearman_excess"]}}.

    See the module docstring; with ``excess`` (N,) also the Spearman correlation of each statistic
    with the excess correlation over all neurons that vary: a view that needs no threshold.
    """
    from scipy.stats import mannwhitneyu, spearmanr

    layer = layer_of(widths)(torch.arange(sum(widths)))[0]
    out = {}
    for name, values in statistics.items():
        values = values.double()
        standard = torch.empty_like(values)
        for number in range(len(widths)):
            rows = layer == number
            standard[rows] = (values[rows] - values[rows].mean()) / values[rows].std().clamp(min=1e-30)
        mine, rest = values[universal], values[~universal]
        entry = {"universal": _summary(mine), "rest": _summary(rest), "layer_z": None, "p_value": None}
        if len(mine) and len(rest):
            entry["layer_z"] = float(standard[universal].mean())
            entry["p_value"] = float(mannwhitneyu(mine.numpy(), rest.numpy()).pvalue)
        if excess is not None:
            finite = ~torch.isnan(excess)
            entry["spearman_excess"] = float(spearmanr(excess[finite].numpy(), values[finite].numpy()).statistic)
        out[name] = entry
    return out


def _summary(values: torch.Tensor) -> dict:
    if not len(values):
        return {"mean": None, "median": None}
    return {"mean": float(values.mean()), "median": float(values.median())}


def find_universal(model_a, model_b, tokenizer, corpus, threshold: float = 0.5, seed: int = 0,
                   max_tokens: int = 20_000, max_length: int | None = None, batch_size: int = 8,
                   atlas_meta: dict | None = None, null: NullOptions | None = None) -> NeuronSet:
    """Model A's universal neurons against model B; score = excess correlation over the rotation baseline.

    ``params`` holds the share of universal neurons (overall and per layer, for both models) and
    :func:`compare_groups` of model A's neurons; ``params["details"]["layer:index"]`` each universal
    neuron's best match in B ("layer:index"), its correlation and the baseline.
    """
    if not 0 < threshold < 2:
        raise NeuronAtlasError(f"threshold must be in (0, 2) (got {threshold}); the paper's is 0.5")
    stats = correlate_models(model_a, model_b, tokenizer, corpus, max_tokens, max_length, batch_size)
    result = universality(stats, threshold, seed, null)
    widths = {side: stats.widths[side] for side in ("a", "b")}
    locate = {side: layer_of(widths[side]) for side in ("a", "b")}
    statistics = weight_statistics(model_a)
    statistics["activation_frequency"] = stats.activation_frequency("a")
    mine = result["a"]
    chosen = mine["universal"].nonzero().flatten()
    layers, indices = locate["a"](chosen)
    match_layers, match_indices = locate["b"](mine["match"][chosen])
    neurons, details = [], {}
    for n, flat in enumerate(chosen.tolist()):
        q = float(mine["q"][flat]) if "q" in mine else None
        neurons.append(Neuron(int(layers[n]), int(indices[n]), float(mine["excess"][flat]), None, q))
        details[f"{int(layers[n])}:{int(indices[n])}"] = {
            "match": f"{int(match_layers[n])}:{int(match_indices[n])}", "correlation": float(mine["best"][flat]),
            "baseline": float(mine["baseline"][flat])}
    params = {
        "threshold": threshold, "seed": seed, "tokens": stats.tokens, "max_length": max_length,
        "other_model": str(getattr(model_b, "name_or_path", "")),
        "share": {side: _shares(result[side], widths[side]) for side in ("a", "b")},
        "mean_best": {side: _nanmean(result[side]["best"]) for side in ("a", "b")},
        "mean_baseline": {side: _nanmean(result[side]["baseline"]) for side in ("a", "b")},
        "constant": {side: int(torch.isnan(result[side]["best"]).sum()) for side in ("a", "b")},
        "statistics": compare_groups(statistics, mine["universal"], widths["a"], mine["excess"]),
        "score": "best correlation in the other model minus the same after a random rotation",
        "details": details,
    }
    block = None
    if null is not None:
        per_label = {"all": {"best": nulls_best(mine["best"]), "null_best": mine["null_best"], "chance": None}}
        block = null_block("universal", "model B's neurons, by random per-layer rotations (the tokens are not "
                           "re-run)", null.count(ROTATIONS), null, per_label)
    return NeuronSet("universal", model_block_for(model_a, atlas_meta), neurons, params, "z", block)


def _shares(side: dict, widths: list[int]) -> dict:
    universal, start, per_layer = side["universal"], 0, []
    for width in widths:
        per_layer.append(float(universal[start : start + width].double().mean()))
        start += width
    return {"all": float(universal.double().mean()), "count": int(universal.sum()), "per_layer": per_layer}


def _nanmean(values: torch.Tensor) -> float | None:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if len(finite) else None
