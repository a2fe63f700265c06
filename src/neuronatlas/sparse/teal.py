"""TEAL: per-token magnitude thresholds on the inputs of a block's linear layers.

For each layer and projection an input channel is kept on a token when its score exceeds the
projection's threshold (kernels and groups in :mod:`.thresholds`). TEAL's score is ``|x_i|``;
WINA's is ``|x_i| * ||W[:, i]||_2`` (:mod:`.wina`). ``scope="mlp"`` thresholds the FFN's inputs
(up/gate read x, down reads z); ``scope="all"`` also the attention's (q/k/v read one input, o its
own; :mod:`.attention`). ``allocation`` shares the plan's sparsity among these inputs: ``uniform``
(every input at s) or TEAL's ``greedy`` per-block allocation (:mod:`.allocation`).

Plan tensors: ``quantiles.<role>.<layer>`` ((Q,) quantiles of the role's input score at
probabilities ``linspace(0, 1, Q)``), calibrated on a corpus or, for ``down`` alone, from the
atlas's per-neuron histograms of z; with greedy allocation ``allocation.<layer>`` (S, G), the
greedy path over the scope's input groups. The threshold of a role at sparsity s is its table
interpolated at its group's sparsity.

``prefill`` says what happens to a prompt's own tokens (a call of several new tokens that starts a
prompt): ``"sparse"`` thresholds them like every other token; ``"dense"`` runs them dense and
thresholds only decode steps and continuations, as TEAL's released evaluation does (each sequence's
first half dense, its second half sparse; the paper's section on prefill sparsification) and as a
deployment would (a prefill is compute-bound: masks there save no time). Its greedy replay then
thresholds only the last half of each calibration sequence (``DENSE_SHARE``), as released.
"""

from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm

from ..errors import NeuronAtlasError
from .allocation import (ALLOCATIONS, AUTO, GROUP_OF, SCOPES, SEARCHES, UNITS, at_target, greedy_path, uniform,
                         unit_of, unit_order, unit_sizes)
from .attention import SparseLayer, check_attention, projection_weight, sparse_layers
from .calibrate import CalibrationSample, atlas_score_quantiles
from .ffn import layer_roles, layer_weights
from .method import SparseMethod, always
from .thresholds import ThresholdRuntime, build_group, threshold_at

QUANTILE_POINTS = 1001
MAX_QUANTILE_SAMPLE = 2_000_000  # scores sorted per table; a random subsample beyond this
OPTIONS = ("scope", "allocation", "greedy_step", "greedy_tokens", "greedy_top", "greedy_units", "greedy_search",
           "greedy_error", "greedy_last", "prefill")
ERRORS = ("channel", "squared")  # greedy block-output error: the released code's, or the summed squares
PREFILLS = ("sparse", "dense")  # a prompt's own tokens thresholded, or run dense (see dense_prefill)
DENSE_SHARE = 0.5  # prefill "dense" in the greedy replay: each sequence's first half stays dense, as released


def quantile_table(scores: torch.Tensor) -> torch.Tensor:
    """(QUANTILE_POINTS,) quantiles of a 1-D sample of scores."""
    ordered = scores.reshape(-1).float().sort().values
    positions = torch.linspace(0, ordered.numel() - 1, QUANTILE_POINTS)
    low, high = positions.floor().long(), positions.ceil().long()
    fraction = positions - low
    return ordered[low] * (1 - fraction) + ordered[high] * fraction


def role_weights(layer: SparseLayer, scope: str = "all") -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{role: ((out, in) weight, bias)} of the projections in ``scope`` (FFN roles, then attention's)."""
    weights = layer_weights(layer)
    roles = {"up": (weights.up, weights.up_bias), "down": (weights.down, weights.down_bias)}
    if weights.gate is not None:
        roles["gate"] = (weights.gate, weights.gate_bias)
    if scope == "all":
        for role, module in getattr(layer, "attention", {}).items():
            bias = getattr(module, "bias", None)
            roles[role] = (projection_weight(module).detach(), None if bias is None else bias.detach())
    return roles


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """(in,) ||W[:, i]||_2 of a (out, in) weight."""
    return weight.float().norm(dim=0)


def layer_groups(roles) -> tuple[str, ...]:
    """The input groups the roles read, in allocation order."""
    present = {GROUP_OF[role] for role in roles}
    return tuple(group for group in SCOPES["all"] if group in present)


def plan_units(plan) -> str:
    """The plan's greedy units (plans made before projection units had input groups)."""
    return plan.options.get("greedy_units", "input")


def role_sparsities(plan, layer: int, roles: dict) -> dict[str, float]:
    """{role: sparsity} of one layer at the plan's sparsity (uniform, or along the greedy path)."""
    kind = plan_units(plan) if plan.has("allocation", layer) else "input"
    units = unit_order(roles, kind)
    sizes = unit_sizes({role: weight for role, (weight, _) in roles.items()}, units, kind)
    values = at_target(plan.tensor("allocation", layer), sizes, plan.sparsity) if plan.has("allocation", layer) \
        else uniform(sizes, plan.sparsity)
    return {role: float(values[units.index(unit_of(role, kind))]) for role in roles}


def group_sparsities(plan, layer: int, roles: dict) -> dict[str, float]:
    """{group: byte-weighted sparsity of the projections reading it} of one layer at the plan's sparsity."""
    sparsity, skipped, total = role_sparsities(plan, layer, roles), {}, {}
    for role, (weight, _) in roles.items():
        group = GROUP_OF[role]
        skipped[group] = skipped.get(group, 0.0) + sparsity[role] * weight.numel()
        total[group] = total.get(group, 0) + weight.numel()
    return {group: skipped[group] / total[group] for group in layer_groups(roles)}


def threshold_runtime(plan, layer, weighted: bool, phase=None):
    kernel_only = plan.control == "kernel"  # the kernels at threshold -inf: every channel read, none skipped
    if plan.leaves_dense:
        return None
    roles = {role: weight_bias for role, weight_bias in role_weights(layer).items()
             if plan.has(f"quantiles.{role}", layer.index)}
    if not roles:  # no input was calibrated (e.g. x from an atlas alone): the layer stays dense
        return None
    sparsity = {role: 0.0 for role in roles} if kernel_only else role_sparsities(plan, layer.index, roles)
    counts = phase.kernel_calls if phase is not None else Counter()
    modules = layer_roles(layer) | getattr(layer, "attention", {})
    groups = {}
    for group in layer_groups(roles):
        members = {role: roles[role] for role in roles if GROUP_OF[role] == group}
        thresholds = {role: threshold_at(plan.tensor(f"quantiles.{role}", layer.index), sparsity[role]) for role in members}
        scales = {role: column_norms(w).to(w.dtype) if weighted else None for role, (w, _) in members.items()}
        random = {role: sparsity[role] if plan.control == "random" else None for role in members}
        built = build_group(members, thresholds, scales, random, {role: sparsity[role] for role in members}, counts)
        groups |= {role: built for role in members}
    return ThresholdRuntime(groups, {role: modules[role] for role in roles}, phase if dense_prefill(plan) else None)


def dense_prefill(plan) -> bool:
    """Whether a prompt's own tokens run dense (``prefill="dense"``; plans made before the option: sparse)."""
    return plan.options.get("prefill", "sparse") == "dense"


# ---- calibration --------------------------------------------------------------------------------


def threshold_tables(layers: list[SparseLayer], atlas, sample: CalibrationSample | None, weighted: bool,
                     scope: str = "mlp") -> dict[str, torch.Tensor]:
    """{"quantiles.<role>.<layer>": (QUANTILE_POINTS,)} of each projection's input score (WINA's if ``weighted``).

    From the calibration sample's inputs (N, in) when there is one, else from the atlas's
    histograms of z (``down`` only: the other projections stay dense).
    """
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        of_input = {}  # TEAL: the roles reading one input score it alike, so one table (one threshold, one mask)
        for role, (weight, _) in role_weights(layer, scope).items():
            scale = column_norms(weight).cpu() if weighted else None
            key = f"quantiles.{role}.{layer.index}"
            group = GROUP_OF[role]
            if sample is not None and not weighted and group in of_input:
                # the same table, not a second subsample of the same scores: thresholds apart by a subsample's
                # noise gave q, k and v (gate, up) a mask apiece, so three kernel calls a decode step, not one
                tensors[key] = of_input[group].clone()
            elif sample is not None:
                values = sample.inputs(group, layer.index).abs()
                scores = (values * scale if weighted else values).reshape(-1)
                if scores.numel() > MAX_QUANTILE_SAMPLE:
                    scores = scores[torch.randint(scores.numel(), (MAX_QUANTILE_SAMPLE,), generator=generator)]
                tensors[key] = of_input[group] = quantile_table(scores)
            elif role == "down":
                tensors[key] = atlas_score_quantiles(atlas, layer.index, scale, QUANTILE_POINTS)
    return tensors


def scored_positions(real: torch.Tensor, last: float) -> torch.Tensor:
    """(B, T) bool: the last ``last`` share (at least one) of each sequence's real tokens, (B, T) ``real``."""
    rank = real.long().cumsum(1)  # 1..n_b over each row's real tokens
    count = real.sum(1, keepdim=True)  # (B, 1)
    first = count - (count * last).ceil().clamp(min=1).long()
    return real & (rank > first)


def block_error(difference: torch.Tensor, scored: torch.Tensor, measure: str) -> tuple[float, int]:
    """(summed error, items) of one call's output difference (B, T, d_model) over ``scored`` (B, T).

    ``squared``: squared error summed over the scored tokens (items: tokens). ``channel``: as the
    released TEAL code, the L2 norm over positions per (sequence, channel), summed (items: B x d_model).
    """
    difference = difference.float() * scored[..., None]
    if measure == "squared":
        return float(difference.pow(2).sum()), int(scored.sum())
    rows = scored.any(1)  # sequences with a scored token
    return float(difference[rows].norm(dim=1).sum()), int(rows.sum()) * difference.shape[-1]


@torch.inference_mode()
def replay_error(layer: SparseLayer, calls, masks: dict, measure: str = "squared", last: float = 1.0,
                 dense_first: bool = False) -> float:
    """The block's output error over the recorded calls (mean of :func:`block_error`) with ``masks``
    (role -> fn(x) -> keep mask) applied to the projections' inputs, on the last ``last`` of each sequence;
    ``dense_first``: the masks apply to the last half of each sequence only (prefill "dense")."""
    modules = layer_roles(layer) | layer.attention
    masked_at: list[torch.Tensor | None] = [None]  # (B, T, 1) bool: the current call's thresholded tokens

    def masked(args, keep):
        x, kept = args[0], keep(args[0])
        if masked_at[0] is not None:
            kept = torch.where(masked_at[0], kept, torch.ones_like(kept))
        return (x * kept, *args[1:])

    handles = [modules[role].register_forward_pre_hook(lambda _, args, keep=keep: masked(args, keep))
               for role, keep in masks.items()]
    total, count = 0.0, 0
    try:
        for call in calls:
            masked_at[0] = scored_positions(call.real, DENSE_SHARE)[..., None] if dense_first else None
            out = layer.block(*call.args, **call.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            error, items = block_error(hidden - call.output, scored_positions(call.real, last), measure)
            total, count = total + error, count + items
    finally:
        for handle in handles:
            handle.remove()
    return total / max(count, 1)


def greedy_tables(layers: list[SparseLayer], sample: CalibrationSample, quantiles: dict, weighted: bool,
                  options) -> dict[str, torch.Tensor]:
    """{"allocation.<layer>": (S, U)} TEAL's greedy path of every layer, on the sample's recorded block calls
    (a progress bar on a terminal: seconds to minutes per layer on a CPU)."""
    tensors = {}
    bar_off = None if options.progress else True  # None: on a terminal only
    for layer in tqdm(layers, desc="greedy allocation", unit="layer", disable=bar_off, dynamic_ncols=True):
        roles = {role: wb for role, wb in role_weights(layer, options.scope).items()
                 if f"quantiles.{role}.{layer.index}" in quantiles}
        units = unit_order(roles, options.greedy_units)
        keeps = {role: _keeper(quantiles[f"quantiles.{role}.{layer.index}"], column_norms(w).to(w.dtype) if weighted else None)
                 for role, (w, _) in roles.items()}

        def error(state: torch.Tensor, roles=roles, units=units, keeps=keeps, layer=layer) -> float:
            masks = {role: keeps[role](float(state[units.index(unit_of(role, options.greedy_units))])) for role in roles}
            return replay_error(layer, sample.blocks[layer.index], masks, options.greedy_error, options.greedy_last,
                                dense_first=options.prefill == "dense")

        weights = {role: weight for role, (weight, _) in role_weights(layer, "all").items()}
        sizes = unit_sizes({role: weights[role] for role in roles}, units, options.greedy_units)
        reference = float(weights["o"].numel()) if "o" in weights else None  # TEAL's base step is q's (= o's) size
        tensors[f"allocation.{layer.index}"] = greedy_path(error, sizes, options.greedy_step, options.greedy_top,
                                                           reference, options.greedy_search)
    return tensors


def _keeper(quantiles: torch.Tensor, scale: torch.Tensor | None):
    """sparsity -> keep-mask function of one projection's input, thresholded on its calibration quantiles."""
    return lambda sparsity: _keep(threshold_at(quantiles, sparsity), scale)


def _keep(threshold: float, scale: torch.Tensor | None):
    def keep(x: torch.Tensor) -> torch.Tensor:
        score = x.abs() if scale is None else x.abs() * scale
        return (score > threshold).to(x.dtype)

    return keep


def build_tables(neurons, options, atlas, sample, weighted: bool) -> dict[str, torch.Tensor]:
    """Quantile tables of the scope's projections, and the greedy paths when asked for."""
    layers = sparse_layers(neurons.model)
    if options.scope == "all":
        check_attention(layers, neurons.model_type)
    tensors = threshold_tables(layers, atlas, sample, weighted, options.scope)
    if options.allocation == "greedy":
        tensors |= greedy_tables(layers, sample, tensors, weighted, options)
    return tensors


def check_options(method: str, options, atlas, corpus) -> None:
    if options.scope not in SCOPES:
        raise NeuronAtlasError(f"unknown scope {options.scope!r}; use one of {', '.join(SCOPES)}")
    if options.allocation not in ALLOCATIONS:
        raise NeuronAtlasError(f"unknown allocation {options.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if not 0 < options.greedy_step <= 0.5 or not 0 < options.greedy_top < 1 or not 0 < options.greedy_last <= 1:
        raise NeuronAtlasError(f"greedy_step must be in (0, 0.5], greedy_top in (0, 1) and greedy_last in (0, 1], not "
                               f"{options.greedy_step}, {options.greedy_top} and {options.greedy_last}")
    for name, value, choices in (("greedy_units", options.greedy_units, UNITS + (AUTO,)),
                                 ("greedy_search", options.greedy_search, SEARCHES + (AUTO,)),
                                 ("greedy_error", options.greedy_error, ERRORS),
                                 ("prefill", options.prefill, PREFILLS)):
        if value not in choices:
            raise NeuronAtlasError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")
    if atlas is None and corpus is None:
        raise NeuronAtlasError(f"{method} calibrates its thresholds from an atlas or a corpus: pass --atlas ATLAS or --corpus FILE")
    if corpus is None and (options.scope == "all" or options.allocation == "greedy"):
        raise NeuronAtlasError(f"{method} --scope {options.scope} --allocation {options.allocation} calibrates on "
                               "activations: pass --corpus FILE (an atlas only has the FFN's z)")


def calibration(options) -> dict:
    """What the calibration pass records for these options: attention inputs, block calls for greedy."""
    return {"attention": options.scope == "all",
            "block_tokens": options.greedy_tokens if options.allocation == "greedy" else 0}


def build(neurons, options, atlas, sample, plan) -> dict[str, torch.Tensor]:
    return build_tables(neurons, options, atlas, sample, weighted=False)


def check(options, atlas, corpus) -> None:
    check_options("teal", options, atlas, corpus)


def runtime(plan, layer, phase):
    return threshold_runtime(plan, layer, weighted=False, phase=phase)


METHOD = SparseMethod("teal", build, runtime, options=OPTIONS, check=check, uses_corpus=always, calibration=calibration)
