"""One way to hook a site (in the spirit of baukit's ``Trace``), and one way to run a padded batch.

Every hook is attached by a context manager and removed when its ``with`` block exits, also after
an exception. The sites of block ``l`` (see :mod:`neuronatlas.models.base`):

=================  ================================================  =========================
``before_up``      x, the input of the up (and gate) projection      (B, T, d_model)
``before_down``    z, the neuron activation: input of the down proj  (B, T, d_ff)
``after_act``      g, the gate signal act(gate(x)) of gated MLPs     (B, T, d_ff)
=================  ================================================  =========================

Some families (OPT) flatten (B, T) to (B * T,): a site function sees the tensor as the module does.
A site function ``fn(layer, tensor)`` returns None to leave the tensor as it is, or a tensor of the
same shape that replaces it. :func:`before` and :func:`after` hook any other module (the final
norm, a block, the model) with torch's own hook signatures.

>>> with hook_sites(neurons, before_down=lambda layer, z: z * 2, layers=[0]):  # doctest: +SKIP
...     model(**batch)                      # block 0's neurons doubled, the hook gone afterwards
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import NeuronAtlasError
from .models import ModelNeurons

Callback = Callable[[int, torch.Tensor], None]  # reads (layer, tensor)
SiteFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]  # reads (layer, tensor), may replace it


@contextmanager
def hook_sites(
    neurons: ModelNeurons,
    *,
    before_up: SiteFn | None = None,
    before_down: SiteFn | None = None,
    after_act: SiteFn | None = None,
    layers: Sequence[int] | None = None,
) -> Iterator[ModelNeurons]:
    """Call the site functions on ``layers`` (default: all) during every forward inside the block."""
    if after_act is not None and not neurons.gated:
        raise NeuronAtlasError(f"the gate signal needs a gated MLP, but {neurons.model_type} has none; use z")
    chosen = neurons.layers if layers is None else [neurons.layers[index] for index in layers]
    handles = []
    try:
        for layer in chosen:
            if before_up is not None:
                handles.append(layer.up.register_forward_pre_hook(_input_hook(before_up, layer.index)))
            if before_down is not None:
                handles.append(layer.down.register_forward_pre_hook(_input_hook(before_down, layer.index)))
            if after_act is not None:
                handles.append(layer.act.register_forward_hook(_output_hook(after_act, layer.index)))
        yield neurons
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(fn: SiteFn, index: int):
    def hook(module, args):
        new = fn(index, args[0])
        return None if new is None else (new, *args[1:])

    return hook


def _output_hook(fn: SiteFn, index: int):
    def hook(module, args, output):
        return fn(index, output)

    return hook


@contextmanager
def before(module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> Iterator[None]:
    """A forward pre-hook on any module: ``fn(module, args)`` (``fn(module, args, kwargs)`` with_kwargs)."""
    handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def after(module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> Iterator[None]:
    """A forward hook on any module: ``fn(module, args, output)`` (``fn(module, args, kwargs, output)``)."""
    handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(
    neurons: ModelNeurons,
    on_activation: Callback | None = None,
    on_gate: Callback | None = None,
) -> Iterator[None]:
    """Call ``on_activation(l, z)`` with each block's z and ``on_gate(l, g)`` with its gate signal.

    The callbacks only read (what they return is dropped): the model's outputs stay bit-identical
    to running it without hooks. ``on_gate`` is ignored for families without a gate.
    """
    with hook_sites(neurons, before_down=_read_only(on_activation),
                    after_act=_read_only(on_gate) if neurons.gated else None):
        yield


def _read_only(callback: Callback | None) -> SiteFn | None:
    if callback is None:
        return None

    def read(layer: int, tensor: torch.Tensor) -> None:
        callback(layer, tensor)

    return read


@contextmanager
def capture_activations(neurons: ModelNeurons, batch_shape: tuple[int, int] | None = None
                        ) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: z} of the forwards run inside the block (the last one wins), detached.

    With ``batch_shape`` = (B, T) every z is (B, T, d_ff), also where a family flattens it.
    """
    seen: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        seen[layer] = z.detach() if batch_shape is None else z.detach().reshape(*batch_shape, -1)

    with capture(neurons, keep):
        yield seen


# ---- one padded batch, run as the profiler runs it ----------------------------------------------


def pad_token_id(tokenizer) -> int:
    """The id that fills padded slots: the pad token, else end-of-sequence, else 0. Padded slots are
    masked out of attention and of every statistic, so any id works; these keep embeddings in range."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def window_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its window: 0 at the first real token, whichever side pads."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def takes_position_ids(module) -> bool:
    return "position_ids" in inspect.signature(module.forward).parameters


def with_cache(model, cache) -> dict:
    """The keyword that hands ``model`` its KV cache: ``cache`` in transformers that renamed
    ``past_key_values`` (and warn on the old name), else ``past_key_values``."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class) -> str:  # read once per class: decode steps are timed
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def activation_module(model):
    """The model without its LM head: the forward that reading activations needs (the head's logits,
    (B, T, V), are the largest tensor and a fifth of a SmolLM2 forward's time). The hooks sit inside it."""
    return model.base_model if hasattr(model, "base_model") else model


def forward_batch(module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """Run ``module`` (a model or its base) on one padded batch as the profiler does.

    input_ids, attention_mask: (B, T) on the module's input device. Position ids count real tokens
    only, so a left-padded row sees the same positions as the same text unpadded; no KV cache is
    kept. Extra ``kwargs`` pass through.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "use_cache": False, **kwargs}
    if takes_position_ids(module):
        kwargs.setdefault("position_ids", window_positions(attention_mask))
    return module(**kwargs)


__all__ = ["hook_sites", "before", "after", "capture", "capture_activations", "pad_token_id", "window_positions",
           "takes_position_ids", "activation_module", "forward_batch", "with_cache", "returned_cache"]
