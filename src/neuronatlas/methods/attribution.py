"""Gradient attribution per label (as "Neuron-Level Analysis of Cultural Understanding", CULNIG).

The target of a window of text is its own next tokens: the metric of a window is the mean over its
predicted tokens of log P(next token) (``target="logprob"``) or of P(next token) (``"prob"``).

1. Per window and neuron, a_t * dmetric/da_t at every real position t (a = z, the input of the
   FFN output projection), pooled over positions: ``pool="max"`` (CULNIG's max_t), ``"mean"`` or
   ``"sum"``.
2. Per label: the mean of the pooled scores over the label's windows.
3. Minus a control score: the mean over a control corpus (``control=``), or by default the mean of
   the other labels' scores; with ``clamp_control`` (default) a negative control counts as 0, so a
   neuron is not rewarded for hurting the control text.
4. Per label, keep the ``top_rate`` (0.01) of all neurons with the highest positive score. Neurons
   of an ``exclude`` set (e.g. the top neurons of a general control task) are never kept.

score = the label's attribution minus the control. A neuron may be kept for several labels.
Check: ablate each label's neurons with :func:`neuronatlas.evaluate.evaluate`: its own label's
NLL should rise most.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..corpus import Corpus, iter_batches, iter_windows, read_corpus
from ..errors import NeuronAtlasError
from ..hooks import forward_batch, pad_token_id
from ..loading import model_fingerprint, window_length
from ..models import check_causal, locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import layer_of, model_block
from .gradients import as_sequences, at_least_float32, flat_scores, track_neurons
from .nulls import NullOptions, null_block, pooled_p, q_values, shuffled_labels, supported_labels
from .nulls import best as nulls_best

TARGETS = ("logprob", "prob")
POOLS = ("max", "mean", "sum")


def _window_metric(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, target: str) -> torch.Tensor:
    """Sum over windows of the mean (log-)probability of each window's next tokens; logits (B, T, V)."""
    logp = F.log_softmax(at_least_float32(logits[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    values = logp if target == "logprob" else logp.exp()
    real = (mask[:, 1:] * mask[:, :-1]).float()
    return ((values * real).sum(1) / real.sum(1).clamp(min=1)).sum()


def _pool(product: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool a * grad (B, T, d_ff) over the real positions: (B, d_ff)."""
    real = mask.bool()[..., None]  # (B, T, 1)
    if pool == "max":
        return product.masked_fill(~real, float("-inf")).amax(1)
    total = product.masked_fill(~real, 0).sum(1)
    return total if pool == "sum" else total / mask.sum(1, keepdim=True).clamp(min=1)


def corpus_attributions(model, tokenizer, corpus: Corpus, target: str = "logprob", pool: str = "max",
                        max_docs_per_label: int | None = None, max_length: int | None = None, batch_size: int = 8,
                        quiet: bool = True, documents: dict | None = None) -> tuple[dict, dict]:
    """({label: (N,) mean pooled attribution over its windows}, {label: windows}); an unlabelled
    corpus gives the single label None. ``documents``, when given, is filled with {doc: [label,
    windows, (N,) float32 sum of its windows' pooled attributions]} (for the permutation null)."""
    neurons = locate_neurons(model)
    device = next(model.parameters()).device
    windows = _windows(corpus, tokenizer, max_docs_per_label, window_length(model.config, max_length))
    pad = pad_token_id(tokenizer)
    sums: dict = {}
    counts: dict = {}
    progress = None if quiet else _progress(sum(len(rows) for rows in windows.values()))
    for label, rows in windows.items():
        for batch in iter_batches(rows, batch_size, pad, "right"):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            with torch.enable_grad(), track_neurons(neurons) as record:
                logits = forward_batch(model, ids, mask).logits
                grads = record.gradients(_window_metric(logits, ids, mask, target))
            length = ids.shape[1]
            pooled = {layer: _pool(as_sequences(record.activations[layer] * grads[layer], length), mask, pool)
                      .double().sum(0).cpu() for layer in grads}
            flat = flat_scores(pooled, neurons.widths)
            sums[label] = sums.get(label, 0) + flat
            if documents is not None:
                _add_documents(documents, batch.windows, label, length, mask, record.activations, grads, pool,
                               neurons.widths)
            counts[label] = counts.get(label, 0) + len(batch.windows)
            if progress is not None:
                progress.update(len(batch.windows))
    if progress is not None:
        progress.close()
    return {label: sums[label] / counts[label] for label in sums}, counts


def _add_documents(documents: dict, windows, label, length, mask, activations, grads, pool, widths) -> None:
    """Add each window's pooled attribution (N,) to its document's sum."""
    rows = torch.cat([_pool(as_sequences(activations[layer] * grads[layer], length), mask, pool).float().cpu()
                      if layer in grads else torch.zeros((len(windows), width))
                      for layer, width in enumerate(widths)], 1)  # (B, N)
    for window, row in zip(windows, rows):
        entry = documents.setdefault(window.doc, [label, 0, torch.zeros(row.shape[0])])
        entry[1] += 1
        entry[2] += row


def label_differences(sums: torch.Tensor, windows: torch.Tensor, doc_labels: list, labels: list,
                      reference: torch.Tensor | None, clamp: bool) -> dict:
    """{label: (N,) mean attribution over its documents' windows minus the control}; sums (D, N),
    windows (D,) per document. The same numbers as :func:`find_attribution`'s scores."""
    present = sorted(set(doc_labels), key=str)
    one_hot = torch.tensor([[x == label for x in doc_labels] for label in present], dtype=torch.float64)  # (K, D)
    means = (one_hot @ sums.double()) / (one_hot @ windows.double())[:, None]
    scores = dict(zip(present, means))
    controls = _control_scores(scores, reference, clamp)
    return {label: scores[label] - controls[label] for label in labels}


def attribution_null(documents: dict, labels: list, reference, clamp: bool, options: NullOptions,
                     asked=()) -> dict:
    """{"q": {label: (N,) q}, "block"}: the label-minus-control scores again with the documents'
    labels shuffled (control corpus fixed); pooled standardised p, BH q over all pairs. Labels with
    fewer than ``min_docs`` documents are left out (no q), or refused when ``asked`` names them."""
    docs = sorted(documents)
    doc_labels = [documents[d][0] for d in docs]
    labels, refused = supported_labels({label: doc_labels.count(label) for label in labels}, options.min_docs,
                                       asked=asked, total=len(doc_labels))
    sums = torch.stack([documents[d][2] for d in docs])  # (D, N) float32
    windows = torch.tensor([documents[d][1] for d in docs])
    real = label_differences(sums, windows, doc_labels, labels, reference, clamp)
    generator = np.random.default_rng(options.seed)
    permutations = options.count(10)
    null = [label_differences(sums, windows, shuffled_labels(doc_labels, None, generator), labels, reference, clamp)
            for _ in range(permutations)]
    p, per_label = {}, {}
    for label in labels:
        stack = torch.stack([entry[label] for entry in null])  # (P, N)
        p[label] = pooled_p(real[label], stack)
        per_label[label] = {"best": nulls_best(real[label]), "null_best": nulls_best(stack.flatten()), "chance": 0.0}
    block = null_block("attribution", "the documents' labels (attributions computed once, re-averaged per shuffle)",
                       permutations, options, per_label, refused=refused)
    return {"q": q_values(p), "block": block}


def _windows(corpus: Corpus, tokenizer, max_docs: int | None, max_length: int) -> dict:
    """{label: [Window]} with at least two tokens each, at most ``max_docs`` documents per label."""
    taken: dict = {}
    chosen = []
    for doc in corpus:
        if max_docs is None or taken.get(doc.label, 0) < max_docs:
            chosen.append(doc)
            taken[doc.label] = taken.get(doc.label, 0) + 1
    out: dict = {}
    for window in iter_windows(chosen, tokenizer, max_length):
        if len(window.input_ids) >= 2:
            out.setdefault(window.label, []).append(window)
    if not out:
        raise NeuronAtlasError(f"corpus {corpus.path} has no text of at least two tokens to attribute")
    return dict(sorted(out.items(), key=lambda item: str(item[0])))


def _check_options(target, pool, top_rate, batch_size, max_docs) -> None:
    if target not in TARGETS:
        raise NeuronAtlasError(f"unknown target {target!r}; use logprob or prob")
    if pool not in POOLS:
        raise NeuronAtlasError(f"unknown pool {pool!r}; use max, mean or sum")
    if not 0 < top_rate <= 1:
        raise NeuronAtlasError(f"top rate must be in (0, 1] (got {top_rate}); 0.01 keeps 1% of all neurons per label")
    if batch_size < 1:
        raise NeuronAtlasError(f"batch size must be at least 1 (got {batch_size})")
    if max_docs is not None and max_docs < 1:
        raise NeuronAtlasError(f"max docs per label must be at least 1 (got {max_docs})")


def _labelled(corpus, text_field: str, label_field: str | None) -> Corpus:
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, text_field=text_field, label_field=label_field)
    if corpus.label_field is None and not corpus.label_from_folder:
        raise NeuronAtlasError(f"attribution needs labelled documents, but corpus {corpus.path} is read without "
                               "labels; pass label_field / --label-field (e.g. lang)")
    return corpus


def _control_scores(scores: dict, control: dict | None, clamp: bool) -> dict:
    """{label: (N,) control score}: the control corpus's, or the mean of the other labels'."""
    out = {}
    for label in scores:
        if control is not None:
            reference = control
        else:
            others = [scores[other] for other in scores if other != label]
            reference = torch.stack(others).mean(0)
        out[label] = reference.clamp(min=0) if clamp else reference
    return out


def _excluded(exclude: NeuronSet | None, model, widths: list[int]) -> torch.Tensor:
    """(N,) bool: neurons of ``exclude`` (checked against the model)."""
    mask = torch.zeros(sum(widths), dtype=torch.bool)
    if exclude is None:
        return mask
    exclude.check_model(model_fingerprint(model), widths)
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    for neuron in exclude.neurons:
        mask[offsets[neuron.layer] + neuron.index] = True
    return mask


def find_attribution(model, tokenizer, corpus: str | Path | Corpus, *, label_field: str | None = None,
                     text_field: str = "text", control: str | Path | Corpus | None = None,
                     labels: list[str] | None = None, top_rate: float = 0.01, target: str = "logprob",
                     pool: str = "max", clamp_control: bool = True, exclude: NeuronSet | None = None,
                     max_docs_per_label: int | None = None, max_length: int | None = None, batch_size: int = 8,
                     quiet: bool = True, null: NullOptions | None = None) -> NeuronSet:
    """Per-label neurons by activation x gradient on the label's text minus a control; see the module docstring.

    >>> found = find_attribution(model, tokenizer, "train.jsonl", label_field="lang", top_rate=0.02)  # doctest: +SKIP
    """
    max_length = window_length(model.config, max_length)
    _check_options(target, pool, top_rate, batch_size, max_docs_per_label)
    check_causal(model.config, "find attribution", needs="the probability of each next token")
    corpus = _labelled(corpus, text_field, label_field)
    widths = locate_neurons(model).widths
    blocked = _excluded(exclude, model, widths)
    present = sorted({doc.label for doc in corpus if doc.label is not None})
    chosen = present if labels is None else list(labels)
    unknown = [label for label in chosen if label not in present]
    if unknown or not chosen:
        raise NeuronAtlasError(f"unknown label(s) {', '.join(map(repr, unknown)) or 'none given'}; corpus {corpus.path} "
                               f"has: {', '.join(present) or 'no labelled documents'}")
    if control is None and len(present) < 2:
        raise NeuronAtlasError(f"corpus {corpus.path} has only the label {present[0]!r}: give a control corpus "
                               "(control= / --control) or text of at least two labels")
    if null is not None:  # refused before the attribution pass where the corpus alone is too small
        counts = Counter(doc.label for doc in corpus if doc.label in chosen)
        supported_labels({label: min(counts[label], max_docs_per_label or counts[label]) for label in chosen},
                         null.min_docs, asked=labels or ())
    control_corpus = None
    if control is not None:
        control_corpus = control if isinstance(control, Corpus) else read_corpus(control, text_field=text_field)
    options = dict(target=target, pool=pool, max_docs_per_label=max_docs_per_label, max_length=max_length,
                   batch_size=batch_size, quiet=quiet)
    documents = {} if null is not None else None
    scores, windows = corpus_attributions(model, tokenizer, corpus, documents=documents, **options)
    scores.pop(None, None)  # unlabelled documents of a labelled corpus
    empty = [label for label in present if label not in scores]
    if empty:
        raise NeuronAtlasError(f"label(s) {', '.join(map(repr, empty))} of corpus {corpus.path} have no text of at "
                               "least two tokens; add text or leave those documents out")
    reference = None
    if control_corpus is not None:
        control_scores, _ = corpus_attributions(model, tokenizer, control_corpus, **options)
        reference = torch.stack(list(control_scores.values())).mean(0)
    controls = _control_scores(scores, reference, clamp_control)
    tested = None
    if null is not None:
        labelled = {doc: entry for doc, entry in documents.items() if entry[0] is not None}
        tested = attribution_null(labelled, chosen, reference, clamp_control, null, asked=labels or ())
        chosen = [label for label in chosen if label in tested["q"]]
    keep = max(int(round(top_rate * sum(widths))), 1)
    locate = layer_of(widths)
    found = []
    for label in chosen:
        score = (scores[label] - controls[label]).masked_fill(blocked, float("-inf"))
        if tested is not None:  # only neurons the null supports compete for the top rate
            score = score.masked_fill(tested["q"][label] >= null.fdr, float("-inf"))
        top = torch.argsort(score, descending=True, stable=True)[:keep]
        top = top[score[top] > 0]
        layer_ids, indices = locate(top)
        q = [None] * len(top) if tested is None else tested["q"][label][top].tolist()
        found += [Neuron(int(l), int(i), float(score[k]), label, qk) for l, i, k, qk in zip(layer_ids, indices, top, q)]
    found.sort(key=lambda n: (n.layer, n.index, n.label))
    params = {"target": target, "pool": pool, "top_rate": top_rate, "clamp_control": clamp_control,
              "control": str(getattr(control, "path", control)) if control is not None else "other labels",
              "labels": chosen, "windows": {str(k): v for k, v in windows.items()}, "max_length": max_length,
              "excluded": int(blocked.sum()), "score": "label attribution minus control (higher = more the label's)"}
    return NeuronSet("attribution", model_block(model), found, params, "z",
                     None if tested is None else tested["block"], list(chosen))


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="window", desc="attribution", dynamic_ncols=True)
