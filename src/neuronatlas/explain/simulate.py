"""Simulation: predicted activations 0-10 for every token of an excerpt, from an explanation alone.

Local models (Bills et al. 2023, "all at once"): one forward pass over a prompt listing every token
as ``token<TAB>unknown``; at each token's slot the model's next-token distribution, restricted to
the number tokens "0".."10" and renormalised, gives the expected activation. Numbers that the
tokenizer does not write as one token (often "10") are left out of that expectation.

Chat endpoints answer JSON ``{"activations": [...]}``, parsed strictly (see :func:`parse_simulation`).
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from ..errors import NeuronAtlasError

LEVELS = range(11)


def number_token_ids(tokenizer, before: str = "\t") -> dict[int, int]:
    """{number: token id} for the numbers 0-10 that are one token when written right after ``before``."""
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    found = {}
    for number in LEVELS:
        ids = tokenizer(before + str(number), add_special_tokens=False)["input_ids"]
        if ids[: len(prefix)] == prefix and len(ids) == len(prefix) + 1:
            found[number] = ids[-1]
    if len(found) < 2:
        raise NeuronAtlasError(
            f"the simulator's tokenizer writes fewer than two of the numbers 0-10 as single tokens (found {sorted(found)}); "
            "use another simulator model"
        )
    return found


def expected_levels(logits: torch.Tensor, numbers: dict[int, int]) -> np.ndarray:
    """(N,) expected activation at N slots from their (N, V) next-token logits, over the number tokens."""
    ids = torch.tensor(list(numbers.values()), device=logits.device)
    values = torch.tensor(list(numbers), dtype=torch.float64, device=logits.device)
    probs = torch.softmax(logits[:, ids].double(), dim=-1)  # (N, numbers), renormalised over the numbers
    return (probs @ values).cpu().numpy()


def parse_simulation(reply: str, count: int, who: str) -> np.ndarray:
    """The ``count`` activations of a chat reply ``{"activations": [...]}`` (a ```json fence is allowed)."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", reply.strip())
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise NeuronAtlasError(f"the simulator {who} answered text that is not JSON ({_preview(reply)}); use a model that follows the JSON instruction") from None
    values = data.get("activations") if isinstance(data, dict) else None
    if not isinstance(values, list):
        raise NeuronAtlasError(f"the simulator {who} answered JSON without an \"activations\" list ({_preview(reply)})")
    if len(values) != count:
        raise NeuronAtlasError(f"the simulator {who} answered {len(values)} activations for {count} tokens; use a stronger simulator model")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 10 for v in values):
        raise NeuronAtlasError(f"the simulator {who} answered activations outside numbers 0-10 ({_preview(reply)})")
    return np.asarray(values, np.float64)


def parse_judgements(reply: str, count: int, who: str) -> list[bool]:
    """The ``count`` yes/no answers of a chat reply: a JSON list of 0/1 (or true/false), the first
    ``[...]`` in the reply as delphi reads it (a ```json fence or text around it is allowed)."""
    match = re.search(r"\[.*?\]", reply, re.S)
    try:
        values = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list):
        raise NeuronAtlasError(f"the scorer {who} answered without a JSON list of 0/1 ({_preview(reply)}); use a model that follows the JSON instruction")
    if len(values) != count:
        raise NeuronAtlasError(f"the scorer {who} answered {len(values)} judgements for {count} examples; use a stronger scorer model")
    if not all(v in (0, 1) for v in values):  # True/False compare equal to 1/0
        raise NeuronAtlasError(f"the scorer {who} answered judgements other than 0 and 1 ({_preview(reply)})")
    return [bool(v) for v in values]


def _preview(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")
