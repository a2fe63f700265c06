"""How TEAL/WINA share a block's sparsity among its projection inputs: uniform, or TEAL's greedy.

A block's projections read four inputs (*groups*): ``qkv`` (the attention input, read by q, k, v),
``o`` (the heads' output), ``up`` (the FFN input x, read by up and gate) and ``down`` (z). The
``scope`` says which are sparsified (``mlp``: up and down; ``all``: the four). A plan's sparsity
is the share of the in-scope weight bytes skipped: the byte-weighted average of the groups'
sparsities, ``sum_g s_g * size_g / sum_g size_g`` (size_g = weights reading group g's input).

Greedy (TEAL, Liu et al. 2024): from all groups at 0, repeatedly raise by ``step`` the sparsity of
the group whose raise adds least error to the block's output per weight byte skipped, the error
being measured by replaying recorded calibration calls of the block (dense inputs) with the
inputs thresholded; stop when the average reaches ``top``. The plan keeps the whole path
(``allocation.<layer>``, (S, G): the groups' sparsities after each step), so one calibration
serves every target: :func:`at_target` interpolates along it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GROUPS = ("qkv", "o", "up", "down")
GROUP_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "o": "o", "gate": "up", "up": "up", "down": "down"}
SCOPES = {"mlp": ("up", "down"), "all": GROUPS}
ALLOCATIONS = ("uniform", "greedy")
MAX_GROUP_SPARSITY = 0.95  # no input is ever dropped whole
DEFAULT_STEP = 0.05
DEFAULT_TOP = 0.9  # the path ends at this average; beyond, every group rises alike


def group_sizes(weights: dict[str, torch.Tensor], groups: tuple[str, ...]) -> torch.Tensor:
    """(G,) elements of the weights reading each group's input; ``weights``: role -> (out, in)."""
    sizes = torch.zeros(len(groups), dtype=torch.float64)
    for role, weight in weights.items():
        if GROUP_OF[role] in groups:
            sizes[groups.index(GROUP_OF[role])] += weight.numel()
    return sizes


def greedy_path(error: Callable[[torch.Tensor], float], sizes: torch.Tensor, step: float = DEFAULT_STEP,
                top: float = DEFAULT_TOP) -> torch.Tensor:
    """(S, G) the groups' sparsities after each greedy step, from zeros up to average ``top``.

    ``error(sparsities (G,))``: the block's output error with each group at that sparsity. Lazy
    evaluation: a group's cost (error added per share of bytes skipped) is re-measured only when
    it is the cheapest known; raising one group rarely lowers another's cost, so a re-measured cost
    still below every other known cost is taken (1-2 block replays a step instead of one per group).
    """
    shares = sizes / sizes.sum()
    state = torch.zeros(len(sizes), dtype=torch.float64)
    path, current = [state.clone()], error(state)
    known = {g: (float("-inf"), None) for g in range(len(sizes)) if sizes[g] > 0}  # group -> (cost, error) or stale
    fresh: set[int] = set()
    while float(state @ shares) < top - 1e-9 and known:
        group = min(known, key=lambda g: known[g][0])
        if group not in fresh:  # stale: measure it at the current state, then choose again
            trial = state.clone()
            trial[group] += step
            value = error(trial)
            known[group] = ((value - current) / float(shares[group]), value)
            fresh.add(group)
            continue
        state[group] += step
        current = known[group][1]
        path.append(state.clone())
        fresh.clear()  # every cost was measured at the previous state
        if state[group] + step > MAX_GROUP_SPARSITY + 1e-9:
            del known[group]
    return torch.stack(path).float()


def at_target(path: torch.Tensor, sizes: torch.Tensor, target: float) -> torch.Tensor:
    """(G,) the groups' sparsities whose byte-weighted average is ``target``, along ``path`` (S, G)."""
    shares = (sizes / sizes.sum()).to(path.dtype)
    averages = path @ shares  # (S,) increasing
    if target <= 0:
        return torch.zeros_like(path[0])
    last = float(averages[-1])
    if target >= last:  # past the path: raise every group alike towards 1
        fraction = (target - last) / max(1 - last, 1e-9)
        return path[-1] + fraction * (1 - path[-1])
    after = int(torch.searchsorted(averages.contiguous(), torch.tensor(target, dtype=averages.dtype)))
    before = after - 1
    span = float(averages[after] - averages[before])
    fraction = 0.0 if span <= 0 else (target - float(averages[before])) / span
    return path[before] + fraction * (path[after] - path[before])


def uniform(sizes: torch.Tensor, target: float) -> torch.Tensor:
    return torch.full((len(sizes),), float(target))
