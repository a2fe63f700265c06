"""Scoring: the correlation of simulated and real activations (Bills et al. 2023, correlation scoring).

Tokens of all excerpts of a kind are pooled: ``top`` over held-out top exemplars, ``random`` over
random exemplars, ``all`` over both. A correlation is undefined (None, ``null`` in JSON) when either
side is constant over the pooled tokens (a constant simulation, or a neuron constant on that text)
or there are fewer than two tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Pair = tuple[np.ndarray, np.ndarray]  # simulated (T,), real (T,) of one excerpt


@dataclass(frozen=True)
class Scores:
    all: float | None
    top: float | None
    random: float | None


def correlation(simulated: np.ndarray, real: np.ndarray) -> float | None:
    """Pearson correlation, or None when undefined."""
    x, y = np.asarray(simulated, np.float64), np.asarray(real, np.float64)
    if len(x) != len(y):
        raise ValueError(f"simulated and real activations differ in length: {len(x)} vs {len(y)}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def pooled(pairs: list[Pair]) -> float | None:
    if not pairs:
        return None
    return correlation(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))


def score(top: list[Pair], random: list[Pair]) -> Scores:
    return Scores(all=pooled(top + random), top=pooled(top), random=pooled(random))
