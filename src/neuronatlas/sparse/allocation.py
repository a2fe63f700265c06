"""How TEAL/WINA share a block's sparsity among its projections: uniform, or TEAL's greedy.

A block's projections read four inputs (*groups*): ``qkv`` (the attention input, read by q, k, v),
``o`` (the heads' output), ``up`` (the FFN input x, read by up and gate) and ``down`` (z). The
``scope`` says which are sparsified (``mlp``: up and down; ``all``: the four). A plan's sparsity
is the share of the in-scope weight bytes skipped: the byte-weighted average of the projections'
sparsities, ``sum_u s_u * size_u / sum_u size_u``.

Greedy (TEAL, Liu et al. 2024, Algorithm 1 and the released ``greedyopt.py``): the *units* are the
block's projections (q, k, v, o, gate, up, down; ``units="projection"``, as published) or its input
groups (``units="input"``: q/k/v and gate/up keep one shared mask, TEAL's fastest kernel). From all
units at 0, each step raises one unit by ``step * reference / size_u`` (the published base step
scaled so that every step skips the same bytes: ``reference`` is the size of o, the size of q in
Llama), choosing the unit whose raise gives the least block-output error (``search="exact"``: every
unit tried at every step, as published; ``"lazy"``: a unit's cost re-measured only when it is the
cheapest known, 1-2 block replays a step instead of one per unit), until the average reaches
``top``. The plan keeps the whole path (``allocation.<layer>``, (S, U): the units' sparsities after
each step), so one calibration serves every target: :func:`at_target` interpolates along it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GROUPS = ("qkv", "o", "up", "down")
GROUP_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "o": "o", "gate": "up", "up": "up", "down": "down"}
PROJECTIONS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")  # allocation order of projection units
SCOPES = {"mlp": ("up", "down"), "all": GROUPS}
ALLOCATIONS = ("uniform", "greedy")
UNITS = ("projection", "input")
SEARCHES = ("exact", "lazy")
AUTO = "auto"  # projection units; the search chosen by the device: exact on a GPU, lazy on a CPU


def resolve_greedy(units: str, search: str, device) -> tuple[str, str]:
    """``"auto"`` units and search: the published projection units everywhere (input units, one
    sparsity for q/k/v and one for gate/up, lost to the uniform allocation on SmolLM2-135M); the
    published exact search on a GPU, the lazy one on a CPU (SmolLM2, 128 replayed tokens, step 0.05,
    2 cores: 100 s against 401 s for exact, at a perplexity between exact's and uniform's)."""
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    return ("projection" if units == AUTO else units, ("lazy" if on_cpu else "exact") if search == AUTO else search)
MAX_UNIT_SPARSITY = 0.95  # no projection's input is ever dropped whole
DEFAULT_STEP = 0.05  # TEAL's base step (on a projection the size of o)
DEFAULT_TOP = 0.9  # the path ends at this average; beyond, every unit rises alike


def unit_of(role: str, units: str) -> str:
    return role if units == "projection" else GROUP_OF[role]


def unit_order(roles, units: str) -> tuple[str, ...]:
    """The allocation units the roles make, in allocation order (a plan's path columns)."""
    present = {unit_of(role, units) for role in roles}
    return tuple(unit for unit in (PROJECTIONS if units == "projection" else GROUPS) if unit in present)


def unit_sizes(weights: dict[str, torch.Tensor], units: tuple[str, ...], kind: str = "input") -> torch.Tensor:
    """(U,) elements of the weights in each unit; ``weights``: role -> (out, in)."""
    sizes = torch.zeros(len(units), dtype=torch.float64)
    for role, weight in weights.items():
        if unit_of(role, kind) in units:
            sizes[units.index(unit_of(role, kind))] += weight.numel()
    return sizes


def unit_steps(sizes: torch.Tensor, step: float, reference: float | None = None) -> torch.Tensor:
    """(U,) sparsity added to each unit by one greedy step: ``step * reference / size``, equal bytes.

    ``reference`` (elements): TEAL's is the size of q (o in :mod:`.teal`, the same size in Llama);
    by default the smallest unit's, so no unit's step exceeds ``step``.
    """
    reference = float(sizes[sizes > 0].min()) if reference is None else reference
    safe = sizes.where(sizes > 0, torch.ones_like(sizes))  # empty units take no step
    return torch.where(sizes > 0, step * reference / safe, torch.zeros_like(sizes))


def greedy_path(error: Callable[[torch.Tensor], float], sizes: torch.Tensor, step: float = DEFAULT_STEP,
                top: float = DEFAULT_TOP, reference: float | None = None, search: str = "exact") -> torch.Tensor:
    """(S, U) the units' sparsities after each greedy step, from zeros up to average ``top``.

    ``error(sparsities (U,))``: the block's output error with each unit at that sparsity. A step
    raises the unit with the least added error per byte skipped (all steps skip the same bytes
    unless a unit is near :data:`MAX_UNIT_SPARSITY`, so this is TEAL's least error). ``lazy``:
    costs are re-measured only for the cheapest known unit; a re-measured cost still below every
    other known one is taken (exact when raising one unit never lowers another's cost).
    """
    shares = sizes / sizes.sum()
    steps = unit_steps(sizes, step, reference)
    state = torch.zeros(len(sizes), dtype=torch.float64)
    path, current = [state.clone()], error(state)
    open_units = [u for u in range(len(sizes)) if sizes[u] > 0]
    known = {u: (float("-inf"), None) for u in open_units}  # unit -> (cost, error), stale until re-measured
    while float(state @ shares) < top - 1e-9 and known:
        fresh = set()
        if search == "exact":
            for unit in known:
                known[unit] = _measure(error, state, unit, steps, shares, current)
            fresh = set(known)
        while True:
            unit = min(known, key=lambda u: known[u][0])
            if unit in fresh:
                break
            known[unit] = _measure(error, state, unit, steps, shares, current)
            fresh.add(unit)
        state[unit] = min(state[unit] + steps[unit], MAX_UNIT_SPARSITY)
        current = known[unit][1]
        path.append(state.clone())
        if state[unit] >= MAX_UNIT_SPARSITY - 1e-9:
            del known[unit]
    return torch.stack(path).float()


def _measure(error, state: torch.Tensor, unit: int, steps: torch.Tensor, shares: torch.Tensor, current: float):
    """(added error per share of bytes skipped, error) of raising ``unit`` one step from ``state``."""
    trial = state.clone()
    trial[unit] = min(trial[unit] + steps[unit], MAX_UNIT_SPARSITY)
    value = error(trial)
    return (value - current) / float((trial[unit] - state[unit]) * shares[unit]), value


def at_target(path: torch.Tensor, sizes: torch.Tensor, target: float) -> torch.Tensor:
    """(U,) the units' sparsities whose byte-weighted average is ``target``, along ``path`` (S, U)."""
    shares = (sizes / sizes.sum()).to(path.dtype)
    averages = path @ shares  # (S,) increasing
    if target <= 0:
        return torch.zeros_like(path[0])
    last = float(averages[-1])
    if target >= last:  # past the path: raise every unit alike towards 1
        fraction = (target - last) / max(1 - last, 1e-9)
        return path[-1] + fraction * (1 - path[-1])
    after = int(torch.searchsorted(averages.contiguous(), torch.tensor(target, dtype=averages.dtype)))
    before = after - 1
    span = float(averages[after] - averages[before])
    fraction = 0.0 if span <= 0 else (target - float(averages[before])) / span
    return path[before] + fraction * (path[after] - path[before])


def uniform(sizes: torch.Tensor, target: float) -> torch.Tensor:
    return torch.full((len(sizes),), float(target))
