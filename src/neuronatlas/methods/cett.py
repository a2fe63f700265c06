"""CETT features and an L1 classifier for a binary label (as "H-Neurons", Gao et al. 2025).

1. Per token t and neuron j of a layer: CETT_j(t) = |z_j(t)| * ||W_out[:, j]|| / ||W_out z(t)||, the
   share of the FFN output that neuron j contributes (bias left out). Pooled per example over
   its answer tokens: ``pool="mean"`` (default) or ``"max"``. An example is either
   ``{"prompt", "answer"}`` (the answer's tokens count) or ``{"text"}`` (every token but the
   tokenizer's special ones counts), plus a label field.
2. The examples with the ``positive`` label against the others (or the ``negative`` label only):
   a stratified ``test_size`` (0.3) split; features standardised on the training part; an
   L1-regularised logistic regression (liblinear) with C chosen by cross-validated grid search
   over ``c_grid`` (or fixed by ``c``); accuracy and AUROC on the held-out part.
3. The neurons with a positive weight form the set (label = the positive label, score = the
   weight on the standardised feature).

The paper's intervention scales W_out[:, H] by alpha; since z_j only reaches the output through
W_out[:, j], this is ``Intervention(found, "scale", value=alpha)`` on signal z
(``neuronatlas intervene/evaluate --op scale --value ALPHA``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NeuronAtlasError
from ..hooks import capture_activations
from ..loading import window_length
from ..models import locate_neurons
from ..neuronset import Neuron, NeuronSet
from . import layer_of, model_block
from .gradients import read_jsonl
from .nulls import NullOptions, check_support, null_block

POOLS = ("mean", "max")
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def read_examples(path, label_field: str = "label") -> list[dict]:
    """Records from JSONL with a label and either "text" or "prompt" + "answer"."""
    records = read_jsonl(path, (), "example")
    for number, record in enumerate(records, 1):
        _check_example(record, label_field, f"{path}:{number}")
    return records


def _check_example(record: dict, label_field: str, where: str) -> None:
    if record.get(label_field) is None:
        raise NeuronAtlasError(f"{where} has no label field {label_field!r}; pass the field holding the label")
    has_text = isinstance(record.get("text"), str)
    has_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("answer"), str)
    if not has_text and not has_pair:
        raise NeuronAtlasError(f"{where} needs a 'text' field or 'prompt' and 'answer' fields")


def encode_example(tokenizer, record: dict, max_length: int) -> tuple[list[int], list[bool]]:
    """(ids, answer mask): the tokens and which of them are pooled, cut to ``max_length``."""
    if isinstance(record.get("prompt"), str) and isinstance(record.get("answer"), str):
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        answer = list(tokenizer(record["answer"], add_special_tokens=False)["input_ids"])
        ids, mask = prompt + answer, [False] * len(prompt) + [True] * len(answer)
    else:
        ids = list(tokenizer(record["text"], verbose=False)["input_ids"])  # cut below; no "longer than" warning
        special = set(tokenizer.all_special_ids)
        mask = [token not in special for token in ids]
    return ids[:max_length], mask[:max_length]


def cett(z: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """CETT of every neuron at every token: z (..., d_ff), w_out (d_model, d_ff) -> (..., d_ff)."""
    column_norms = w_out.norm(dim=0)  # (d_ff,)
    output_norms = (z @ w_out.T).norm(dim=-1, keepdim=True)  # (..., 1)
    return z.abs() * column_norms / output_norms.clamp(min=torch.finfo(z.dtype).tiny)


@torch.inference_mode()
def cett_features(model, tokenizer, records: list[dict], pool: str = "mean", max_length: int | None = None) -> np.ndarray:
    """(examples, N) float32: each example's CETT pooled over its answer tokens, layers concatenated."""
    if pool not in POOLS:
        raise NeuronAtlasError(f"unknown pool {pool!r}; use mean or max")
    neurons = locate_neurons(model)
    device = next(model.parameters()).device
    max_length = window_length(model.config, max_length)
    w_outs = [layer.w_out().detach().float() for layer in neurons.layers]
    rows = []
    for number, record in enumerate(records, 1):
        ids, mask = encode_example(tokenizer, record, max_length)
        if not any(mask):
            raise NeuronAtlasError(f"example {number} has no answer tokens to pool over (empty answer or text)")
        with capture_activations(neurons) as seen:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        chosen = torch.tensor(mask, device=device)
        pooled = []
        for layer, w_out in enumerate(w_outs):
            values = cett(seen[layer].float().reshape(len(ids), -1), w_out)[chosen]  # (answer tokens, d_ff)
            pooled.append(values.mean(0) if pool == "mean" else values.amax(0))
        rows.append(torch.cat(pooled).cpu())
    return torch.stack(rows).numpy()


def _binary(records: list[dict], label_field: str, positive: str, negative: str | None) -> tuple[list[dict], np.ndarray]:
    labels = sorted({str(record[label_field]) for record in records})
    if positive not in labels:
        raise NeuronAtlasError(f"unknown positive label {positive!r}; the examples have: {', '.join(labels)}")
    if negative is not None and negative not in labels:
        raise NeuronAtlasError(f"unknown negative label {negative!r}; the examples have: {', '.join(labels)}")
    kept = [r for r in records if negative is None or str(r[label_field]) in (positive, negative)]
    y = np.array([str(r[label_field]) == positive for r in kept], dtype=int)
    if y.sum() < 2 or (1 - y).sum() < 2:
        raise NeuronAtlasError(f"need at least 2 positive and 2 negative examples (got {int(y.sum())} and "
                               f"{int((1 - y).sum())}); the labels present are {', '.join(labels)}")
    return kept, y


def fit_l1(x: np.ndarray, y: np.ndarray, c: float | None, c_grid, test_size: float, seed: int) -> dict:
    """L1 logistic regression on a stratified split: weights (standardised features), C, held-out scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    model = LogisticRegression(l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=seed)
    if c is None:
        folds = max(2, min(5, int(np.bincount(y_train).min())))
        search = GridSearchCV(model, {"C": list(c_grid)}, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        model = search.fit(x_train, y_train).best_estimator_
    else:
        model.set_params(C=c).fit(x_train, y_train)
    probability = model.predict_proba(x_test)[:, 1]
    return {"weights": model.coef_[0], "C": float(model.C), "train_examples": len(y_train), "test_examples": len(y_test),
            "test_accuracy": float(accuracy_score(y_test, probability >= 0.5)),
            "test_auroc": float(roc_auc_score(y_test, probability)),
            "chance": float(max(y_test.mean(), 1 - y_test.mean()))}


def cett_null(x: np.ndarray, y: np.ndarray, fit: dict, test_size: float, seed: int, options: NullOptions) -> dict:
    """The classifier refit (at the real fit's C) on shuffled labels: p of the real held-out AUROC."""
    generator = np.random.default_rng(options.seed)
    permutations = options.count()
    null = [fit_l1(x, generator.permutation(y), fit["C"], (), test_size, seed)["test_auroc"] for _ in range(permutations)]
    p = (1 + sum(value >= fit["test_auroc"] for value in null)) / (1 + permutations)
    per_label = {"classifier": {"best": fit["test_auroc"], "null_best": max(null), "chance": 0.5}}
    block = null_block("cett", "the examples' labels (the L1 classifier refit at the same C; its held-out AUROC)",
                       permutations, options, per_label, test="permutation p of the held-out AUROC (one test)")
    block["p"] = p
    return block


def find_cett(model, tokenizer, records: list[dict], positive: str, *, label_field: str = "label",
              negative: str | None = None, pool: str = "mean", c: float | None = None, c_grid=C_GRID,
              test_size: float = 0.3, seed: int = 0, max_length: int | None = None,
              null: NullOptions | None = None) -> NeuronSet:
    """Neurons whose CETT predicts the positive label, by L1 logistic regression; see the module docstring.

    >>> found = find_cett(model, tokenizer, read_examples("answers.jsonl"), positive="hallucinated")  # doctest: +SKIP
    >>> found.params["test_accuracy"]                                                                   # doctest: +SKIP
    """
    if not records:
        raise NeuronAtlasError("no examples given; pass records with a label and 'text' or 'prompt' + 'answer'")
    if not 0 < test_size < 1:
        raise NeuronAtlasError(f"test size must be in (0, 1) (got {test_size}); 0.3 holds out 30%")
    if c is not None and c <= 0:
        raise NeuronAtlasError(f"C must be positive (got {c}); leave it out to choose it by grid search")
    for number, record in enumerate(records, 1):
        _check_example(record, label_field, f"example {number}")
    kept, y = _binary(records, label_field, positive, negative)
    if null is not None:
        check_support({positive: int(y.sum()), negative or "other labels": int((1 - y).sum())}, null.min_docs, "examples")
    x = cett_features(model, tokenizer, kept, pool, max_length)
    fit = fit_l1(x, y, c, c_grid, test_size, seed)
    block = cett_null(x, y, fit, test_size, seed, null) if null is not None else None
    weights = fit.pop("weights")
    chosen = torch.from_numpy(np.flatnonzero(weights > 0))
    if block is not None and block["p"] >= null.fdr:
        chosen = chosen[:0]  # the classifier does no better than on shuffled labels: no neuron is a finding
    layers, indices = layer_of(locate_neurons(model).widths)(chosen)
    q = None if block is None else block["p"]
    found = [Neuron(int(l), int(i), float(weights[k]), positive, q) for l, i, k in zip(layers, indices, chosen.tolist())]
    params = {"positive": positive, "negative": negative or "all other labels", "label_field": label_field,
              "pool": pool, "test_size": test_size, "seed": seed, "max_length": max_length,
              "nonzero_weights": int((weights != 0).sum()), "negative_weights": int((weights < 0).sum()), **fit,
              "score": "L1 logistic weight of the standardised CETT feature",
              "intervention": "scale: Intervention(set, 'scale', value=alpha) scales W_out[:, H] by alpha"}
    return NeuronSet("cett", model_block(model), found, params, "z", block, [positive])
