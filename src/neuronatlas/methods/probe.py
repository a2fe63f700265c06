"""Sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack").

For a binary label (one label against the rest, or one label against another), per layer:

1. Split the samples 70/30 (``test_size``), stratified by label; the rows of one document always
   fall on the same side, so token samples of a document never leak into the held-out part.
2. Rank the layer's neurons on the training part only, by one of
   * ``mean_diff`` — |mean over positives − mean over negatives| (the paper's default),
   * ``f_stat`` — the ANOVA F-statistic (``sklearn.feature_selection.f_classif``),
   * ``l1`` — |weight| of an L1-regularised logistic regression (C = ``l1_c``, 0.1 in the paper) on
     standardised activations; neurons it zeroes are ordered by mean difference.
3. For every k in ``ks`` (1, 2, 4, ..., 256, capped by the layer's width) fit a logistic probe
   (standardised inputs, balanced class weights) on the top k neurons and score it on the held-out
   part: F1 of the positive class, AUROC of the probe's decision value, and MCC.

The samples are per-document pooled activations (mean or max of z over the document's tokens) from
an atlas's document sample, or collected from a model over a corpus (:func:`collect_samples`),
per document or per token.

The neuron set holds, for each label probed, the ``top_k`` highest-ranked neurons of the best layer
(the best held-out F1 averaged over the probes with k <= ``top_k``; ties: mean AUROC, then the
earlier layer), or of every layer with ``per_layer=True``; score = the ranking score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NeuronAtlasError
from ..hooks import activation_module, capture_activations, forward_batch, pad_token_id
from ..loading import window_length
from ..neuronset import Neuron, NeuronSet, model_info
from .nulls import NullOptions, check_support, label_null, null_block, q_values, supported_labels
from .nulls import best as nulls_best

RANKINGS = ("mean_diff", "f_stat", "l1")
UNITS = ("doc", "token")
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ProbeData:
    """What is probed: one row per sample (a document or a token)."""

    labels: list[str]  # (R,) the label of each row
    groups: np.ndarray  # (R,) int64 document of each row: a document's rows stay on one side of the split
    layers: list[np.ndarray]  # per layer (R, D) float32 activations
    source: str  # where the rows come from, for the report

    def __post_init__(self):
        rows = len(self.labels)
        if any(len(matrix) != rows for matrix in self.layers) or len(self.groups) != rows:
            raise ValueError("every layer's matrix and the groups need one row per label")


def from_atlas(atlas, pool: str = "mean") -> ProbeData:
    """The atlas's document sample: each sampled document's mean (or max) z, per layer: decoded from
    its rank code (the default format; see :mod:`neuronatlas.docpool`) or its float16 value."""
    documents = atlas.docpool
    if documents is None or len(documents) == 0:
        raise NeuronAtlasError(
            "this atlas has no document sample; profile again with --doc-sample N (N > 0), "
            "or probe a model over a corpus (--model, --corpus)"
        )
    rows = documents.tokens > 0
    labels = [label for label, keep in zip(documents.labels, rows.tolist()) if keep]
    layers = [documents.matrix(pool, layer)[rows] for layer in range(atlas.num_layers)]
    what = f"{pool} of z, decoded from rank codes" if documents.ranked else f"{pool} of z"
    return ProbeData(labels, documents.docs[rows].astype(np.int64), layers, f"atlas document sample ({what})")


@torch.no_grad()
def collect_samples(model, tokenizer, corpus, unit: str = "doc", pool: str = "mean", max_per_label: int = 200,
                    tokens_per_window: int = 8, max_length: int | None = None, batch_size: int = 8,
                    seed: int = 0) -> ProbeData:
    """Run ``model`` over the labelled ``corpus`` and keep samples of z for probing.

    ``unit="doc"``: the first ``max_per_label`` documents of each label, each pooled (``pool``: mean
    or max of z over its real tokens, all its windows). ``unit="token"``: up to ``tokens_per_window``
    random real tokens of each window, until ``max_per_label`` tokens per label.
    """
    from ..corpus import iter_batches, iter_windows
    from ..models import locate_neurons

    if unit not in UNITS:
        raise NeuronAtlasError(f"unknown unit {unit!r}; use doc or token")
    if pool not in ("mean", "max"):
        raise NeuronAtlasError(f"unknown pool {pool!r}; use mean or max")
    if max_per_label < 1 or tokens_per_window < 1:
        raise NeuronAtlasError(f"samples per label ({max_per_label}) and tokens per window ({tokens_per_window}) "
                               "must be at least 1")
    neurons = locate_neurons(model)
    device = next(model.parameters()).device
    chosen, taken = [], {}
    for doc in corpus:
        if doc.label is not None and taken.get(doc.label, 0) < max_per_label:
            chosen.append(doc)
            taken[doc.label] = taken.get(doc.label, 0) + 1
    if len(taken) < 2:
        raise NeuronAtlasError(f"corpus {corpus.path} needs labelled documents of at least two labels to probe "
                               f"(found: {', '.join(sorted(taken)) or 'none'}); pass --label-field")
    collector = _Collector(neurons.num_layers, unit, pool, max_per_label, tokens_per_window, seed)
    max_length = window_length(model.config, max_length)
    batches = iter_batches(iter_windows(chosen, tokenizer, max_length), batch_size, pad_token_id(tokenizer), "right")
    for batch in batches:
        with capture_activations(neurons, batch.input_ids.shape) as captured:
            forward_batch(activation_module(model), batch.input_ids.to(device), batch.attention_mask.to(device))
        collector.add(batch, [captured[layer].float().cpu() for layer in range(neurons.num_layers)])
        if unit == "token" and all(collector.taken.get(label, 0) >= max_per_label for label in taken):
            break  # every label has its tokens: the remaining documents are not needed
    return collector.finish(f"{unit} samples ({pool} of z)" if unit == "doc" else "token samples of z")


class _Collector:
    """Accumulates per-document pools or token samples, batch by batch."""

    def __init__(self, num_layers: int, unit: str, pool: str, cap: int, per_window: int, seed: int):
        self.num_layers, self.unit, self.pool, self.cap, self.per_window = num_layers, unit, pool, cap, per_window
        self.rng = np.random.default_rng(seed)
        self.rows: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        self.labels: list[str] = []
        self.groups: list[int] = []
        self.taken: dict[str, int] = {}
        self.open: dict | None = None  # the document whose windows are still coming: doc, label, count, acc

    def add(self, batch, z: list[torch.Tensor]) -> None:
        """z: per layer (B, T, D) of the batch."""
        for row, window in enumerate(batch.windows):
            real = batch.attention_mask[row].bool()
            values = [layer_z[row][real].double().numpy() for layer_z in z]  # per layer (t, D)
            if self.unit == "token":
                self._add_tokens(window, values)
            else:
                self._add_window(window, values)

    def _add_tokens(self, window, values: list[np.ndarray]) -> None:
        room = self.cap - self.taken.get(window.label, 0)
        count = min(room, self.per_window, len(values[0]))
        if count <= 0:
            return
        picked = np.sort(self.rng.choice(len(values[0]), size=count, replace=False))
        for layer, matrix in enumerate(values):
            self.rows[layer].append(matrix[picked].astype(np.float32))
        self.labels.extend([window.label] * count)
        self.groups.extend([window.doc] * count)
        self.taken[window.label] = self.taken.get(window.label, 0) + count

    def _add_window(self, window, values: list[np.ndarray]) -> None:
        if self.open is not None and self.open["doc"] != window.doc:
            self._close()
        if self.open is None:
            self.open = {"doc": window.doc, "label": window.label, "count": 0,
                         "acc": [np.full(m.shape[1], -np.inf if self.pool == "max" else 0.0) for m in values]}
        self.open["count"] += len(values[0])
        for acc, matrix in zip(self.open["acc"], values):
            if self.pool == "max":
                np.maximum(acc, matrix.max(0), out=acc)
            else:
                acc += matrix.sum(0)

    def _close(self) -> None:
        document, self.open = self.open, None
        for layer, acc in enumerate(document["acc"]):
            pooled = acc if self.pool == "max" else acc / max(document["count"], 1)
            self.rows[layer].append(pooled[None].astype(np.float32))
        self.labels.append(document["label"])
        self.groups.append(document["doc"])

    def finish(self, source: str) -> ProbeData:
        if self.open is not None:
            self._close()
        layers = [np.concatenate(parts) for parts in self.rows]
        return ProbeData(self.labels, np.asarray(self.groups, np.int64), layers, source)


# ---- ranking and probes ---------------------------------------------------------------------------


def rank_neurons(x: np.ndarray, y: np.ndarray, ranking: str = "mean_diff",
                 l1_c: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(scores, order) of the neurons (columns of x, (R, D)) for the binary y (R,).

    scores: (D,) float64, higher = better; order: (D,) neuron indices, best first (ties: the larger
    mean difference, then the lower index).
    """
    positive, negative = x[y], x[~y]
    mean_diff = np.abs(positive.mean(0, dtype=np.float64) - negative.mean(0, dtype=np.float64))
    if ranking == "mean_diff":
        scores = mean_diff
    elif ranking == "f_stat":
        from sklearn.feature_selection import f_classif

        with np.errstate(divide="ignore", invalid="ignore"):
            f_values, _ = f_classif(x, y)
        scores = np.nan_to_num(f_values.astype(np.float64), nan=0.0, posinf=np.finfo(np.float64).max)
    elif ranking == "l1":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        fit = LogisticRegression(l1_ratio=1.0, C=l1_c, solver="liblinear", class_weight="balanced", max_iter=1000)
        fit.fit(StandardScaler().fit_transform(x), y)
        scores = np.abs(fit.coef_[0]).astype(np.float64)
    else:
        raise NeuronAtlasError(f"unknown ranking {ranking!r}; use one of {', '.join(RANKINGS)}")
    return scores, np.lexsort((-mean_diff, -scores))


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 probe_c: float = 1.0) -> dict[str, float]:
    """Held-out F1, AUROC and MCC of a balanced logistic probe (standardised inputs) fit on the training part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=probe_c, class_weight="balanced", max_iter=1000))
    probe.fit(x_train, y_train)
    predicted = probe.predict(x_test)
    return {
        "f1": float(f1_score(y_test, predicted, zero_division=0.0)),
        "auroc": float(roc_auc_score(y_test, probe.decision_function(x_test))),
        "mcc": float(matthews_corrcoef(y_test, predicted)),
    }


def split(y: np.ndarray, groups: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, test) masks over the rows: documents (groups) split stratified by their label."""
    from sklearn.model_selection import train_test_split

    documents, first = np.unique(groups, return_index=True)
    document_y = y[first]
    for name, count in (("positive", int(document_y.sum())), ("negative", int((~document_y).sum()))):
        if count < 4:
            raise NeuronAtlasError(
                f"only {count} {name} document(s) to probe; a held-out split needs at least 4 of each "
                "(sample more documents per label)"
            )
    _, test_documents = train_test_split(documents, test_size=test_size, stratify=document_y, random_state=seed)
    test = np.isin(groups, test_documents)
    return ~test, test


def layer_curve(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, ks: list[int], ranking: str,
                l1_c: float, probe_c: float) -> dict:
    """Rank one layer's neurons on the training rows and probe the top k for each k; see the module docstring."""
    x_train, x_test = x[train], x[test]
    scores, order = rank_neurons(x_train, y[train], ranking, l1_c)
    curve = []
    for k in [k for k in ks if k <= x.shape[1]]:
        columns = order[:k]
        curve.append({"k": k, **probe_scores(x_train[:, columns], y[train], x_test[:, columns], y[test], probe_c)})
    return {"curve": curve, "order": order, "scores": scores}


def binary_target(labels: list[str], positive: str, negative: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows used, y): ``positive`` against every other label, or against ``negative`` only."""
    names = np.asarray(labels)
    known = sorted(set(labels))
    for label in (positive, negative):
        if label is not None and label not in known:
            raise NeuronAtlasError(f"unknown label {label!r}; the samples have labels: {', '.join(known)}")
    if negative == positive:
        raise NeuronAtlasError(f"--against {negative!r} is the label probed; name another label or leave it out")
    rows = np.ones(len(names), bool) if negative is None else np.isin(names, [positive, negative])
    return rows, names[rows] == positive


def sparse_probe(data: ProbeData, model: dict, labels: list[str] | None = None, against: str | None = None,
                 ranking: str = "mean_diff", ks: list[int] | None = None, top_k: int = 8, per_layer: bool = False,
                 test_size: float = 0.3, seed: int = 0, l1_c: float = 0.1, probe_c: float = 1.0,
                 null: NullOptions | None = None) -> NeuronSet:
    """Probe every layer for each label in ``labels`` (default: all; one against the rest or ``against``).

    Returns the neuron set (see the module docstring); ``params["report"]`` holds, per label, every
    layer's curve [{k, f1, auroc, mcc}] and the best layer. With ``null``, a kept neuron must also pass
    :func:`probe_null` (q < fdr); the top k of a layer are taken among those.
    """
    ks = sorted(set(DEFAULT_KS if ks is None else ks))
    _check(ranking, ks, top_k, test_size, l1_c, probe_c)
    chosen = sorted(set(data.labels)) if labels is None else list(labels)
    if against is None and len(set(data.labels)) < 2:
        raise NeuronAtlasError(f"probing needs samples of at least two labels; these have only {sorted(set(data.labels))}")
    tested = None
    if null is not None:
        tested = probe_null(data, chosen, against, null, asked=labels or ())
        chosen = [label for label in chosen if label in tested["q"]]
    neurons, report = [], {}
    for label in chosen:
        rows, y = binary_target(data.labels, label, against)
        train, test = split(y, data.groups[rows], test_size, seed)
        layers = [layer_curve(matrix[rows], y, train, test, ks, ranking, l1_c, probe_c) for matrix in data.layers]
        best = _best_layer(layers, top_k)
        report[label] = {
            "positives": int(y.sum()), "negatives": int((~y).sum()), "train": int(train.sum()), "test": int(test.sum()),
            "best_layer": best,
            "layers": [{"layer": layer, "curve": result["curve"],
                        "top": [int(i) for i in result["order"][: min(16, len(result["order"]))]]}
                       for layer, result in enumerate(layers)],
        }
        offsets = np.cumsum([0] + [matrix.shape[1] for matrix in data.layers])
        for layer in range(len(layers)) if per_layer else [best]:
            result = layers[layer]
            q = None if tested is None else tested["q"][label][offsets[layer] : offsets[layer + 1]]
            order = [i for i in result["order"] if q is None or q[i] < null.fdr][:top_k]
            neurons += [Neuron(layer, int(i), float(result["scores"][i]), label, None if q is None else float(q[i]))
                        for i in order]
    neurons.sort(key=lambda n: (n.label, n.layer, n.index))
    params = {"ranking": ranking, "ks": ks, "top_k": top_k, "per_layer": per_layer, "against": against,
              "test_size": test_size, "seed": seed, "l1_c": l1_c, "probe_c": probe_c, "source": data.source,
              "samples": len(data.labels), "report": report,
              "score": f"{ranking} ranking score on the training split"}
    return NeuronSet("probe", model, neurons, params, "z", None if tested is None else tested["block"], chosen)


def probe_null(data: ProbeData, chosen: list[str], against: str | None, options: NullOptions, asked=()) -> dict:
    """{"q": {label: (N,) q}, "block"}: each neuron's two-sided AUROC for the label (against the rest or
    ``against``) over the samples, real labels against document-level shuffles (rows of a document
    keep one label). The probes' own F1 is not re-fit on shuffles: the null tests the neurons. Labels
    with fewer than ``min_docs`` documents are left out (no q), or refused when ``asked`` names them."""
    documents = {}
    for label, group in zip(data.labels, data.groups.tolist()):
        documents.setdefault(label, set()).add(group)
    if against is not None:
        check_support({against: len(documents.get(against, ()))}, options.min_docs)
    total = None if against is not None else len({group for groups in documents.values() for group in groups})
    chosen, refused = supported_labels({label: len(documents.get(label, ())) for label in chosen}, options.min_docs,
                                       asked=asked, total=total)
    result = {"real": {}, "p": {}, "null_best": {}, "permutations": options.count()}
    for label in chosen:
        rows, _ = binary_target(data.labels, label, against)
        labels = [x for x, keep in zip(data.labels, rows.tolist()) if keep]
        one = label_null(lambda: (torch.from_numpy(m[rows]) for m in data.layers), labels, data.groups[rows], [label],
                         "auroc", options, two_sided=True)
        for key in ("real", "p", "null_best"):
            result[key][label] = one[key][label]
    per_label = {label: {"best": nulls_best(result["real"][label]), "null_best": result["null_best"][label],
                         "chance": 0.5} for label in chosen}
    block = null_block("probe", "the samples' labels, a document at a time (each neuron tested by its AUROC "
                       "for the label, either direction)", result["permutations"], options, per_label,
                       refused=refused)
    return {"q": q_values(result["p"]), "block": block}


def _best_layer(layers: list[dict], top_k: int) -> int:
    """The layer whose probes with k <= ``top_k`` score the best mean F1 (then mean AUROC, then the earlier layer)."""
    def key(layer: int):
        curve = [point for point in layers[layer]["curve"] if point["k"] <= top_k] or layers[layer]["curve"][:1]
        return (-np.mean([p["f1"] for p in curve]), -np.mean([p["auroc"] for p in curve]), layer)

    return min(range(len(layers)), key=key)


def _check(ranking, ks, top_k, test_size, l1_c, probe_c) -> None:
    if ranking not in RANKINGS:
        raise NeuronAtlasError(f"unknown ranking {ranking!r}; use one of {', '.join(RANKINGS)}")
    if not ks or min(ks) < 1:
        raise NeuronAtlasError(f"every k must be at least 1 (got {ks}); e.g. 1,2,4,8")
    if top_k < 1:
        raise NeuronAtlasError(f"top k must be at least 1 (got {top_k})")
    if not 0 < test_size < 1:
        raise NeuronAtlasError(f"test size must be in (0, 1) (got {test_size}); 0.3 holds out 30%")
    if l1_c <= 0 or probe_c <= 0:
        raise NeuronAtlasError(f"regularisation strengths must be positive (got l1 C {l1_c}, probe C {probe_c})")


def find_probe(atlas, label: str | None = None, against: str | None = None, pool: str = "mean",
               ranking: str = "mean_diff", ks: list[int] | None = None, top_k: int = 8, per_layer: bool = False,
               test_size: float = 0.3, seed: int = 0, l1_c: float = 0.1, probe_c: float = 1.0,
               null: NullOptions | None = None) -> NeuronSet:
    """Sparse probing on an atlas's document sample (every label when ``label`` is None); see :func:`sparse_probe`.

    >>> found = find_probe(load_atlas("atlas"), label="ru", ks=[1, 2, 4])  # doctest: +SKIP
    >>> found.params["report"]["ru"]["layers"][2]["curve"][0]  # doctest: +SKIP
    {'k': 1, 'f1': 1.0, 'auroc': 1.0, 'mcc': 1.0}
    """
    return sparse_probe(from_atlas(atlas, pool), model_info(atlas.meta), None if label is None else [label], against,
                        ranking=ranking, ks=ks, top_k=top_k, per_layer=per_layer, test_size=test_size, seed=seed,
                        l1_c=l1_c, probe_c=probe_c, null=null)


def plot_curves(found: NeuronSet, path) -> None:
    """F1 and AUROC against k, one line per layer, one row of panels per label (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = found.params["report"]
    fig, axes = plt.subplots(len(report), 2, figsize=(9, 2.6 * len(report)), squeeze=False)
    for row, (label, info) in enumerate(report.items()):
        for column, metric in enumerate(("f1", "auroc")):
            ax = axes[row][column]
            for layer in info["layers"]:
                ax.plot([p["k"] for p in layer["curve"]], [p[metric] for p in layer["curve"]], marker="o",
                        label=f"layer {layer['layer']}")
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{label}: {metric.upper()}")
            ax.set_xlabel("k neurons")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
