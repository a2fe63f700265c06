"""``sparsify``: calibrate a sparse plan for one model, from an atlas or a short calibration pass.

    >>> plan = sparsify("teal", model, tokenizer, 0.5, corpus="train.jsonl")    # doctest: +SKIP
    >>> plan.save("PLAN"); plan.at_sparsity(0.3)                                 # doctest: +SKIP

What each method needs: ``hot`` an atlas; ``teal``/``wina`` a corpus (all inputs) or an atlas
(the down projection's input z only); ``cats`` a corpus (gated families only); ``coreinfer`` nothing (its similarity-guided variant a
corpus); ``moe`` nothing (co-activation experts and the MLP router a corpus).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import NeuronAtlasError
from ..loading import input_device
from ..models import locate_neurons
from . import coreinfer, moe
from .allocation import resolve_greedy
from .calibrate import calibration_pass, check_atlas
from .plan import SparsePlan, check_sparsity, model_info
from .registry import check_support


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
    scope: str = "mlp"  # teal/wina: inputs thresholded, "mlp" (up/gate, down) or "all" (also q/k/v, o)
    allocation: str = "uniform"  # teal/wina: "uniform" (every input at s) or TEAL's per-block "greedy"
    greedy_step: float = 0.05  # teal/wina greedy: TEAL's base step, sparsity added to a projection the size of o
    #   per step (a projection n times larger gets step / n: every step skips the same bytes)
    greedy_tokens: int = 512  # teal/wina greedy: calibration tokens whose block outputs measure the error
    greedy_top: float = 0.9  # teal/wina greedy: the path's last average sparsity (beyond: all inputs rise alike)
    greedy_units: str = "auto"  # teal/wina greedy: "projection" (q, k, v, o, gate, up, down; published) or
    #   "input" (q/k/v and gate/up share one sparsity, hence one mask per token); "auto": projection (resolve_greedy)
    greedy_search: str = "auto"  # teal/wina greedy: "exact" (every unit tried each step; published), "lazy", "auto":
    #   exact on a GPU, lazy on a CPU (resolve_greedy)
    greedy_error: str = "channel"  # teal/wina greedy: "channel" (released code: per-channel L2 over positions,
    #   averaged) or "squared" (squared error summed over tokens)
    greedy_last: float = 0.25  # teal/wina greedy: share of each calibration sequence's last tokens scored (published 0.25)
    prefill: str = "sparse"  # teal/wina/cats: "sparse" (a prompt's tokens thresholded too) or "dense" (only decode steps and
    #   continuations: TEAL's released evaluation, dense first half; the greedy replay thresholds each sequence's last half)
    seed: int = 0
    progress: bool = True  # a progress bar on a terminal for the long steps (TEAL's greedy search); not in the plan


def sparsify(method: str, model, tokenizer=None, sparsity: float = 0.5, *, atlas=None, corpus=None,
             text_field: str = "text", options: SparsifyOptions | None = None,
             name_or_path: str | None = None) -> SparsePlan:
    """A calibrated :class:`SparsePlan` of ``method`` (one of :data:`METHOD_NAMES`) for ``model`` at ``sparsity``."""
    options = options or SparsifyOptions()
    sparsity = check_sparsity(sparsity)
    neurons = locate_neurons(model)
    units, search = resolve_greedy(options.greedy_units, options.greedy_search, input_device(model))
    options = replace(options, greedy_units=units, greedy_search=search)  # the plan records what ran
    chosen = check_support(method, model.config)
    _check_counts(options, neurons.num_layers)
    chosen.check(options, atlas, corpus)
    if atlas is not None:
        check_atlas(atlas, model)
    sample = None
    if corpus is not None and chosen.uses_corpus(options):
        sample = calibration_pass(model, tokenizer, corpus, text_field, options.calib_tokens, options.max_length,
                                  **chosen.calibration(options))
    plan = SparsePlan(method, sparsity, model_info(model, name_or_path), chosen.plan_options(options, neurons.num_layers))
    plan.calibration = {"atlas": None if atlas is None else str(atlas.meta.get("path", "")) or "given",
                        "corpus": None if sample is None else sample.source}
    plan.tensors = chosen.build(neurons, options, atlas, sample, plan)
    return plan


def _check_counts(options: SparsifyOptions, num_layers: int) -> None:
    """Refuse counts and shares that would silently calibrate or convert nothing."""
    for name, value, least in (("calib_tokens", options.calib_tokens, 1), ("max_length", options.max_length, 2),
                               ("experts", options.experts, 1), ("clusters", options.clusters, 0),
                               ("router_steps", options.router_steps, 1), ("greedy_tokens", options.greedy_tokens, 1)):
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


CLI_FLAGS = {"calib_tokens", "experts", "clusters", "alpha", "layers", "cluster_layer", "scope", "allocation",
             "greedy_step", "greedy_tokens", "greedy_units", "greedy_search", "greedy_error", "greedy_last", "prefill"}  # options `sparsify` exposes


def _option(name: str) -> str:
    """An option's name, with its command-line flag where ``neuronatlas sparsify`` has one."""
    return f"{name} (--{name.replace('_', '-')})" if name in CLI_FLAGS else name
