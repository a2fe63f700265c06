"""Multi-concept descriptions (PRISM, Kopf et al. 2025: neurons are often polysemantic).

A neuron's shown top exemplars are grouped by k-means (scikit-learn, ``n_init=10``) on the TF-IDF
weighted bag of token ids of each exemplar's span, so exemplars that share words fall together;
each group is then explained on its own. Held-out exemplars are assigned to the nearest centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from .exemplars import Exemplar


def _token_ids(ids: list[int]) -> list[int]:
    """The analyzer of the vectorizer: an exemplar is already a list of tokens."""
    return ids


@dataclass
class ExemplarClusters:
    """k groups of exemplars; ``members[c]`` are indices into the exemplars that were clustered."""

    vectorizer: TfidfVectorizer
    kmeans: KMeans
    members: list[list[int]]

    def assign(self, exemplars: list[Exemplar]) -> np.ndarray:
        """(N,) the cluster of each exemplar (nearest centre)."""
        if not exemplars:
            return np.zeros(0, dtype=int)
        return self.kmeans.predict(self.vectorizer.transform([e.token_ids for e in exemplars]))


def cluster_exemplars(exemplars: list[Exemplar], k: int, seed: int = 0) -> ExemplarClusters | None:
    """k-means of the exemplars into ``min(k, distinct spans)`` groups; None when fewer than two."""
    distinct = len({tuple(e.token_ids) for e in exemplars})
    k = min(k, distinct)
    if k < 2:
        return None
    vectorizer = TfidfVectorizer(analyzer=_token_ids)
    features = vectorizer.fit_transform([e.token_ids for e in exemplars])  # (N, vocabulary) sparse, L2-normalised rows
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    members = [np.flatnonzero(kmeans.labels_ == c).tolist() for c in range(k)]
    return ExemplarClusters(vectorizer, kmeans, members)
