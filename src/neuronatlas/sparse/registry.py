"""The sparse methods by name: the one list to extend when adding a method (see :mod:`.method`)."""

from __future__ import annotations

from ..errors import NeuronAtlasError
from ..models import is_encoder, site_for
from . import cats, coreinfer, hot, moe, teal, wina
from .method import SparseMethod

MODULES = (teal, wina, cats, coreinfer, hot, moe)  # the CLI lists the methods in this order

METHODS: dict[str, SparseMethod] = {module.METHOD.name: module.METHOD for module in MODULES}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def method_named(name: str) -> SparseMethod:
    if name not in METHODS:
        raise NeuronAtlasError(f"unknown sparse method {name!r}; use one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def check_support(name: str, config) -> SparseMethod:
    """The method called ``name``, refusing method/family pairs that cannot work (``config``: the model's)."""
    method = method_named(name)
    encoder, gated = is_encoder(config), site_for(config.model_type).gated
    if method.needs_decoding and encoder:
        why = f"{name} {method.needs_decoding}; {config.model_type} is an encoder with no decoding"
    elif method.needs_gate and not gated:
        why = f"{name} {method.needs_gate}; {config.model_type}'s MLP has no gate"
    else:
        return method
    usable = [other for other, candidate in METHODS.items()
              if not (candidate.needs_decoding and encoder) and not (candidate.needs_gate and not gated)]
    raise NeuronAtlasError(f"{why}: use {', '.join(usable[:-1])} or {usable[-1]} for it")
