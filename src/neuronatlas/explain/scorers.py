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
activations (T,) the neuron's value at each token. A token is active when its activation reaches
``threshold``; a context is active when one of its tokens is.

A judge is any object with ``judge(explanation, texts, task) -> list[bool]`` (task "detection" or
"fuzzing"; one answer per text): the local model and the chat endpoint of :mod:`.llm` are two.
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
class Sample:
    """One text the scorer judges, and whether the right answer is yes."""

    text: str
    truth: bool


@dataclass
class Score:
    """A balanced accuracy and the contexts behind it (``None`` when one kind is missing)."""

    value: float | None
    positives: int
    negatives: int

    def as_dict(self) -> dict:
        return {"score": self.value, "n_activating": self.positives, "n_non_activating": self.negatives}


def split_active(contexts: list[Context], threshold: float) -> tuple[list[Context], list[Context]]:
    """(active, inactive) contexts: active when a token's activation reaches ``threshold``."""
    active = [c for c in contexts if len(c[1]) and float(np.max(c[1])) >= threshold]
    inactive = [c for c in contexts if not (len(c[1]) and float(np.max(c[1])) >= threshold)]
    return active, inactive


def detection_samples(contexts: list[Context], threshold: float) -> list[Sample]:
    active, inactive = split_active(contexts, threshold)
    return [Sample(context_text(c[0]), True) for c in active] + [Sample(context_text(c[0]), False) for c in inactive]


def fuzzing_samples(contexts: list[Context], threshold: float, seed: int = 0) -> list[Sample]:
    """Active contexts marked at their active tokens (yes); inactive ones marked at random tokens,
    as many as a randomly chosen active context has (no)."""
    rng = np.random.default_rng(seed)
    active, inactive = split_active(contexts, threshold)
    counts = [int((np.asarray(a) >= threshold).sum()) for _, a in active]
    samples = [Sample(context_text(t, set(np.flatnonzero(np.asarray(a) >= threshold).tolist())), True) for t, a in active]
    for tokens, _ in inactive:
        if not counts or not tokens:
            continue
        count = min(counts[int(rng.integers(len(counts)))], len(tokens))
        marked = set(rng.choice(len(tokens), size=count, replace=False).tolist())
        samples.append(Sample(context_text(tokens, marked), False))
    return samples


def samples_for(task: str, contexts: list[Context], threshold: float, seed: int = 0) -> list[Sample]:
    if task == "detection":
        return detection_samples(contexts, threshold)
    if task == "fuzzing":
        return fuzzing_samples(contexts, threshold, seed)
    raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")


def judged(judge, explanation: str, task: str, contexts: list[Context], threshold: float, seed: int = 0) -> Score:
    """The balanced accuracy of ``judge``'s answers on the samples of ``task`` built from ``contexts``."""
    samples = samples_for(task, contexts, threshold, seed)
    order = np.random.default_rng(seed + 1).permutation(len(samples))  # a chat batch mixes both kinds
    samples = [samples[i] for i in order]
    positives = sum(s.truth for s in samples)
    if not samples or positives == 0 or positives == len(samples):  # nothing to tell apart: no calls
        return Score(None, positives, len(samples) - positives)
    answers = judge.judge(explanation, [s.text for s in samples], task)
    return Score(balanced_accuracy([s.truth for s in samples], answers), positives, len(samples) - positives)
