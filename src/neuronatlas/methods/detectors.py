"""Token and n-gram detectors (Voita et al.): neurons whose firing a few trigger tokens explain.

Two stages:

1. **Candidates, from the atlas alone.** The trigger of an exemplar is the token at its position
   (``ngram=1``) or the pair (previous token in the window, token) (``ngram=2``; the first token of a
   window has no previous one). A neuron is a candidate when its top-k exemplars number at least
   ``min_exemplars`` and at most ``max_triggers`` distinct triggers cover at least ``coverage`` of
   them, counting only exemplars with a positive activation (z > the atlas threshold).
2. **Confirmation, with the model and a corpus.** On the first ``max_tokens`` tokens of the corpus
   (whole windows, cut as the profile cut them), the share of each candidate's activation variance
   that the current token (or bigram) explains (Gurnee et al. 2024):

       VR = [Var(a) − Σ_v π_v Var(a | token = v)] / Var(a)

   computed exactly from streamed per-token sums (float64). A detector needs VR ≥
   ``min_variance_explained``. Without a model and corpus, score = coverage.

   On a small sample VR is biased upwards: a token seen once explains its own activation fully.
   ``details`` also gives the adjusted value 1 − [within/(N − G)] / [total/(N − 1)] (G groups) and G.
   VR by the token says the neuron is a function of the current token, not that *its triggers*
   drive it; ``details["vr_triggers"]`` is the VR of the binary feature "the token is one of the
   triggers" (Gurnee et al.'s binary features), and ``feature="triggers"`` scores and filters by it.

With the model, each detector's value vector is also read through the unembedding: the trigger's
logit in W_U · w_out, as the share of the vocabulary with a lower logit ("trigger_logit_quantile");
``suppresses_trigger`` when the main trigger's share is below ``suppress_quantile`` (default 0.05):
the neuron pushes down the token that makes it fire (Voita et al.'s removal mechanism).

Per-neuron extras (triggers, coverage, VR, suppression) are in ``params["details"]["layer:index"]``.

The null (``null=``): the exemplars' tokens shuffled across all exemplars of the layer (seeded), the
coverage by the top ``max_triggers`` tokens recomputed; a candidate is kept when its coverage's
pooled standardised p gives q < fdr (Benjamini-Hochberg over every neuron with enough exemplars).
It asks: are the neuron's top exemplars concentrated on fewer tokens than random exemplars of the
layer would be (frequent tokens cover many exemplars by chance)?
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import NeuronAtlasError
from ..hooks import activation_module, capture, forward_batch, pad_token_id
from ..neuronset import Neuron, NeuronSet, model_info
from .nulls import NullOptions, null_block, pooled_p, q_values
from .nulls import best as nulls_best
from ..stats import split_uid
from ..tokens import token_texts

_PAIR = 1 << 32  # bigram key = (previous + 1) * _PAIR + token


def exemplar_triggers(atlas, ngram: int = 1, layers: list[int] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Per layer: "keys" (D, k) int64 trigger of each exemplar (−1 where empty), "values" (D, k) activations."""
    if ngram not in (1, 2):
        raise NeuronAtlasError(f"ngram must be 1 (token) or 2 (previous token, token); got {ngram}")
    if atlas.meta["options"].get("top_k", 0) < 1 or "top_uid.0" not in atlas.signals["z"].tensors:
        raise NeuronAtlasError("this atlas keeps no exemplars; profile again with --top-k 20 (or more)")
    if atlas.contexts is None:
        raise NeuronAtlasError("this atlas has no contexts.parquet (the exemplars' token ids); profile it again")
    seqs = np.asarray(atlas.contexts["seq"].to_numpy(), np.int64)
    token_lists = atlas.contexts["token_ids"].to_pylist()
    starts = np.concatenate([[0], np.cumsum([len(ids) for ids in token_lists])]).astype(np.int64)
    flat = np.asarray([i for ids in token_lists for i in ids], np.int64)
    order = np.argsort(seqs)
    out = {}
    for layer in range(atlas.num_layers) if layers is None else layers:
        uid = atlas.stat("top_uid", layer)
        values = atlas.stat("top_values", layer).float().numpy()
        seq, pos = (t.numpy() for t in split_uid(uid))
        filled = uid.numpy() >= 0
        where = np.searchsorted(seqs, seq, sorter=order).clip(max=len(seqs) - 1)
        row = order[where]
        found = filled & (seqs[row] == seq)
        at = starts[row] + pos
        keys = np.full(seq.shape, -1, np.int64)
        keys[found] = flat[at[found]]
        if ngram == 2:
            previous = np.full(seq.shape, -1, np.int64)
            has_previous = found & (pos > 0)
            previous[has_previous] = flat[at[has_previous] - 1]
            keys[found] = (previous[found] + 1) * _PAIR + keys[found]
        out[layer] = {"keys": keys, "values": np.where(filled, values, -np.inf)}
    return out


def trigger_candidates(atlas, ngram: int = 1, max_triggers: int = 3, coverage: float = 0.9,
                       min_exemplars: int = 5, layers: list[int] | None = None) -> dict[tuple[int, int], dict]:
    """{(layer, index): {"triggers": [(key, count), ...], "coverage": float, "exemplars": int}}."""
    threshold = float(atlas.meta["options"].get("threshold", 0.0))
    found = {}
    for layer, table in exemplar_triggers(atlas, ngram, layers).items():
        keys, values = table["keys"], table["values"]
        filled = np.isfinite(values).sum(1)
        for index in np.flatnonzero(filled >= min_exemplars).tolist():
            positive = keys[index][(values[index] > threshold) & (keys[index] >= 0)]
            counts = Counter(positive.tolist()).most_common(max_triggers)
            covered, triggers = 0, []
            for key, count in counts:
                triggers.append((key, count))
                covered += count
                if covered >= coverage * filled[index]:
                    break
            share = covered / filled[index]
            if share >= coverage and triggers:
                found[(layer, index)] = {"triggers": triggers, "coverage": float(share), "exemplars": int(filled[index])}
    return found


def top_coverage(keys: np.ndarray, positive: np.ndarray, filled: np.ndarray, max_triggers: int) -> np.ndarray:
    """(D,) share of each row's exemplars covered by its ``max_triggers`` most common positive keys.

    keys (D, k) int64, positive (D, k) bool (counted), filled (D,) exemplars per row.
    """
    marked = np.where(positive, keys, -1)
    ordered = np.sort(marked, axis=1)  # (D, k): equal keys side by side, -1 (not counted) first
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = np.cumsum(starts, axis=1) - 1  # (D, k) run index within the row
    counts = np.zeros(ordered.shape, np.int64)
    rows = np.repeat(np.arange(len(ordered)), ordered.shape[1])
    np.add.at(counts, (rows, group.ravel()), (ordered >= 0).ravel().astype(np.int64))
    top = -np.sort(-counts, axis=1)[:, :max_triggers].sum(1)
    return top / np.maximum(filled, 1)


def coverage_null(atlas, ngram: int, max_triggers: int, min_exemplars: int, layers, options: NullOptions) -> dict:
    """{"q": {(layer, index): q}, "block"}: each neuron's trigger coverage against the coverage of
    exemplars whose tokens are shuffled across all exemplars of its layer (seeded)."""
    threshold = float(atlas.meta["options"].get("threshold", 0.0))
    generator = np.random.default_rng(options.seed)
    permutations = options.count()
    reals, nulls, where = [], [], []
    for layer, table in exemplar_triggers(atlas, ngram, layers).items():
        keys, values = table["keys"], table["values"]
        filled = np.isfinite(values).sum(1)
        positive = (values > threshold) & (keys >= 0)
        eligible = filled >= min_exemplars
        reals.append(top_coverage(keys, positive, filled, max_triggers)[eligible])
        flat = keys[positive]
        layer_null = []
        for _ in range(permutations):
            shuffled = keys.copy()
            shuffled[positive] = generator.permutation(flat)
            layer_null.append(top_coverage(shuffled, positive, filled, max_triggers)[eligible])
        nulls.append(np.stack(layer_null) if layer_null else np.zeros((0, int(eligible.sum()))))
        where += [(layer, int(i)) for i in np.flatnonzero(eligible)]
    real = torch.from_numpy(np.concatenate(reals)).double()
    null = torch.from_numpy(np.concatenate(nulls, axis=1)).double()
    q = q_values({"all": pooled_p(real, null)})["all"]
    per_label = {"all": {"best": nulls_best(real), "null_best": nulls_best(null.flatten()), "chance": None}}
    block = null_block("tokens", "the trigger tokens among all exemplars of each layer (coverage by the top "
                       f"{max_triggers} tokens)", permutations, options, per_label)
    return {"q": dict(zip(where, q.tolist())), "block": block}


def find_token_detectors(atlas, model=None, tokenizer=None, corpus=None, max_triggers: int = 3,
                         coverage: float = 0.9, min_variance_explained: float = 0.5, ngram: int = 1,
                         max_tokens: int = 20_000, batch_size: int = 8, suppress_quantile: float = 0.05,
                         min_exemplars: int = 5, text_field: str = "text", label_field: str | None = None,
                         layers: list[int] | None = None, max_elements: int = 1 << 25,
                         feature: str = "token", null: NullOptions | None = None) -> NeuronSet:
    """Token (``ngram=1``) or bigram (``ngram=2``) detectors; see the module docstring.

    ``model``/``tokenizer``: the atlas's model, loaded (e.g. by :func:`neuronatlas.loading.load_model`);
    ``corpus``: a path or :class:`~neuronatlas.corpus.Corpus` to measure VR on. ``max_elements``
    bounds the per-token sums held at once (groups x candidates); beyond it candidates are measured
    in several passes over the same tokens. ``feature``: "token" scores by the VR of the current
    token (or bigram) identity, "triggers" by the VR of "the token is one of the neuron's triggers".
    """
    if feature not in ("token", "triggers"):
        raise NeuronAtlasError(f"unknown feature {feature!r}; use token (VR by the current token) or triggers")
    _check_arguments(max_triggers, coverage, min_variance_explained, max_tokens, suppress_quantile, min_exemplars)
    if corpus is not None and (model is None or tokenizer is None):
        raise NeuronAtlasError("measuring variance explained on a corpus needs the model and its tokenizer (--model)")
    if layers is not None:
        for layer in layers:
            if not 0 <= layer < atlas.num_layers:
                raise NeuronAtlasError(f"layer {layer} is out of range: the atlas has {atlas.num_layers} layers")
    if model is not None:
        from . import model_block_for

        model_block_for(model, atlas.meta)  # refuses a model other than the atlas's
    candidates = trigger_candidates(atlas, ngram, max_triggers, coverage, min_exemplars, layers)
    tested = coverage_null(atlas, ngram, max_triggers, min_exemplars, layers, null) if null is not None else None
    if tested is not None:
        candidates = {key: found for key, found in candidates.items() if tested["q"][key] < null.fdr}
    measured = {}
    if corpus is not None and candidates:
        triggers = {neuron: [key for key, _ in found["triggers"]] for neuron, found in candidates.items()}
        measured = variance_explained(atlas, model, tokenizer, corpus, sorted(candidates), ngram, max_tokens,
                                      batch_size, text_field, label_field, max_elements, triggers)
    suppression = {}
    if model is not None and candidates:
        suppression = _suppression(model, candidates, ngram, suppress_quantile)
    decode = _decoder(atlas, tokenizer)
    neurons, details = [], {}
    for (layer, index), found in sorted(candidates.items()):
        info = {
            "triggers": [{"ids": _ids(key, ngram), "text": [decode(i) for i in _ids(key, ngram)], "count": count}
                         for key, count in found["triggers"]],
            "coverage": found["coverage"], "exemplars": found["exemplars"],
        }
        score = found["coverage"]
        if measured:
            stats = measured[(layer, index)]
            info.update(stats)
            score = stats["vr"] if feature == "token" else stats["vr_triggers"]
            if score < min_variance_explained:
                continue
        if suppression:
            info.update(suppression[(layer, index)])
        neurons.append(Neuron(layer, index, float(score), None, None if tested is None else tested["q"][(layer, index)]))
        details[f"{layer}:{index}"] = info
    neurons.sort(key=lambda n: (-n.score, n.layer, n.index))
    params = {
        "ngram": ngram, "max_triggers": max_triggers, "coverage": coverage, "min_exemplars": min_exemplars,
        "min_variance_explained": min_variance_explained if measured else None,
        "max_tokens": max_tokens if measured else None, "suppress_quantile": suppress_quantile if model is not None else None,
        "layers": layers, "candidates": len(candidates), "feature": feature if measured else None,
        "tokens_measured": next(iter(measured.values()))["tokens"] if measured else 0,
        "score": ("share of the top exemplars covered by the triggers" if not measured
                  else "variance of z explained by the current " + ("token" if ngram == 1 else "bigram")
                  if feature == "token" else "variance of z explained by whether the token is a trigger"),
        "details": details,
    }
    return NeuronSet("token-detectors" if ngram == 1 else "bigram-detectors", model_info(atlas.meta), neurons, params,
                     "z", None if tested is None else tested["block"])


def _check_arguments(max_triggers, coverage, min_vr, max_tokens, suppress_quantile, min_exemplars) -> None:
    if max_triggers < 1:
        raise NeuronAtlasError(f"max triggers must be at least 1 (got {max_triggers})")
    if not 0 < coverage <= 1:
        raise NeuronAtlasError(f"coverage must be within (0, 1] (got {coverage})")
    if not 0 <= min_vr <= 1:
        raise NeuronAtlasError(f"min variance explained must be between 0 and 1 (got {min_vr})")
    if max_tokens < 2:
        raise NeuronAtlasError(f"max tokens must be at least 2 (got {max_tokens})")
    if not 0 < suppress_quantile < 1:
        raise NeuronAtlasError(f"suppress quantile must be between 0 and 1 (got {suppress_quantile})")
    if min_exemplars < 1:
        raise NeuronAtlasError(f"min exemplars must be at least 1 (got {min_exemplars})")


def _ids(key: int, ngram: int) -> list[int]:
    if ngram == 1:
        return [int(key)]
    previous, token = divmod(int(key), _PAIR)
    return [previous - 1, token] if previous > 0 else [token]


def _decoder(atlas, tokenizer):
    table = {}
    if atlas.vocab is not None:
        table = dict(zip(atlas.vocab["id"].to_pylist(), atlas.vocab["token"].to_pylist()))

    def decode(token_id: int) -> str | None:
        if token_id in table:
            return table[token_id]
        if tokenizer is not None:
            try:
                return token_texts(tokenizer, [token_id])[0]
            except Exception:  # an id the tokenizer cannot decode
                return None
        return None

    return decode


# ---- variance explained -------------------------------------------------------------------------


@torch.no_grad()
def variance_explained(atlas, model, tokenizer, corpus, neurons: list[tuple[int, int]], ngram: int = 1,
                       max_tokens: int = 20_000, batch_size: int = 8, text_field: str = "text",
                       label_field: str | None = None, max_elements: int = 1 << 25,
                       triggers: dict[tuple[int, int], list[int]] | None = None) -> dict[tuple[int, int], dict]:
    """VR of each (layer, index) by the current token (or bigram) on the corpus's first ``max_tokens`` tokens.

    Returns per neuron: vr, vr_adjusted, groups (distinct tokens or bigrams seen), tokens; with
    ``triggers`` (neuron -> trigger keys) also trigger_tokens, mean_on_triggers, mean_elsewhere and
    vr_triggers, the VR of the binary feature "the token is one of the triggers".
    """
    from ..corpus import Corpus, iter_batches, read_corpus
    from ..models import locate_neurons

    if not isinstance(corpus, Corpus):
        corpus = read_corpus(Path(corpus), text_field=text_field, label_field=label_field)
    windows, total = _first_windows(corpus, tokenizer, atlas.meta["options"].get("max_length") or 512, max_tokens)
    located = locate_neurons(model)
    base = activation_module(model)
    per_pass = max(1, max_elements // total)  # neurons per pass: (groups <= total tokens) x neurons accumulators
    results = {}
    for start in range(0, len(neurons), per_pass):
        sums = _GroupSums(neurons[start : start + per_pass], total, next(model.parameters()).device)
        for batch in iter_batches(iter(windows), batch_size, pad_token_id(tokenizer), "right"):
            sums.add(base, located, batch, ngram)
        results.update(sums.results(triggers))
    return results


def _first_windows(corpus, tokenizer, max_length: int, max_tokens: int) -> tuple[list, int]:
    """The corpus's first whole windows up to ``max_tokens`` tokens, and their token count."""
    from ..corpus import iter_windows

    windows, total = [], 0
    for window in iter_windows(corpus, tokenizer, max_length):
        windows.append(window)
        total += len(window.input_ids)
        if total >= max_tokens:
            break
    if total < 2:
        raise NeuronAtlasError(f"the corpus {corpus.path} gives {total} tokens; variance explained needs more text")
    return windows, total


class _GroupSums:
    """Streamed float64 sums of a chunk of neurons' z, per token group (token or bigram) and overall."""

    def __init__(self, chunk: list[tuple[int, int]], groups_bound: int, device: torch.device):
        columns: dict[int, list[int]] = {}
        for layer, index in chunk:
            columns.setdefault(layer, []).append(index)
        self.slot = {}  # (layer, index) -> column of the accumulators
        for layer, indices in columns.items():
            for index in indices:
                self.slot[(layer, index)] = len(self.slot)
        self.layer_slots = {layer: torch.tensor([self.slot[(layer, i)] for i in idx], device=device)
                            for layer, idx in columns.items()}
        self.layer_cols = {layer: torch.tensor(idx, device=device) for layer, idx in columns.items()}
        width = len(self.slot)
        self.device = device
        self.group_sum = torch.zeros((groups_bound, width), dtype=torch.float64, device=device)  # (G, W)
        self.group_count = torch.zeros(groups_bound, dtype=torch.float64, device=device)  # (G,)
        self.total_sum = torch.zeros(width, dtype=torch.float64, device=device)  # (W,)
        self.total_sq = torch.zeros(width, dtype=torch.float64, device=device)  # (W,)
        self.row_of: dict[int, int] = {}  # group key -> row of group_sum

    def add(self, base, located, batch, ngram: int) -> None:
        """Run one right-padded batch and add its real tokens' z to the sums."""
        device = self.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device).bool()
        B, T = mask.shape
        keys = ids
        if ngram == 2:
            previous = torch.cat([torch.full((B, 1), -1, device=device, dtype=ids.dtype), ids[:, :-1]], 1)
            keys = (previous + 1) * _PAIR + ids
        keys = keys[mask]
        unique, inverse = keys.unique(return_inverse=True)
        rows = torch.tensor([self.row_of.setdefault(int(k), len(self.row_of)) for k in unique.tolist()], device=device)
        token_rows = rows[inverse]  # (N,)
        self.group_count.index_add_(0, token_rows, torch.ones_like(token_rows, dtype=torch.float64))
        grabbed = torch.zeros((len(token_rows), len(self.slot)), dtype=torch.float64, device=device)  # (N, W)

        def on_z(layer: int, z: torch.Tensor) -> None:
            if layer in self.layer_cols:
                values = z.reshape(B, T, -1)[mask][:, self.layer_cols[layer]].double()
                grabbed[:, self.layer_slots[layer]] = values

        with capture(located, on_z):
            forward_batch(base, ids, mask)
        self.group_sum.index_add_(0, token_rows, grabbed)
        self.total_sum += grabbed.sum(0)
        self.total_sq += (grabbed * grabbed).sum(0)

    def results(self, triggers: dict | None) -> dict[tuple[int, int], dict]:
        """Per neuron of the chunk: VR, adjusted VR, groups and tokens (and the trigger feature's VR)."""
        groups = len(self.row_of)
        count = self.group_count[:groups]
        n = count.sum()
        overall = self.total_sum ** 2 / n
        total_ss = self.total_sq - overall
        between_ss = (self.group_sum[:groups] ** 2 / count[:, None]).sum(0) - overall
        within_ss = (total_ss - between_ss).clamp(min=0)
        varies = total_ss > 1e-12 * self.total_sq.abs().clamp(min=1e-300)
        safe = torch.where(varies, total_ss, torch.ones_like(total_ss))
        vr = torch.where(varies, (between_ss / safe).clamp(0, 1), torch.zeros_like(total_ss))
        adjusted = torch.where(varies, 1 - (within_ss / max(float(n) - groups, 1.0)) / (safe / max(float(n) - 1, 1.0)),
                               torch.zeros_like(total_ss))
        results = {}
        for neuron, column in self.slot.items():
            results[neuron] = {"vr": float(vr[column]), "vr_adjusted": float(adjusted[column]), "groups": groups,
                               "tokens": int(n)}
            if triggers is not None:
                total = float(safe[column]) if bool(varies[column]) else None
                results[neuron].update(self._trigger_feature(triggers.get(neuron, []), column, count, float(n), total))
        return results

    def _trigger_feature(self, keys: list[int], column: int, count: torch.Tensor, n_all: float,
                         total_ss: float | None) -> dict:
        """Means on and off the triggers and the VR of the binary feature "the token is a trigger"."""
        on_rows = torch.tensor([self.row_of[key] for key in keys if key in self.row_of], dtype=torch.long,
                               device=self.device)
        n_on = float(count[on_rows].sum())
        sum_on = float(self.group_sum[on_rows, column].sum())
        sum_all = float(self.total_sum[column])
        mean_on = sum_on / n_on if n_on else None
        mean_off = (sum_all - sum_on) / (n_all - n_on) if n_all > n_on else None
        # between-group / total sum of squares of the two groups
        between = sum(size * (mean - sum_all / n_all) ** 2
                      for size, mean in ((n_on, mean_on), (n_all - n_on, mean_off)) if size)
        return {"trigger_tokens": int(n_on), "mean_on_triggers": mean_on, "mean_elsewhere": mean_off,
                "vr_triggers": min(max(between / total_ss, 0.0), 1.0) if total_ss is not None else 0.0}


# ---- suppression of the trigger -----------------------------------------------------------------


@torch.no_grad()
def _suppression(model, candidates: dict, ngram: int, quantile: float) -> dict[tuple[int, int], dict]:
    from ..models import locate_neurons
    from .vocab import unembedding

    located = locate_neurons(model)
    w_unembed = unembedding(model).float()  # (V, d)
    out = {}
    by_layer: dict[int, list[int]] = {}
    for layer, index in candidates:
        by_layer.setdefault(layer, []).append(index)
    for layer, indices in by_layer.items():
        w_out = located.layers[layer].w_out().detach().float().to(w_unembed.device)[:, indices]  # (d, c)
        logits = (w_unembed @ w_out).T.cpu()  # (c, V)
        vocab = logits.shape[1]
        for column, index in enumerate(indices):
            row = logits[column]
            shares = []
            for key, _ in candidates[(layer, index)]["triggers"]:
                token = _ids(key, ngram)[-1]
                shares.append(float((row < row[token]).double().mean()) if 0 <= token < vocab else None)
            main = shares[0]
            out[(layer, index)] = {
                "trigger_logit_quantile": shares,
                "suppresses_trigger": bool(main is not None and main < quantile),
            }
    return out
