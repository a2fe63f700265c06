"""A small language identifier trained on a labelled corpus: character 1-3-gram naive Bayes.

It judges the language of generated text (see :mod:`neuronatlas.steer`) independently of the model
being steered. Features are scikit-learn's ``CountVectorizer(analyzer="char_wb", ngram_range=(1, 3))``
counts (lowercased); the classifier is multinomial naive Bayes with Laplace smoothing ``alpha``.

Saved as one ``.npz`` file of plain arrays (no pickle): the n-gram vocabulary, the labels, the
per-label n-gram counts and document counts::

    langid = train_langid(read_corpus("train.jsonl", label_field="lang"))
    langid.predict(["der Hund lief", "the dog ran"])   # ['de', 'en']
    langid.save("langid.npz"); LangId.load("langid.npz")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .corpus import Corpus, read_corpus
from .errors import NeuronAtlasError

FORMAT_VERSION = 1
NGRAMS = (1, 3)


def _vectorizer(vocabulary=None, max_features=None):
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(analyzer="char_wb", ngram_range=NGRAMS, lowercase=True, vocabulary=vocabulary,
                           max_features=max_features, dtype=np.float64)


class LangId:
    """Multinomial naive Bayes over character n-gram counts; see the module docstring."""

    def __init__(self, vocabulary: Sequence[str], labels: Sequence[str], feature_counts: np.ndarray,
                 class_counts: np.ndarray, alpha: float = 0.1):
        self.vocabulary = list(vocabulary)
        self.labels = list(labels)
        self.feature_counts = np.asarray(feature_counts, dtype=np.float64)  # (K, V)
        self.class_counts = np.asarray(class_counts, dtype=np.float64)  # (K,) documents per label
        self.alpha = float(alpha)
        smoothed = self.feature_counts + self.alpha
        self.feature_log_prob = np.log(smoothed) - np.log(smoothed.sum(1, keepdims=True))  # (K, V)
        self.class_log_prior = np.log(self.class_counts) - np.log(self.class_counts.sum())  # (K,)
        self._vectorizer = _vectorizer({ngram: i for i, ngram in enumerate(self.vocabulary)})

    def log_scores(self, texts: Sequence[str]) -> np.ndarray:
        """(N, K) joint log likelihoods (unnormalised log posteriors)."""
        counts = self._vectorizer.transform(list(texts))  # (N, V) sparse
        return np.asarray(counts @ self.feature_log_prob.T) + self.class_log_prior

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        scores = self.log_scores(texts)
        scores -= scores.max(1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely label of each text (the prior's choice for an empty text)."""
        if isinstance(texts, str):
            raise NeuronAtlasError("LangId.predict takes a list of texts, not one string")
        if not len(texts):
            return []
        return [self.labels[i] for i in self.log_scores(texts).argmax(1)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        predicted = self.predict(texts)
        return float(np.mean([p == t for p, t in zip(predicted, labels)])) if predicted else float("nan")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path, format_version=np.array(FORMAT_VERSION), vocabulary=np.array(self.vocabulary, dtype=str),
            labels=np.array(self.labels, dtype=str), feature_counts=self.feature_counts,
            class_counts=self.class_counts, alpha=np.array(self.alpha),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> LangId:
        path = Path(path)
        if not path.is_file():
            raise NeuronAtlasError(f"language identifier not found: {path} (train one with train_langid and save it)")
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format_version"]) > FORMAT_VERSION:
                    raise NeuronAtlasError(f"{path} is a language identifier of a newer format; upgrade neuronatlas")
                return cls(data["vocabulary"].tolist(), data["labels"].tolist(), data["feature_counts"],
                           data["class_counts"], float(data["alpha"]))
        except (OSError, KeyError, ValueError) as error:
            raise NeuronAtlasError(f"{path} is not a saved language identifier ({type(error).__name__}: {error})") from None


def train_langid(corpus: str | Path | Corpus | Iterable[tuple[str, str]], alpha: float = 0.1,
                 max_features: int | None = 100_000, label_field: str = "lang", text_field: str = "text") -> LangId:
    """Train on a labelled corpus (a Corpus, a path read with ``label_field``, or (text, label) pairs)."""
    if isinstance(corpus, (str, Path)):
        corpus = read_corpus(corpus, text_field=text_field, label_field=label_field)
    if isinstance(corpus, Corpus):
        pairs = [(doc.text, doc.label) for doc in corpus]
    else:
        pairs = [(text, label) for text, label in corpus]
    pairs = [(text, label) for text, label in pairs if label is not None and text.strip()]
    labels = sorted({label for _, label in pairs})
    if len(labels) < 2:
        raise NeuronAtlasError(
            f"a language identifier needs labelled text of at least two labels (found: {', '.join(labels) or 'none'}); "
            "read the corpus with its label field"
        )
    if alpha <= 0:
        raise NeuronAtlasError(f"alpha must be positive (got {alpha})")
    vectorizer = _vectorizer(max_features=max_features)
    counts = vectorizer.fit_transform([text for text, _ in pairs])  # (N, V) sparse
    vocabulary = [None] * len(vectorizer.vocabulary_)
    for ngram, index in vectorizer.vocabulary_.items():
        vocabulary[index] = ngram
    y = np.array([labels.index(label) for _, label in pairs])
    feature_counts = np.zeros((len(labels), counts.shape[1]))
    class_counts = np.zeros(len(labels))
    for k in range(len(labels)):
        rows = y == k
        feature_counts[k] = np.asarray(counts[rows].sum(0)).ravel()
        class_counts[k] = rows.sum()
    return LangId(vocabulary, labels, feature_counts, class_counts, alpha)


__all__ = ["LangId", "train_langid"]
