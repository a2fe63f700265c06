"""Detection and fuzzing scores (EleutherAI delphi; Paulo et al. 2024, "Automatically interpreting
millions of features in large language models", arXiv:2410.13928): balanced accuracy of a scorer
model that reads the explanation and judges contexts.

* **detection**: the scorer sees a context (no marks) and says whether the neuron fires on it.
  Positives: contexts where the neuron is active; negatives: contexts where it is not.
* **fuzzing**: the scorer sees a context with some tokens marked ``<<like this>>`` and says whether
  the marks are where the explanation says the neuron fires. Positives: active contexts marked at
  their active tokens; negatives: inactive contexts marked at as many random tokens as an active
  context has marks (delphi's default fuzzing).

A context is any ``(tokens, activations)`` pair: tokens a list of strings (one per token) or of
bytes (each token's bytes, joined into readable characters by :func:`neuronatlas.tokens.display_spans`),
activations (T,) the neuron's value at each token. :func:`by_threshold` labels contexts the classic
way (a token is active when its activation reaches ``threshold``; a context when one of its tokens
is); :func:`by_origin` takes the label from where a context was drawn (a quantile band of
:mod:`neuronatlas.samples`, or its non-activating contexts) and marks, as delphi does, the tokens
that reach a fraction of the context's own peak.

A judge is any object with ``judge(explanation, texts, task) -> list[bool]`` (task "detection" or
"fuzzing"; one answer per text). A judge that also has ``judge_log_odds(explanation, texts, task)
-> (N,) array`` (the local model of :mod:`.llm`: log p(yes) - log p(no) of its next token) is scored
from those numbers instead: the AUROC of the log-odds between active and inactive contexts, and the
balanced accuracy with the decision threshold at their quantile that says yes as often as there
are active contexts (the median when the classes are balanced). A small model that prefers one
answer everywhere still ranks contexts, which its yes/no answers would hide (balanced accuracy
exactly 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..tokens import display_spans

OPEN, CLOSE = "<<", ">>"
TASKS = ("detection", "fuzzing")
Context = tuple[list, np.ndarray]  # tokens (str or bytes per token), activations (T,)


def balanced_accuracy(truth: list[bool], predicted: list[bool]) -> float | None:
    """(true positive rate + true negative rate) / 2; None without both a positive and a negative."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels but {len(predicted)} answers")
    positives, negatives = truth.sum(), (~truth).sum()
    if positives == 0 or negatives == 0:
        return None
    tpr = (predicted & truth).sum() / positives
    tnr = (~predicted & ~truth).sum() / negatives
    return float((tpr + tnr) / 2)


def auroc(truth: list[bool], values) -> float | None:
    """P(a positive's value > a negative's) + P(equal) / 2 (Mann-Whitney; 0.5 = chance); None without
    both a positive and a negative. On yes/no answers (as 0/1) it equals their balanced accuracy."""
    truth, values = np.asarray(truth, bool), np.asarray(values, np.float64)
    if len(truth) != len(values):
        raise ValueError(f"{len(truth)} labels but {len(values)} values")
    positive, negative = values[truth], values[~truth]
    if len(positive) == 0 or len(negative) == 0:
        return None
    above = (positive[:, None] > negative[None, :]).mean()  # (P, N) pairs
    tied = (positive[:, None] == negative[None, :]).mean()
    return float(above + tied / 2)


def ranked_decisions(truth: list[bool], values) -> np.ndarray:
    """Yes for the values above the k-th smallest, k = the number of negatives: as many yes as
    positives (ties at the threshold say no). With balanced classes the threshold is the median."""
    truth, values = np.asarray(truth, bool), np.asarray(values, np.float64)
    negatives = int((~truth).sum())
    if negatives == 0:
        return np.ones(len(values), bool)
    return values > np.sort(values)[negatives - 1]


def context_text(tokens: list, marked: set[int] = frozenset()) -> str:
    """The context as readable text, the tokens in ``marked`` (indices) inside ``<<`` ``>>``.

    Byte tokens are joined into whole characters first; a character made of several tokens is
    marked when one of them is. Consecutive marked pieces share one pair of marks.
    """
    if tokens and isinstance(tokens[0], (bytes, bytearray)):
        pieces = [(span.text, any(i in marked for i in span.tokens)) for span in display_spans(list(tokens))]
    else:
        pieces = [(str(token), i in marked) for i, token in enumerate(tokens)]
    out, inside = [], False
    for text, mark in pieces:
        if mark and not inside:
            out.append(OPEN)
        elif not mark and inside:
            out.append(CLOSE)
        inside = mark
        out.append(text)
    if inside:
        out.append(CLOSE)
    return "".join(out)


@dataclass
class Labelled:
    """A scoring context with its right answer: whether the neuron fires on it, and the tokens
    fuzzing marks when it does."""

    tokens: list
    active: bool
    marks: list[int]


def by_threshold(contexts: list[Context], threshold: float) -> list[Labelled]:
    """Active when a token's activation reaches ``threshold``; those tokens are its marks."""
    labelled = []
    for tokens, activations in contexts:
        marks = np.flatnonzero(np.asarray(activations) >= threshold).tolist()
        labelled.append(Labelled(tokens, bool(marks), marks))
    return labelled


def by_origin(contexts: list[Context], active: list[bool], fraction: float) -> list[Labelled]:
    """Active as drawn (``active`` per context); an active context's marks are the tokens reaching
    ``fraction`` of its own peak (delphi's per-example highlighting), at least its peak."""
    labelled = []
    for (tokens, activations), fires in zip(contexts, active, strict=True):
        values = np.asarray(activations, np.float64)
        marks = []
        if fires and len(values):
            peak = float(values.max())
            marks = np.flatnonzero(values >= fraction * peak).tolist() if peak > 0 else [int(values.argmax())]
        labelled.append(Labelled(tokens, bool(fires), marks))
    return labelled


@dataclass
class Sample:
    """One text the scorer judges, and whether the right answer is yes."""

    text: str
    truth: bool


@dataclass
class Score:
    """One classifier score (``None`` when one kind of context is missing): ``value`` the balanced
    accuracy, ``auc`` the AUROC; judged by the judge's log-odds or by its yes/no answers."""

    value: float | None
    positives: int
    negatives: int
    auc: float | None = None
    judged_by: str = "answers"  # or "log-odds"
    at_zero: float | None = None  # log-odds only: balanced accuracy of the plain answer (log-odds > 0)

    def as_dict(self) -> dict:
        out = {"score": self.value, "auc": self.auc, "n_activating": self.positives, "n_non_activating": self.negatives,
               "judged_by": self.judged_by}
        if self.judged_by == "log-odds":
            out["score_at_zero"] = self.at_zero
        return out


def detection_samples(contexts: list[Labelled]) -> list[Sample]:
    return [Sample(context_text(c.tokens), c.active) for c in contexts if c.active] + \
           [Sample(context_text(c.tokens), False) for c in contexts if not c.active]


def fuzzing_samples(contexts: list[Labelled], seed: int = 0) -> list[Sample]:
    """Active contexts marked at their marks (yes); inactive ones marked at random tokens, as many
    as a randomly chosen active context has (no)."""
    rng = np.random.default_rng(seed)
    active = [c for c in contexts if c.active]
    counts = [len(c.marks) for c in active]
    samples = [Sample(context_text(c.tokens, set(c.marks)), True) for c in active]
    for context in contexts:
        if context.active or not counts or not context.tokens:
            continue
        count = min(counts[int(rng.integers(len(counts)))], len(context.tokens))
        marked = set(rng.choice(len(context.tokens), size=count, replace=False).tolist())
        samples.append(Sample(context_text(context.tokens, marked), False))
    return samples


def samples_for(task: str, contexts: list[Labelled], seed: int = 0) -> list[Sample]:
    if task == "detection":
        return detection_samples(contexts)
    if task == "fuzzing":
        return fuzzing_samples(contexts, seed)
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")


def judged(judge, explanation: str, task: str, contexts: list[Context], threshold: float, seed: int = 0) -> Score:
    """The score of ``judge`` on the samples of ``task`` built from ``contexts`` (labelled by ``threshold``)."""
    return judged_labelled(judge, explanation, task, by_threshold(contexts, threshold), seed)


def judged_labelled(judge, explanation: str, task: str, contexts: list[Labelled], seed: int = 0) -> Score:
    """The score of ``judge`` on the samples of ``task`` built from labelled contexts: from its
    log-odds when it gives them, else from its yes/no answers."""
    samples = samples_for(task, contexts, seed)
    order = np.random.default_rng(seed + 1).permutation(len(samples))  # a chat batch mixes both kinds
    samples = [samples[i] for i in order]
    truth = [s.truth for s in samples]
    positives, negatives = sum(truth), len(samples) - sum(truth)
    if positives == 0 or negatives == 0:  # nothing to tell apart: no calls
        return Score(None, positives, negatives, judged_by="log-odds" if hasattr(judge, "judge_log_odds") else "answers")
    texts = [s.text for s in samples]
    if hasattr(judge, "judge_log_odds"):
        odds = np.asarray(judge.judge_log_odds(explanation, texts, task), np.float64)  # (N,)
        return Score(balanced_accuracy(truth, ranked_decisions(truth, odds)), positives, negatives,
                     auroc(truth, odds), "log-odds", balanced_accuracy(truth, odds > 0))
    answers = judge.judge(explanation, texts, task)
    return Score(balanced_accuracy(truth, answers), positives, negatives, auroc(truth, np.asarray(answers, float)))
