"""Attribution patching (AtP; Nanda 2023, Kramár et al. 2024 "AtP*") for every FFN neuron.

Input: pairs of prompts ``{"clean", "corrupt", "target", "foil"?}`` whose clean and corrupted
prompts have the same number of tokens. The metric L at the last position of the clean prompt is
the logit difference logit(target) - logit(foil) (``metric="logit_diff"``) or log P(target)
(``"logprob"``); target and foil are texts whose first token counts.

Per pair: one forward of the corrupted prompt (its activations), one forward and one backward of
the clean prompt, and for every neuron n

    c(n) = sum over positions t of (z_corrupt[t, n] - z_clean[t, n]) * dL/dz[t, n] at clean,

the first-order estimate of how much L changes when n is patched to its corrupted value at every
position. The estimates are averaged over pairs; the ``top_k`` (100) neurons by |mean c| form the
set (score = mean c, signed).

GradDrop (``graddrop=True``, from AtP*): L extra forward/backward passes, the l-th with the
gradient through block l's residual write set to zero (the write keeps its value); the score is
sum_l |c_l(n)| / (L - 1), averaged over pairs (unsigned).

``verify=N`` patches the N highest and N lowest scoring neurons for real (one forward per neuron
and pair, batched) and stores the Spearman correlation of estimate and real effect in the set's
params (``params["verify"]``); with GradDrop the real effect compared is |change|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NeuronAtlasError
from ..hooks import capture_activations
from ..models import ModelNeurons, check_causal, locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import layer_of, model_block
from .gradients import (at_least_float32, drop_block_gradient, first_token, flat_scores, patch_per_row, prompt_ids,
                        read_jsonl, track_neurons)

METRICS = ("logit_diff", "logprob")


@dataclass
class EncodedPair:
    clean: list[int]
    corrupt: list[int]
    target: int
    foil: int | None


def read_pairs(path) -> list[dict]:
    """Pair records from JSONL: {"clean", "corrupt", "target", "foil"?}."""
    return read_jsonl(path, ("clean", "corrupt", "target"), "pair")


def encode_pairs(tokenizer, pairs: list[dict], metric: str) -> list[EncodedPair]:
    if not pairs:
        raise NeuronAtlasError("no pairs given; pass records {clean, corrupt, target, foil?}")
    out = []
    for number, pair in enumerate(pairs, 1):
        where = f"pair {number}"
        clean = prompt_ids(tokenizer, pair["clean"], where)
        corrupt = prompt_ids(tokenizer, pair["corrupt"], where)
        if len(clean) != len(corrupt):
            raise NeuronAtlasError(
                f"{where}: the clean prompt has {len(clean)} tokens and the corrupted one {len(corrupt)}; "
                "patching needs prompts of the same token length"
            )
        foil = pair.get("foil")
        if metric == "logit_diff" and not isinstance(foil, str):
            raise NeuronAtlasError(f"{where} has no 'foil': metric logit_diff needs one per pair (or use --metric logprob)")
        target = first_token(tokenizer, pair["target"], where)
        out.append(EncodedPair(clean, corrupt, target, first_token(tokenizer, foil, where) if metric == "logit_diff" else None))
    return out


def pair_metric(logits: torch.Tensor, pair: EncodedPair) -> torch.Tensor:
    """L per row from logits (B, T, V): logit difference or log P(target) at the last position, (B,)."""
    last = at_least_float32(logits[:, -1])  # (B, V)
    if pair.foil is not None:
        return last[:, pair.target] - last[:, pair.foil]
    return torch.log_softmax(last, -1)[:, pair.target]


def _estimate(model, neurons: ModelNeurons, ids: torch.Tensor, corrupt: dict[int, torch.Tensor], pair) -> dict:
    """{layer: (d_ff,) float64} AtP estimates for one pair from one clean forward and backward."""
    with torch.enable_grad(), track_neurons(neurons) as record:
        metric = pair_metric(model(input_ids=ids, use_cache=False).logits, pair).sum()
        grads = record.gradients(metric)
    width = {layer: grads[layer].shape[-1] for layer in grads}
    return {layer: ((corrupt[layer] - record.activations[layer]) * grads[layer]).reshape(-1, width[layer]).sum(0)
            .double().cpu() for layer in grads}


def atp_pair(model, pair: EncodedPair, graddrop: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) AtP estimates of one pair (layers concatenated) and, with GradDrop, its (N,) GradDrop scores."""
    neurons = locate_neurons(model)
    device = next(model.parameters()).device
    with torch.inference_mode(), capture_activations(neurons) as corrupt:
        model(input_ids=torch.tensor([pair.corrupt], device=device), use_cache=False)
    corrupt = dict(corrupt)
    ids = torch.tensor([pair.clean], device=device)
    estimate = flat_scores(_estimate(model, neurons, ids, corrupt, pair), neurons.widths)
    if not graddrop:
        return estimate, None
    total = torch.zeros_like(estimate)
    for layer in range(neurons.num_layers):
        with drop_block_gradient(neurons, layer):
            total += flat_scores(_estimate(model, neurons, ids, corrupt, pair), neurons.widths).abs()
    return estimate, total / max(neurons.num_layers - 1, 1)


def patch_effects(model, pair: EncodedPair, chosen: list[tuple[int, int]], batch_size: int = 32) -> torch.Tensor:
    """Real activation patching: change of L when each chosen neuron takes its corrupted value, (n,)."""
    neurons = locate_neurons(model)
    device = next(model.parameters()).device
    with torch.inference_mode():
        with capture_activations(neurons) as corrupt:
            model(input_ids=torch.tensor([pair.corrupt], device=device), use_cache=False)
        corrupt = dict(corrupt)
        clean = torch.tensor([pair.clean], device=device)
        base = pair_metric(model(input_ids=clean, use_cache=False).logits, pair)  # (1,)
        out = []
        for start in range(0, len(chosen), batch_size):
            rows = chosen[start : start + batch_size]
            with patch_per_row(neurons, rows, corrupt):
                logits = model(input_ids=clean.expand(len(rows), -1), use_cache=False).logits
            out.append(pair_metric(logits, pair) - base)
    return torch.cat(out).double().cpu()


def _verify(model, pairs, key: torch.Tensor, count: int, widths: list[int], absolute: bool) -> dict:
    from scipy.stats import spearmanr

    order = torch.argsort(key, descending=True, stable=True)
    count = min(count, key.numel() // 2)
    picked = torch.cat([order[:count], order[-count:]])
    layers, indices = layer_of(widths)(picked)
    chosen = list(zip(layers.tolist(), indices.tolist()))
    effects = torch.stack([patch_effects(model, pair, chosen) for pair in pairs])  # (pairs, 2N)
    actual = (effects.abs() if absolute else effects).mean(0)
    rho, p_value = spearmanr(key[picked].numpy(), actual.numpy())
    return {"neurons": [list(item) for item in chosen], "estimate": key[picked].tolist(), "actual": actual.tolist(),
            "spearman": float(rho), "p_value": float(p_value), "compared": "|change|" if absolute else "change"}


def find_atp(model, tokenizer, pairs: list[dict], metric: str | None = None, top_k: int = 100,
             graddrop: bool = False, verify: int = 0, quiet: bool = True) -> NeuronSet:
    """The neurons that matter most for clean vs corrupted prompts, by attribution patching.

    ``metric``: "logit_diff" or "logprob" (default: logit_diff when every pair has a foil).

    >>> found = find_atp(model, tokenizer, read_pairs("pairs.jsonl"), verify=20)  # doctest: +SKIP
    >>> found.params["verify"]["spearman"]                                        # doctest: +SKIP
    """
    if metric is None:
        metric = "logit_diff" if pairs and all(isinstance(p.get("foil"), str) for p in pairs) else "logprob"
    if metric not in METRICS:
        raise NeuronAtlasError(f"unknown metric {metric!r}; use logit_diff or logprob")
    if top_k < 1:
        raise NeuronAtlasError(f"top k must be at least 1 (got {top_k})")
    if verify < 0:
        raise NeuronAtlasError(f"verify must be 0 (off) or a number of neurons (got {verify})")
    encoded = encode_pairs(tokenizer, pairs, metric)
    check_causal(model.config, "find atp", needs="the next token's logits after each prompt")
    widths = locate_neurons(model).widths
    estimates, dropped = [], []
    progress = None if quiet else _progress(len(encoded))
    for pair in encoded:
        estimate, graddrop_score = atp_pair(model, pair, graddrop)
        estimates.append(estimate)
        if graddrop_score is not None:
            dropped.append(graddrop_score)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    mean = torch.stack(estimates).mean(0)  # (N,)
    key = torch.stack(dropped).mean(0) if graddrop else mean
    rank = key if graddrop else mean.abs()
    kept = torch.argsort(rank, descending=True, stable=True)[: min(top_k, rank.numel())]
    layers, indices = layer_of(widths)(kept)
    found = [Neuron(int(l), int(i), float(key[k])) for l, i, k in zip(layers, indices, kept)]
    found.sort(key=lambda n: (n.layer, n.index))
    params = {"metric": metric, "top_k": top_k, "graddrop": graddrop, "pairs": len(encoded),
              "score": "GradDrop score sum_l |c_l| / (L-1), mean over pairs" if graddrop
              else "mean AtP estimate (z_corrupt - z_clean) . dL/dz over pairs (kept by |score|)"}
    if verify:
        params["verify"] = _verify(model, encoded, key, verify, widths, absolute=graddrop)
    return NeuronSet("atp", model_block(model), found, params)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pair", desc="attribution patching", dynamic_ncols=True)
