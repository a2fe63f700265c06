"""Confidence regulation neurons (Stolfo et al. 2024): entropy neurons and token-frequency neurons.

Geometry, from the weights. The unembedding the residual stream meets is W_eff = W_U · diag(γ)
(V, d): the final norm's elementwise scale γ folded in. A LayerNorm also removes the mean over
d_model, so for LayerNorm models every w_out is centred first and the all-ones direction (which
cannot reach the logits) is left out of W_eff's row space.

* **Entropy neurons.** U_null = the ``null_dims`` right singular vectors of W_eff with the smallest
  singular values (default: 1% of d_model, at least 1): the unembedding's effective null space.
  null share ρ = ‖U_nullᵀ w_out‖ / ‖w_out‖; LogitVar = Var_v cos(w_out, W_eff[v]). Candidates: the
  chosen layers (default: the last), ‖w_out‖ at or above the ``norm_quantile`` of its layer and
  LogitVar at or below the ``logit_var_quantile``; the ``top_k`` with the largest ρ (and ρ ≥
  ``min_null_share``) form the set, score = ρ. Such a neuron barely moves any logit directly; it
  changes the output's entropy by changing the residual stream's norm, hence the final norm's scale.
* **Token-frequency neurons.** u = log of the corpus's unigram distribution (add-``smoothing`` counts
  over the unembedding's vocabulary), minus its mean. score = cos(W_eff · w_out − its mean, u): a
  positive score pushes the output toward the unigram distribution. The ``top_k`` largest |score|
  (and |score| ≥ ``min_cosine``) of the chosen layers (default: the last) form the set.

Check (:func:`mean_ablation_effects`): each neuron alone is set to its mean activation over the
check corpus. *Total effect*: the change of the mean next-token loss and of the mean output entropy
with the model run as is. *Direct effect*: only the neuron's own write to the residual stream,
Δ = (mean − a) · w_out, read straight through the final norm with its scale frozen at the clean
value (LayerNorm still centres Δ) and the unembedding, with no later layer and no change of the
norm's scale. An entropy neuron has a total effect on entropy much larger than its direct effect.
For frequency neurons the check also reports the change of the output log-probabilities'
projection on the unit frequency direction û (> 0: toward the unigram distribution), the change of
KL(output ‖ unigram), and the loss change left when the logits' projection on û is frozen at its
clean value (what does not go through the frequency direction).

Per-neuron values are in ``params["details"]["layer:index"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NeuronAtlasError
from ..hooks import activation_module, before, capture_activations, forward_batch, pad_token_id
from ..loading import window_length
from ..models import check_causal, locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import model_block_for
from .vocab import norm_scale, unembedding


@dataclass
class Unembedding:
    """The map from the residual stream (after the final norm's statistics) to the logits."""

    weight: torch.Tensor  # (V, d) float64 W_U · diag(γ)
    centres: bool  # the final norm removes the mean over d_model (LayerNorm)

    def prepare(self, w_out: torch.Tensor) -> torch.Tensor:
        """Columns of w_out (d, D) as the norm sees them: centred for a LayerNorm; float64."""
        w_out = w_out.double()
        return w_out - w_out.mean(0, keepdim=True) if self.centres else w_out


def effective_unembedding(model) -> Unembedding:
    neurons = locate_neurons(model)
    weight = unembedding(model).double()
    scale = norm_scale(neurons)
    if scale is not None:
        weight = weight * scale.double().to(weight.device)
    return Unembedding(weight.cpu(), _centres(neurons.final_norm))


def _centres(norm) -> bool:
    return norm is not None and isinstance(norm, torch.nn.LayerNorm)


def null_space(unembed: Unembedding, dims: int) -> torch.Tensor:
    """(d, dims) orthonormal basis of the bottom singular directions of W_eff (the ones direction excluded)."""
    weight = unembed.weight
    d = weight.shape[1]
    basis = torch.eye(d, dtype=torch.float64)
    if unembed.centres:  # work in the (d - 1)-dim space orthogonal to the ones vector
        basis = torch.linalg.qr(torch.eye(d, dtype=torch.float64) - 1.0 / d).Q[:, : d - 1]
    if not 1 <= dims < basis.shape[1]:
        raise NeuronAtlasError(f"null dims must be in [1, {basis.shape[1] - 1}] for d_model {d} (got {dims})")
    _, _, vh = torch.linalg.svd(weight @ basis, full_matrices=False)  # vh (d', d'), singular values descending
    return basis @ vh[-dims:].T


def default_null_dims(model) -> int:
    """1% of d_model, at least 1 (Stolfo et al.)."""
    return max(1, round(0.01 * unembedding(model).shape[1]))


def entropy_statistics(model, layers: list[int] | None = None, null_dims: int | None = None) -> dict[int, dict]:
    """{layer: {"null_share", "logit_var", "norm": (D,) float64}} of the chosen layers (default: the last)."""
    neurons = locate_neurons(model)
    layers = _layers(neurons, layers)
    unembed = effective_unembedding(model)
    null = null_space(unembed, default_null_dims(model) if null_dims is None else null_dims)  # (d, k)
    rows = unembed.weight / unembed.weight.norm(dim=1, keepdim=True).clamp(min=1e-30)  # (V, d)
    out = {}
    for layer in layers:
        w_out = unembed.prepare(neurons.layers[layer].w_out().detach().cpu())  # (d, D)
        norm = w_out.norm(dim=0)
        cosines = rows @ (w_out / norm.clamp(min=1e-30))  # (V, D)
        out[layer] = {"null_share": (null.T @ w_out).norm(dim=0) / norm.clamp(min=1e-30),
                      "logit_var": cosines.var(0, unbiased=False), "norm": norm}
    return out


def unigram_direction(tokenizer, corpus, vocab_size: int, smoothing: float = 1.0,
                      max_docs: int | None = None) -> torch.Tensor:
    """(V,) float64 log unigram distribution of the corpus's tokens minus its mean (not normalised)."""
    if smoothing <= 0:
        raise NeuronAtlasError(f"smoothing must be positive (got {smoothing}); 1 adds one count to every token")
    counts = np.zeros(vocab_size, np.float64)
    for number, doc in enumerate(corpus):
        if max_docs is not None and number >= max_docs:
            break
        ids = np.asarray(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"], np.int64)
        np.add.at(counts, ids[ids < vocab_size], 1.0)
    if counts.sum() == 0:
        raise NeuronAtlasError(f"corpus {corpus.path} gave no tokens to count; give a corpus with text")
    log_p = np.log((counts + smoothing) / (counts + smoothing).sum())
    return torch.from_numpy(log_p - log_p.mean())


def frequency_scores(model, direction: torch.Tensor, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """{layer: (D,) float64 cos(W_eff · w_out − its mean, u)} of the chosen layers (default: the last)."""
    neurons = locate_neurons(model)
    unembed = effective_unembedding(model)
    if direction.shape[0] != unembed.weight.shape[0]:
        raise NeuronAtlasError(f"the frequency direction has {direction.shape[0]} entries, the unembedding "
                               f"{unembed.weight.shape[0]} tokens; count the unigrams over the model's vocabulary")
    unit = direction / direction.norm().clamp(min=1e-30)
    out = {}
    for layer in _layers(neurons, layers):
        logits = unembed.weight @ unembed.prepare(neurons.layers[layer].w_out().detach().cpu())  # (V, D)
        logits = logits - logits.mean(0, keepdim=True)
        out[layer] = (unit @ logits) / logits.norm(dim=0).clamp(min=1e-30)
    return out


def _layers(neurons, layers: list[int] | None) -> list[int]:
    if layers is None:
        return [neurons.num_layers - 1]
    for layer in layers:
        if not 0 <= layer < neurons.num_layers:
            raise NeuronAtlasError(f"layer {layer} is out of range: the model has {neurons.num_layers} layers "
                                   f"(0-{neurons.num_layers - 1})")
    return sorted(set(layers))


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise NeuronAtlasError(f"{name} must be in [0, 1] (got {value})")


def find_entropy(model, layers: list[int] | None = None, null_dims: int | None = None, top_k: int = 10,
                 norm_quantile: float = 0.5, logit_var_quantile: float = 0.5, min_null_share: float = 0.0,
                 atlas_meta: dict | None = None) -> NeuronSet:
    """Entropy neurons by null-space share; see the module docstring for the definition."""
    if top_k < 1:
        raise NeuronAtlasError(f"top k must be at least 1 (got {top_k})")
    _check_fraction("norm quantile", norm_quantile)
    _check_fraction("logit variance quantile", logit_var_quantile)
    stats = entropy_statistics(model, layers, null_dims)
    candidates = []
    for layer, values in stats.items():
        keep = ((values["norm"] >= torch.quantile(values["norm"], norm_quantile))
                & (values["logit_var"] <= torch.quantile(values["logit_var"], logit_var_quantile))
                & (values["null_share"] >= min_null_share))
        candidates += [(float(values["null_share"][i]), layer, int(i)) for i in keep.nonzero().flatten()]
    chosen = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[:top_k]
    details = {f"{layer}:{index}": {name: float(stats[layer][name][index]) for name in ("null_share", "logit_var", "norm")}
               for _, layer, index in chosen}
    params = {"layers": sorted(stats), "null_dims": default_null_dims(model) if null_dims is None else null_dims,
              "top_k": top_k, "norm_quantile": norm_quantile, "logit_var_quantile": logit_var_quantile,
              "min_null_share": min_null_share, "candidates": len(candidates),
              "median_null_share": {str(layer): float(values["null_share"].median()) for layer, values in stats.items()},
              "score": "share of w_out in the unembedding's null space", "details": details}
    neurons = [Neuron(layer, index, score) for score, layer, index in chosen]
    return NeuronSet("entropy", model_block_for(model, atlas_meta), neurons, params)


def find_frequency(model, direction: torch.Tensor, layers: list[int] | None = None, top_k: int = 10,
                   min_cosine: float = 0.0, atlas_meta: dict | None = None) -> NeuronSet:
    """Token-frequency neurons by cosine with the unigram direction (from :func:`unigram_direction`)."""
    if top_k < 1:
        raise NeuronAtlasError(f"top k must be at least 1 (got {top_k})")
    _check_fraction("min cosine", min_cosine)
    scores = frequency_scores(model, direction, layers)
    candidates = [(float(values[i]), layer, int(i)) for layer, values in scores.items()
                  for i in (values.abs() >= min_cosine).nonzero().flatten()]
    chosen = sorted(candidates, key=lambda c: (-abs(c[0]), c[1], c[2]))[:top_k]
    params = {"layers": sorted(scores), "top_k": top_k, "min_cosine": min_cosine, "candidates": len(candidates),
              "score": "cos(W_U w_out, centred log unigram); > 0 pushes toward the unigram distribution",
              "details": {f"{layer}:{index}": {"cosine": score} for score, layer, index in chosen}}
    neurons = [Neuron(layer, index, score) for score, layer, index in chosen]
    return NeuronSet("frequency", model_block_for(model, atlas_meta), neurons, params)


# ---- the check: mean ablation, total vs direct effect ---------------------------------------------

_EFFECTS = ("loss", "entropy", "entropy_abs", "projection", "kl_unigram", "loss_frequency_frozen")


@torch.no_grad()
def mean_ablation_effects(model, tokenizer, corpus, neurons: list[tuple[int, int]],
                          direction: torch.Tensor | None = None, max_docs: int = 40, max_length: int | None = None,
                          batch_size: int = 8) -> dict:
    """Mean-ablate each neuron alone; total and direct effects averaged over next-token predictions.

    Returns {"tokens", "clean": {"loss", "entropy"[, "projection", "kl_unigram"]},
    "neurons": {"layer:index": {"mean_activation", "loss_total", "loss_direct", "entropy_total",
    "entropy_direct", "entropy_abs_total", "entropy_abs_direct", "entropy_direct_share", "loss_direct_share"
    [, "projection_total", "projection_slope", "kl_unigram_total", "loss_frequency_frozen"]}}}: changes
    (ablated − clean) averaged per token; entropy_abs = mean |change|; *_direct_share = |direct| / |total|
    (of entropy_abs for entropy); projection_slope = the per-token least-squares slope of the projection's
    change on the activation's change (mean − a): its sign says which way more activation moves the output.
    """
    check_causal(model.config, "the mean-ablation check", needs="next-token loss and entropy")
    site = locate_neurons(model)
    if not neurons:
        raise NeuronAtlasError("no neurons to check; the neuron set is empty")
    if site.final_norm is None:
        raise NeuronAtlasError(f"this {site.model_type} model has no final norm; the direct effect needs one")
    batches = _check_batches(tokenizer, corpus, max_docs, window_length(model.config, max_length), batch_size)
    means = _mean_activations(model, site, batches, neurons)
    readout = _Readout(model, site, direction)
    sums = {key: dict.fromkeys(_sum_keys(direction is not None), 0.0) for key in means}
    clean_sums, tokens = {}, 0
    for batch in batches:
        clean = readout.clean(batch, sorted({layer for layer, _ in neurons}))
        tokens += clean["count"]
        for name, value in clean["metrics"].items():
            clean_sums[name] = clean_sums.get(name, 0.0) + value
        for (layer, index), mean in means.items():
            _accumulate(sums[(layer, index)], readout.ablated(batch, clean, layer, index, mean))
    return _report(means, sums, clean_sums, tokens, direction is not None)


def _check_batches(tokenizer, corpus, max_docs: int, max_length: int, batch_size: int) -> list:
    from itertools import islice

    from ..corpus import iter_batches, iter_windows

    if max_docs < 1:
        raise NeuronAtlasError(f"check documents must be at least 1 (got {max_docs})")
    windows = [w for w in iter_windows(islice(corpus, max_docs), tokenizer, max_length) if len(w.input_ids) >= 2]
    if not windows:
        raise NeuronAtlasError(f"corpus {corpus.path} gave no window of two tokens or more to check on")
    return list(iter_batches(windows, batch_size, pad_token_id(tokenizer), "right"))


def _mean_activations(model, site, batches, neurons) -> dict[tuple[int, int], float]:
    wanted = sorted(set(neurons))
    sums, count = torch.zeros(len(wanted), dtype=torch.float64), 0
    device = next(model.parameters()).device
    for batch in batches:
        with capture_activations(site, batch.input_ids.shape) as captured:
            forward_batch(activation_module(model), batch.input_ids.to(device), batch.attention_mask.to(device))
        real = batch.attention_mask.bool().to(device)
        for number, (layer, index) in enumerate(wanted):
            sums[number] += float(captured[layer][..., index][real].double().sum())
        count += int(real.sum())
    return {key: float(sums[number]) / max(count, 1) for number, key in enumerate(wanted)}


def _sum_keys(frequency: bool) -> list[str]:
    keys = ["loss_total", "loss_direct", "entropy_total", "entropy_direct", "entropy_abs_total", "entropy_abs_direct"]
    frequency_keys = ["projection_total", "projection_moment", "activation_moment", "kl_unigram_total",
                      "loss_frequency_frozen"]
    return keys + (frequency_keys if frequency else [])


def _accumulate(into: dict, values: dict) -> None:
    for name, value in values.items():
        into[name] += value


def _report(means, sums, clean_sums, tokens, frequency: bool) -> dict:
    clean = {name: value / tokens for name, value in clean_sums.items() if name in ("loss", "entropy", "projection",
                                                                                       "kl_unigram")}
    out = {}
    for (layer, index), mean in means.items():
        info = {"mean_activation": mean}
        for name, value in sums[(layer, index)].items():
            info[name] = value / tokens
        info["loss_direct_share"] = _share(info["loss_direct"], info["loss_total"])
        info["entropy_direct_share"] = _share(info["entropy_abs_direct"], info["entropy_abs_total"])
        if frequency:  # least-squares slope of the projection's change on the activation's change, per token
            moment = info.pop("activation_moment")
            info["projection_slope"] = info.pop("projection_moment") / moment if moment > 0 else None
        out[f"{layer}:{index}"] = info
    return {"tokens": tokens, "clean": clean, "neurons": out, "frequency": frequency}


def _share(direct: float, total: float) -> float | None:
    return abs(direct) / abs(total) if total != 0 else None


class _Readout:
    """Clean forward passes, then each neuron's total effect (a real ablated run) and direct effect (linear)."""

    def __init__(self, model, site, direction: torch.Tensor | None):
        self.model, self.site = model, site
        self.device = next(model.parameters()).device
        self.w_unembed = unembedding(model).float()  # (V, d)
        scale = norm_scale(site)
        self.scale = None if scale is None else scale.float().to(self.device)
        self.centres = _centres(site.final_norm)
        self.eps = _norm_eps(site.final_norm)
        self.unit = self.log_unigram = None
        if direction is not None:
            centred = direction.float().to(self.device)
            self.unit = centred / centred.norm().clamp(min=1e-30)  # (V,)
            self.log_unigram = torch.log_softmax(centred, 0)  # the normalised log unigram distribution

    def clean(self, batch, layers: list[int]) -> dict:
        norm_input = {}

        def keep_norm_input(module, args) -> None:
            norm_input["x"] = args[0]

        with before(self.site.final_norm, keep_norm_input), \
                capture_activations(self.site, batch.input_ids.shape) as captured:
            logits = self._forward(batch)
        x = norm_input["x"].float()  # (B, T, d)
        centred = x - x.mean(-1, keepdim=True) if self.centres else x
        sigma = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, T, 1): the norm's frozen scale
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device).bool()
        real = mask[:, :-1] & mask[:, 1:]  # (B, T - 1) positions whose next token is real
        clean = {"logits": logits, "z": {l: captured[l] for l in layers}, "sigma": sigma, "targets": ids[:, 1:],
                 "real": real, "count": int(real.sum())}
        clean["per_token"] = self._per_token(logits, clean)
        clean["metrics"] = {name: float(values.double().sum()) for name, values in clean["per_token"].items()}
        return clean

    def ablated(self, batch, clean: dict, layer: int, index: int, mean: float) -> dict:
        from ..intervene import Intervention, intervene

        with intervene(self.model, [Intervention({layer: torch.tensor([index])}, "constant", value=mean)]):
            total = self._forward(batch)
        w_out = self.site.layers[layer].w_out()[:, index].detach().float().to(self.device)  # (d,)
        delta = (mean - clean["z"][layer][..., index].float())[..., None] * w_out  # (B, T, d)
        if self.centres:
            delta = delta - delta.mean(-1, keepdim=True)
        delta = delta / clean["sigma"]
        if self.scale is not None:
            delta = delta * self.scale
        direct = clean["logits"] + delta @ self.w_unembed.to(self.device).T
        base = clean["per_token"]
        after_total, after_direct = self._per_token(total, clean), self._per_token(direct, clean)
        out = {
            "loss_total": _sum(after_total["loss"] - base["loss"]),
            "loss_direct": _sum(after_direct["loss"] - base["loss"]),
            "entropy_total": _sum(after_total["entropy"] - base["entropy"]),
            "entropy_direct": _sum(after_direct["entropy"] - base["entropy"]),
            "entropy_abs_total": _sum((after_total["entropy"] - base["entropy"]).abs()),
            "entropy_abs_direct": _sum((after_direct["entropy"] - base["entropy"]).abs()),
        }
        if self.unit is not None:
            shift = ((total - clean["logits"]) @ self.unit)[..., None] * self.unit  # the change along u
            frozen = self._per_token(total - shift, clean)
            change = (mean - clean["z"][layer][..., index].float())[:, :-1][clean["real"]]  # (N,) activation change
            projection = after_total["projection"] - base["projection"]
            out["projection_total"] = _sum(projection)
            out["projection_moment"] = _sum(change * projection)
            out["activation_moment"] = _sum(change * change)
            out["kl_unigram_total"] = _sum(after_total["kl_unigram"] - base["kl_unigram"])
            out["loss_frequency_frozen"] = _sum(frozen["loss"] - base["loss"])
        return out

    def _forward(self, batch) -> torch.Tensor:
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        return forward_batch(self.model, ids, mask).logits.float()

    def _per_token(self, logits: torch.Tensor, clean: dict) -> dict[str, torch.Tensor]:
        """Per predicted token (N,): loss, entropy and, with a frequency direction, projection and KL to the unigram."""
        real = clean["real"]
        log_p = torch.log_softmax(logits[:, :-1][real], -1)  # (N, V)
        p = log_p.exp()
        out = {"loss": -log_p.gather(1, clean["targets"][real][:, None])[:, 0], "entropy": -(p * log_p).sum(-1)}
        if self.unit is not None:
            out["projection"] = log_p @ self.unit  # the unit vector is centred: constant shifts drop out
            out["kl_unigram"] = (p * (log_p - self.log_unigram)).sum(-1)
        return out


def _sum(values: torch.Tensor) -> float:
    return float(values.double().sum())


def _norm_eps(norm) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise NeuronAtlasError(f"cannot read the epsilon of the final norm {type(norm).__name__}; "
                           "the direct effect freezes its scale and needs it")
