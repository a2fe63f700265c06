"""``sparsify``: calibrate a sparse plan for one model, from an atlas or a short calibration pass.

    >>> plan = sparsify("teal", model, tokenizer, 0.5, corpus="train.jsonl")    # doctest: +SKIP
    >>> plan.save("PLAN"); plan.at_sparsity(0.3)                                 # doctest: +SKIP

What each method needs: ``hot`` an atlas; ``teal``/``wina`` a corpus (all inputs) or an atlas
(the down projection's input z only); ``coreinfer`` nothing (its similarity-guided variant a
corpus); ``moe`` nothing (co-activation experts and the MLP router a corpus).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import NeuronAtlasError
from ..models import locate_neurons
from . import coreinfer, hot, moe, teal
from .calibrate import CalibrationSample, atlas_score_quantiles, calibration_pass, check_atlas
from .ffn import layer_weights
from .plan import SparsePlan, check_sparsity, model_info
from .wrap import check_support

MAX_QUANTILE_SAMPLE = 2_000_000  # scores sorted per table; a random subsample beyond this


@dataclass
class SparsifyOptions:
    calib_tokens: int = 4096  # calibration tokens read from the corpus
    max_length: int = 128  # tokens per calibration window
    hot_score: str = "rms"  # hot: rank neurons by "rms" of z or activation "rate"
    hot_signal: str = "z"  # hot: "z" or the gate signal "gate"
    alpha: float = coreinfer.DEFAULT_ALPHA  # coreinfer: top share of the positive activations per token
    core_score: str = "signed"  # coreinfer: rank z "signed" or by "abs"
    layers: list[int] | None = None  # coreinfer: layers converted (None = all)
    clusters: int = 0  # coreinfer: > 0 for the similarity-guided variant (needs a corpus)
    cluster_layer: int | None = None  # coreinfer: layer whose core sets are clustered (None = middle)
    experts: int = moe.DEFAULT_EXPERTS  # moe: experts per layer
    split: str = "weights"  # moe: "weights" (k-means of W_in rows) or "coactivation" (needs a corpus)
    router: str = "centroid"  # moe: "centroid" or "mlp" (needs a corpus)
    active: float = 0.1  # moe coactivation: share of neurons marked active per token by |z|
    router_steps: int = 200  # moe mlp router: training steps
    seed: int = 0


def sparsify(method: str, model, tokenizer=None, sparsity: float = 0.5, *, atlas=None, corpus=None,
             text_field: str = "text", options: SparsifyOptions | None = None,
             name_or_path: str | None = None) -> SparsePlan:
    """A calibrated :class:`SparsePlan` of ``method`` for ``model`` at ``sparsity``."""
    options = options or SparsifyOptions()
    sparsity = check_sparsity(sparsity)
    neurons = locate_neurons(model)
    check_support(method, neurons.model_type)
    _check_counts(options, neurons.num_layers)
    _check_sources(method, options, atlas, corpus)
    if atlas is not None:
        check_atlas(atlas, model)
    sample = None
    if corpus is not None and _uses_corpus(method, options):
        sample = calibration_pass(model, tokenizer, corpus, text_field, options.calib_tokens, options.max_length)
    plan = SparsePlan(method, sparsity, model_info(model, name_or_path), _plan_options(method, options, neurons))
    plan.calibration = {"atlas": None if atlas is None else str(atlas.meta.get("path", "")) or "given",
                        "corpus": None if sample is None else sample.source}
    builders = {"teal": _teal, "wina": _wina, "coreinfer": _coreinfer, "hot": _hot, "moe": _moe}
    plan.tensors = builders[method](neurons, options, atlas, sample, plan)
    return plan


def _check_counts(options: SparsifyOptions, num_layers: int) -> None:
    """Refuse counts and shares that would silently calibrate or convert nothing."""
    for name, value, least in (("calib_tokens", options.calib_tokens, 1), ("max_length", options.max_length, 2),
                               ("experts", options.experts, 1), ("clusters", options.clusters, 0),
                               ("router_steps", options.router_steps, 1)):
        if value < least:
            raise NeuronAtlasError(f"{_option(name)} must be at least {least}, not {value}")
    for name, value in (("alpha", options.alpha), ("active", options.active)):
        if not 0 < value <= 1:
            raise NeuronAtlasError(f"{_option(name)} must be in (0, 1], not {value}")
    if options.layers is not None:
        outside = [layer for layer in options.layers if not 0 <= layer < num_layers]
        if not options.layers or outside:
            raise NeuronAtlasError(f"{_option('layers')} must list layers within the model's 0..{num_layers - 1}, "
                                   f"not {options.layers}; pass e.g. --layers 0-{num_layers - 1}")
    if options.cluster_layer is not None and not 0 <= options.cluster_layer < num_layers:
        raise NeuronAtlasError(f"{_option('cluster_layer')} {options.cluster_layer} is outside the model's layers "
                               f"0..{num_layers - 1}")


CLI_FLAGS = {"calib_tokens", "experts", "clusters", "alpha", "layers", "cluster_layer"}  # options `sparsify` exposes


def _option(name: str) -> str:
    """An option's name, with its command-line flag where ``neuronatlas sparsify`` has one."""
    return f"{name} (--{name.replace('_', '-')})" if name in CLI_FLAGS else name


def _check_sources(method: str, options: SparsifyOptions, atlas, corpus) -> None:
    if method == "hot" and atlas is None:
        raise NeuronAtlasError("hot needs an atlas (its activation frequencies): pass --atlas ATLAS from `neuronatlas profile`")
    if method in ("teal", "wina") and atlas is None and corpus is None:
        raise NeuronAtlasError(f"{method} calibrates its thresholds from an atlas or a corpus: pass --atlas ATLAS or --corpus FILE")
    if method == "coreinfer" and options.clusters and corpus is None:
        raise NeuronAtlasError("coreinfer --clusters (similarity-guided) clusters a calibration corpus: pass --corpus FILE")
    if method == "moe":
        if options.split not in moe.SPLITS:
            raise NeuronAtlasError(f"unknown expert split {options.split!r}; use one of {', '.join(moe.SPLITS)}")
        if options.router not in moe.ROUTERS:
            raise NeuronAtlasError(f"unknown router {options.router!r}; use one of {', '.join(moe.ROUTERS)}")
        if (options.split == "coactivation" or options.router == "mlp") and corpus is None:
            raise NeuronAtlasError(f"moe --split {options.split} --router {options.router} learns from activations: pass --corpus FILE")


def _uses_corpus(method: str, options: SparsifyOptions) -> bool:
    if method == "coreinfer":
        return bool(options.clusters)
    if method == "moe":
        return options.split == "coactivation" or options.router == "mlp"
    return method in ("teal", "wina")


def _plan_options(method: str, options: SparsifyOptions, neurons) -> dict:
    keys = {"hot": ("hot_score", "hot_signal", "seed"), "coreinfer": ("alpha", "core_score", "layers", "clusters", "seed"),
            "moe": ("experts", "split", "router", "active", "seed"), "teal": ("seed",), "wina": ("seed",)}[method]
    chosen = {key: value for key, value in asdict(options).items() if key in keys}
    if method == "coreinfer":
        chosen["score"] = chosen.pop("core_score")
        if options.clusters:
            chosen["cluster_layer"] = neurons.num_layers // 2 if options.cluster_layer is None else options.cluster_layer
    return chosen


# ---- per method ---------------------------------------------------------------------------------


def _threshold_tables(neurons, atlas, sample: CalibrationSample | None, weighted: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for layer in neurons.layers:
        weights = layer_weights(layer)
        for role, (weight, _) in teal.role_weights(weights).items():
            scale = teal.column_norms(weight).cpu() if weighted else None
            key = f"quantiles.{role}.{layer.index}"
            if sample is not None:
                values = (sample.z if role == "down" else sample.x)[layer.index].abs()
                scores = (values * scale if weighted else values).reshape(-1)
                if scores.numel() > MAX_QUANTILE_SAMPLE:
                    scores = scores[torch.randint(scores.numel(), (MAX_QUANTILE_SAMPLE,), generator=generator)]
                tensors[key] = teal.quantile_table(scores)
            elif role == "down":
                tensors[key] = atlas_score_quantiles(atlas, layer.index, scale, teal.QUANTILE_POINTS)
    return tensors


def _teal(neurons, options, atlas, sample, plan):
    return _threshold_tables(neurons, atlas, sample, weighted=False)


def _wina(neurons, options, atlas, sample, plan):
    return _threshold_tables(neurons, atlas, sample, weighted=True)


def _hot(neurons, options, atlas, sample, plan):
    if atlas.widths != neurons.widths:
        raise NeuronAtlasError(f"atlas widths {atlas.widths} differ from the model's {neurons.widths}; profile this model")
    return hot.make_hot_tensors(atlas, options.hot_score, options.hot_signal)


def _coreinfer(neurons, options, atlas, sample, plan):
    if not options.clusters:
        return {}
    return coreinfer_clusters(neurons, sample, options, plan.options["cluster_layer"])


def coreinfer_clusters(neurons, sample: CalibrationSample, options: SparsifyOptions, cluster_layer: int) -> dict:
    """k-means over the calibration windows' core frequencies at ``cluster_layer``; per-cluster frequencies per layer."""
    from sklearn.cluster import KMeans

    if not 0 <= cluster_layer < neurons.num_layers:
        raise NeuronAtlasError(f"cluster layer {cluster_layer} is outside the model's layers 0..{neurons.num_layers - 1}")
    windows = [(a, b) for a, b in sample.windows if b - a > 1]
    if len(windows) < options.clusters:
        raise NeuronAtlasError(f"{options.clusters} clusters need at least as many calibration windows (got {len(windows)})")
    frequency = {layer: torch.stack([coreinfer.core_frequency(sample.z[layer][a:b], options.alpha, options.core_score)
                                     for a, b in windows]) for layer in range(neurons.num_layers)}  # (W, d_ff)
    kmeans = KMeans(options.clusters, n_init=4, random_state=options.seed).fit(frequency[cluster_layer].numpy())
    labels = torch.from_numpy(kmeans.labels_).long()
    tensors = {f"centroids.{cluster_layer}": torch.from_numpy(kmeans.cluster_centers_).float()}
    for layer, table in frequency.items():
        tensors[f"cluster_score.{layer}"] = torch.stack([table[labels == c].mean(0) for c in range(options.clusters)])
    return tensors


def _moe(neurons, options, atlas, sample, plan):
    tensors = {}
    for layer in neurons.layers:
        weights = layer_weights(layer)
        if options.experts > weights.width:
            raise NeuronAtlasError(f"{options.experts} experts for layer {layer.index} of {weights.width} neurons: "
                                   f"use --experts {weights.width} or fewer")
        if options.split == "coactivation":
            features = moe.coactivation_features(sample.z[layer.index], options.active)
        else:
            features = moe.weight_features(weights).cpu()
        parts = moe.layer_experts(weights, options.experts, features, options.seed)
        if options.router == "mlp":
            top = moe.experts_used(options.experts, plan.sparsity)
            parts |= moe.train_mlp_router(sample.x[layer.index], sample.z[layer.index], parts["order"], parts["bounds"],
                                          parts["centroids"].cpu(), top, options.router_steps, options.seed)
        tensors |= {f"{name}.{layer.index}": value.cpu() for name, value in parts.items()}
    return tensors
