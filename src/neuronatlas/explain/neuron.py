"""One neuron: explain it (best of N sampled explanations), score the explanation with each scorer,
and score another neuron's explanation on its contexts as a baseline.

Scorers (``ExplainOptions.scorers``):

* ``simulation``: correlation of simulated and real activations (Bills et al. 2023; :mod:`.score`);
* ``detection`` and ``fuzzing``: balanced accuracy of yes/no judgements (delphi; :mod:`.scorers`).

All are computed on the scoring contexts: by default the quantile-band and non-activating samples
of :mod:`neuronatlas.samples` (:mod:`.contexts`; active and inactive as drawn), else the held-out top
exemplars and the random exemplars (active by ``--active``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NeuronAtlasError
from .clusters import cluster_exemplars
from .contexts import sample_exemplars
from .exemplars import Exemplar
from .explain import explain, explain_candidates
from .score import Pair, pooled, score
from .scorers import Labelled, by_origin, by_threshold, judged_labelled

SCORERS = ("simulation", "detection", "fuzzing")


def split_exemplars(exemplars: list[Exemplar], top: int, holdout: int) -> tuple[list[Exemplar], list[Exemplar]]:
    """(shown, held out): ``holdout`` exemplars evenly spaced over the ranks (always leaving one to
    show), then the best ``top`` of the rest."""
    holdout = min(holdout, len(exemplars) - 1)
    held = set(np.rint(np.linspace(0, len(exemplars) - 1, holdout)).astype(int).tolist()) if holdout > 0 else set()
    shown = [e for i, e in enumerate(exemplars) if i not in held][:top]
    return shown, [exemplars[i] for i in sorted(held)]


@dataclass
class Material:
    """What one neuron is explained from and scored on."""

    shown: list[Exemplar]  # read by the explainer
    held: list[Exemplar]  # held-out top exemplars (or band samples: active), for scoring
    randoms: list[Exemplar]  # random corpus spans (or non-activating samples), for scoring
    scale: float  # the largest activation among the shown exemplars: level 10
    threshold: float  # exemplars: a token is active at or above this activation; samples: the peak above which a context is
    source: str = "exemplars"  # or "samples": held are active and randoms inactive as drawn
    active: float = 0.25  # samples: fuzzing marks the tokens reaching this fraction of their context's peak
    dropped: int = 0  # samples dropped for repeating a shown exemplar's peak
    non_activating_max: float | None = None  # samples: the highest peak among the inactive contexts

    @property
    def contexts(self) -> list[tuple[list, np.ndarray]]:
        """(tokens, activations) of the scoring contexts; byte tokens when known, so text reads whole."""
        return [(e.pieces if e.pieces is not None else e.tokens, e.activations) for e in self.held + self.randoms]

    @property
    def labelled(self) -> list[Labelled]:
        """The scoring contexts with their right answers (detection, fuzzing)."""
        if self.source == "samples":
            return by_origin(self.contexts, [True] * len(self.held) + [False] * len(self.randoms), self.active)
        return by_threshold(self.contexts, self.threshold)

    def described(self) -> dict:
        """Where the scoring contexts come from, for the output."""
        return {"source": self.source, "n_activating": len(self.held), "n_non_activating": len(self.randoms),
                "dropped": self.dropped, "non_activating_max": self.non_activating_max}


def material_of(tops: list[Exemplar], randoms: list[Exemplar], options) -> Material | None:
    """The split of a neuron's exemplars, or None when it has none (never recorded as active)."""
    if not tops:
        return None
    shown, held = split_exemplars(tops, options.top, options.holdout)
    scale = max(float(e.activations.max()) for e in shown)
    return Material(shown, held, randoms, scale, options.active * scale)


def material_from_samples(tops: list[Exemplar], samples, strings, options, threshold: float) -> Material | None:
    """The best ``options.top`` exemplars shown, the neuron's quantile-band and non-activating
    samples (:mod:`neuronatlas.samples`) for scoring; None when it has no exemplar."""
    if not tops:
        return None
    shown = tops[:options.top]
    active, inactive, dropped = sample_exemplars(samples, strings, shown)
    scale = max(float(e.activations.max()) for e in shown)
    quiet = [float(e.activations.max()) for e in inactive]
    return Material(shown, active, inactive, scale, threshold, "samples", options.active, dropped,
                    max(quiet) if quiet else None)


def simulate_pairs(simulator, explanation: str, exemplars: list[Exemplar]) -> list[Pair]:
    """(simulated, real) per exemplar, over its pieces of whole characters (see Exemplar.readable)."""
    readable = [e.readable() for e in exemplars]
    many = getattr(simulator, "simulate_many", None)
    if many is not None:
        simulated = many(explanation, [texts for texts, _ in readable]) if exemplars else []
    else:
        simulated = [simulator.simulate(explanation, texts) for texts, _ in readable]
    return [(values, real) for values, (_, real) in zip(simulated, readable)]


def score_explanation(explanation: str, material: Material, simulator, scorers, seed: int = 0) -> dict:
    """{scorer: its result} for ``explanation`` on the material's scoring contexts."""
    results = {}
    for name in scorers:
        if name == "simulation":
            top = simulate_pairs(simulator, explanation, material.held)
            random = simulate_pairs(simulator, explanation, material.randoms)
            scores = score(top, random)
            results[name] = {"score": scores.all, "top": scores.top, "random": scores.random,
                             "n_contexts": len(top) + len(random)}
        else:
            if not hasattr(simulator, "judge"):
                raise NeuronAtlasError(f"the scorer {simulator.name} cannot judge texts; --scorers {name} needs a local model or an endpoint")
            results[name] = judged_labelled(simulator, explanation, name, material.labelled, seed).as_dict()
    return results


def explain_neuron(layer: int, index: int, material: Material | None, explainer, simulator, options) -> dict:
    """One neuron's record of the output: the kept explanation, its scores, every candidate."""
    record = {"layer": layer, "index": index, "explanation": "", "score": None, "score_top": None,
              "score_random": None, "clusters": [], "scores": {}, "candidates": [], "threshold": None,
              "baseline_from": None, "contexts": None}
    if material is None:  # never recorded as active: nothing to explain
        return record
    record.update(threshold=material.threshold, contexts=material.described())
    candidates = explain_candidates(explainer, material.shown, material.scale, options.samples, options.temperature,
                                    options.seed + index)
    scored = {}  # explanation -> its scores, each candidate scored once
    for candidate in candidates:
        if candidate not in scored:
            scored[candidate] = score_explanation(candidate, material, simulator, options.scorers, options.seed)
    ranking = options.scorers[0]
    record["candidates"] = [{"explanation": c, "score": scored[c][ranking]["score"]} for c in candidates]
    best = max(dict.fromkeys(candidates), key=lambda c: _rank(scored[c][ranking]["score"]))  # first of equals
    record.update(explanation=best, scores=scored[best])
    if "simulation" in scored[best]:
        simulation = scored[best]["simulation"]
        record.update(score=simulation["score"], score_top=simulation["top"], score_random=simulation["random"])
    if options.clusters:
        record["clusters"] = describe_clusters(material, explainer, simulator, options)
    return record


def _rank(value: float | None) -> float:
    return -np.inf if value is None else value


def describe_clusters(material: Material, explainer, simulator, options) -> list[dict]:
    """Each k-means group of the shown exemplars explained; scored (simulation) on the held-out
    exemplars nearest its centre pooled with the random ones (null when none is nearest)."""
    groups = cluster_exemplars(material.shown, options.clusters, options.seed)
    if groups is None:
        return []
    nearest = groups.assign(material.held)
    described = []
    for cluster, members in enumerate(groups.members):
        explanation = explain(explainer, [material.shown[i] for i in members], material.scale)
        own = [e for e, c in zip(material.held, nearest) if c == cluster]
        value = pooled(simulate_pairs(simulator, explanation, own + material.randoms)) if own else None
        described.append({"explanation": explanation, "size": len(members), "score": value})
    return described


def add_baselines(records: list[dict], materials: list[Material | None], simulator, options) -> None:
    """Each record's scores gain ``baseline``: the score of the next explained neuron's explanation
    (in set order, cyclically) on this neuron's contexts; ``baseline_from`` names that neuron."""
    explained = [i for i, record in enumerate(records) if record["explanation"] and materials[i] is not None]
    for position, i in enumerate(explained):
        record = records[i]
        other = records[explained[(position + 1) % len(explained)]] if len(explained) > 1 else None
        record["baseline_from"] = None if other is None else {k: other[k] for k in ("layer", "index", "explanation")}
        results = {} if other is None else score_explanation(other["explanation"], materials[i], simulator,
                                                             options.scorers, options.seed)
        for name, values in record["scores"].items():
            values["baseline"] = results[name]["score"] if results else None
            if "auc" in values:
                values["baseline_auc"] = results[name]["auc"] if results else None
