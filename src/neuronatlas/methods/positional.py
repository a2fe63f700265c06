"""Positional neurons: activation explained by the token's position in its window.

From the atlas's position statistics (per position bucket b: tokens n_b, Σz, Σz² per neuron),
the variance reduction by bucket (Gurnee et al. 2024's VR with the feature "position bucket"):

    VR = 1 − Σ_b n_b Var_b / (N Var)  =  [Σ_b S_b² / n_b − S² / N] / [Q − S² / N]

with S_b, Q_b the bucket's sum and sum of squares, S, Q, N the totals; float64. VR is 1 when the
activation is constant within every bucket (and differs between them), 0 when every bucket has the
same mean. Buckets are coarse (0, 1, 2, 3, 4-7, 8-15, ...), so a neuron that tracks the exact
position still shows a VR below 1, and one whose mean moves with position only partly (Voita et
al.'s "range" neurons) shows up when its within-bucket spread is small.

The null (``null=``): the atlas keeps only per-bucket sums, so positions cannot be re-shuffled; VR is
tested analytically instead, with the one-way ANOVA F = [VR / (P − 1)] / [(1 − VR) / (N − P)] over
P filled buckets and N tokens (p from F(P − 1, N − P), Benjamini-Hochberg q over all neurons): what a
shuffle of the positions gives when tokens are independent. Tokens of one window are not, so the
p-values are optimistic; VR ≥ ``min_variance_explained`` stays the effect-size cut. Chance VR of a
shuffle: (P − 1) / (N − 1).

Position 0 of a window is ``<s>`` for Llama-like tokenizers, or a document's first token for those
that add none (SmolLM2): real models have many neurons that react to that token alone (it draws
attention as ``<s>`` does), and they look positional. With position 0 in, each kept neuron's
details also give its VR without it ("vr_after_first"), and ``params["first_token_only"]`` counts
those below the cut then; ``min_position=1`` leaves out the buckets starting below 1.
"""

from __future__ import annotations

import torch

from ..errors import NeuronAtlasError
from ..neuronset import Neuron, NeuronSet, model_info
from .nulls import NullOptions, null_block, q_values


def position_variance_reduction(atlas, layer: int, min_position: int = 0) -> dict[str, torch.Tensor]:
    """Per neuron of ``layer``: "vr" (D,), "peak_bucket" (D,) index of the highest mean, "means" (P, D)."""
    if atlas.positions is None:
        raise NeuronAtlasError(
            "this atlas has no position statistics; profile again without --no-positions to find positional neurons"
        )
    keep = torch.tensor([edge >= min_position for edge in atlas.position_edges])
    counts = atlas.position_tokens.double()[keep]  # (P,)
    sums = atlas.position_stat("sum", layer).double()[keep]  # (P, D)
    squares = atlas.position_stat("sumsq", layer).double()[keep]
    total = counts.sum()
    if total == 0:
        raise NeuronAtlasError(f"no tokens at positions >= {min_position} in this atlas; lower min_position")
    filled = counts > 0
    means = torch.where(filled[:, None], sums / counts.clamp(min=1)[:, None], torch.full_like(sums, float("nan")))
    overall = sums.sum(0) ** 2 / total
    total_ss = squares.sum(0) - overall
    between_ss = (sums[filled] ** 2 / counts[filled][:, None]).sum(0) - overall
    # float noise can push a constant neuron's total slightly off zero: call it not positional
    scale = squares.sum(0).abs().clamp(min=1e-300)
    varies = total_ss > 1e-9 * scale
    vr = torch.where(varies, (between_ss / total_ss.where(varies, torch.ones_like(total_ss))).clamp(0, 1),
                     torch.zeros_like(total_ss))
    peak = means.nan_to_num(float("-inf")).argmax(0)
    kept_index = keep.nonzero().flatten()
    return {"vr": vr, "peak_bucket": kept_index[peak], "means": means}


def find_positional(atlas, min_variance_explained: float = 0.5, min_position: int = 0,
                    layers: list[int] | None = None, null: NullOptions | None = None) -> NeuronSet:
    """Neurons whose activation variance is explained by the position bucket: VR ≥ ``min_variance_explained``.

    score = VR; ``params["details"]["layer:index"]`` gives the bucket of the highest mean activation
    ("peak_bucket", e.g. "4-7"), that mean, and the lowest bucket mean.
    """
    if not 0 <= min_variance_explained <= 1:
        raise NeuronAtlasError(f"min variance explained must be between 0 and 1 (got {min_variance_explained})")
    if atlas.positions is None:
        raise NeuronAtlasError(
            "this atlas has no position statistics; profile again without --no-positions to find positional neurons"
        )
    names = atlas.position_buckets()
    chosen_layers = range(atlas.num_layers) if layers is None else layers
    for layer in chosen_layers:
        if not 0 <= layer < atlas.num_layers:
            raise NeuronAtlasError(f"layer {layer} is out of range: the atlas has {atlas.num_layers} layers")
    results = {layer: position_variance_reduction(atlas, layer, min_position) for layer in chosen_layers}
    after_first = _vr_after_first_token(atlas, results, min_position)
    tested = positional_null(atlas, results, min_position, null) if null is not None else None
    neurons, details = [], {}
    for layer, result in results.items():
        vr = result["vr"]
        passes = vr >= min_variance_explained
        if tested is not None:
            passes &= tested["q"][layer] < null.fdr
        hits = passes.nonzero().flatten()
        hits = hits[vr[hits].argsort(descending=True, stable=True)]
        for index in hits.tolist():
            column = result["means"][:, index]
            peak = int(result["peak_bucket"][index])
            q = None if tested is None else float(tested["q"][layer][index])
            neurons.append(Neuron(layer, index, float(vr[index]), None, q))
            details[f"{layer}:{index}"] = {
                "peak_bucket": names[peak], "peak_mean": float(atlas.position_stat("sum", layer)[peak, index]
                                                                / max(int(atlas.position_tokens[peak]), 1)),
                "lowest_mean": float(column[~column.isnan()].min()),
            }
            if after_first is not None:
                details[f"{layer}:{index}"]["vr_after_first"] = float(after_first[layer][index])
    neurons.sort(key=lambda n: -n.score)
    params = {
        "min_variance_explained": min_variance_explained, "min_position": min_position, "layers": layers,
        "buckets": names, "tokens_per_bucket": atlas.position_tokens.tolist(),
        "score": "variance of z explained by the position bucket (1 - within-bucket / total variance)",
        "details": details,
    }
    if after_first is not None:  # neurons positional only through the first token: below the cut without it
        params["first_token_only"] = sum(detail["vr_after_first"] < min_variance_explained for detail in details.values())
    return NeuronSet("positional", model_info(atlas.meta), neurons, params, "z",
                     None if tested is None else tested["block"])


def _vr_after_first_token(atlas, results: dict, min_position: int) -> dict | None:
    """{layer: (D,) VR without position 0} when position 0 is in, and other positions hold tokens; else None.
    Real models have many first-token neurons (the window's first token draws attention like <s>)."""
    if min_position > 0 or not any(edge >= 1 for edge, tokens in zip(atlas.position_edges, atlas.position_tokens)
                                   if tokens > 0):
        return None
    return {layer: position_variance_reduction(atlas, layer, 1)["vr"] for layer in results}


def positional_null(atlas, results: dict, min_position: int, options: NullOptions) -> dict:
    """{"q": {layer: (D,) q}, "block"}: the analytic F-test of VR (see the module docstring)."""
    from scipy.stats import f as f_distribution

    keep = torch.tensor([edge >= min_position for edge in atlas.position_edges])
    counts = atlas.position_tokens.double()[keep]
    buckets, tokens = int((counts > 0).sum()), float(counts.sum())
    if buckets < 2 or tokens <= buckets:
        raise NeuronAtlasError(f"the position null needs at least two filled buckets and more tokens than buckets "
                               f"(got {buckets} buckets, {tokens:.0f} tokens); pass --no-null")
    p = {}
    for layer, result in results.items():
        vr = result["vr"].clamp(0, 1 - 1e-15)
        statistic = (vr / (buckets - 1)) / ((1 - vr) / (tokens - buckets))
        p[layer] = torch.from_numpy(f_distribution.sf(statistic.numpy(), buckets - 1, tokens - buckets)).double()
    chance = (buckets - 1) / (tokens - 1)
    real = max(float(result["vr"].max()) for result in results.values()) if results else None
    block = null_block("positional", "nothing: an analytic F-test of VR by position bucket (tokens taken as "
                       "independent)", 0, options, {"all": {"best": real, "null_best": None, "chance": chance}},
                       test="one-way ANOVA F-test of VR, Benjamini-Hochberg q")
    return {"q": q_values(p), "block": block}
