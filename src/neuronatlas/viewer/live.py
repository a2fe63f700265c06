"""The model behind the viewer, loaded on first use: vocabulary projection and live text.

The model is the atlas's (atlas.json's model name_or_path) unless another path is given; it must
have the atlas's fingerprint, so that what a page shows belongs to the atlas's neurons. When it
cannot be loaded the reason is kept and every page shows it instead of failing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..errors import NeuronAtlasError
from ..hooks import capture
from ..tokens import token_texts

PROJECTION_CACHE = 4096  # neurons whose vocabulary projection is kept
VIEWER_SAMPLES = {"bands": 10, "per_band": 2, "non_activating": 5, "seed": 0}  # see neuronatlas.samples


class ModelUnavailable(Exception):
    """The model cannot be loaded; the message says why."""


class LiveModel:
    """Loads the model once (thread-safe), caches vocabulary projections, runs live text."""

    def __init__(self, name_or_path: str, fingerprint: str | None, device: str = "cpu", dtype: str = "float32",
                 top_tokens: int = 20, max_tokens: int = 256):
        self.name_or_path = name_or_path
        self.fingerprint = fingerprint
        self.device, self.dtype = device, dtype
        self.top_tokens = top_tokens
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._loaded = None  # (model, tokenizer, neurons)
        self._failure: str | None = None
        self._projections: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._vocabulary: list[str] | None = None

    def load(self):
        """(model, tokenizer, neurons); raises ModelUnavailable with the reason."""
        with self._lock:
            if self._loaded is None and self._failure is None:
                try:
                    self._loaded = self._load()
                except Exception as error:  # whatever the cause, the pages show it instead of failing
                    self._failure = f"the model {self.name_or_path} could not be loaded: {error}"
            if self._failure is not None:
                raise ModelUnavailable(self._failure)
            return self._loaded

    def _load(self):
        from ..loading import load_model, model_fingerprint
        from ..models import locate_neurons

        model, tokenizer = load_model(self.name_or_path, device=self.device, dtype=self.dtype, quiet=True)
        if self.fingerprint and model_fingerprint(model) != self.fingerprint:
            raise NeuronAtlasError(f"it is not the atlas's model (fingerprint {model_fingerprint(model)}, "
                                   f"the atlas's is {self.fingerprint}); pass the right one with --model")
        return model, tokenizer, locate_neurons(model)

    def projection(self, layer: int, index: int) -> dict:
        """{"promoted": [{"id", "token", "logit"}], "suppressed": [...]} of one neuron, cached."""
        from ..methods.vocab import vocab_projection

        key = (layer, index)
        model, tokenizer, _ = self.load()
        with self._lock:
            if key not in self._projections:
                self._projections[key] = vocab_projection(model, layer, index, top=self.top_tokens, tokenizer=tokenizer)
                if len(self._projections) > PROJECTION_CACHE:
                    self._projections.popitem(last=False)
            self._projections.move_to_end(key)
            return self._projections[key]

    def samples(self, atlas, neuron: tuple[int, int]):
        """One neuron's quantile and non-activating samples (:func:`neuronatlas.samples.sample_contexts` over the
        atlas's corpus), drawn once and cached in the atlas's samples/ folder."""
        from ..samples import cached_samples, sample_contexts

        model, tokenizer, _ = self.load()

        def draw(missing, **options):
            return sample_contexts(model, tokenizer, atlas, missing, **options)

        with self._lock:
            return cached_samples(atlas.path, atlas.meta, [neuron], draw, **VIEWER_SAMPLES)[neuron]

    @torch.no_grad()
    def neurons_promoting(self, token_ids: list[int], limit: int) -> list[dict]:
        """Neurons whose value vector gives these tokens the highest logit (W_U[t] · w_out), over all layers."""
        from ..methods.vocab import unembedding

        model, _, neurons = self.load()
        if not token_ids:
            return []
        with self._lock:
            rows = unembedding(model).float()[token_ids]  # (T, d_model)
            found = []
            for layer in neurons.layers:
                logits = rows @ layer.w_out().detach().float().to(rows.device)  # (T, D)
                best, token = logits.max(0)
                top = best.topk(min(limit, best.numel()))
                found += [{"layer": layer.index, "index": int(j), "logit": float(v), "token_id": token_ids[int(token[j])]}
                          for v, j in zip(top.values.tolist(), top.indices.tolist())]
        return sorted(found, key=lambda item: -item["logit"])[:limit]

    def vocabulary_ids(self, text: str) -> list[int]:
        """Ids of the tokenizer's tokens that decode to ``text`` (ignoring case and surrounding spaces)."""
        _, tokenizer, _ = self.load()
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = [t.strip().casefold() for t in token_texts(tokenizer, range(len(tokenizer)))]
        wanted = text.strip().casefold()
        return [i for i, token in enumerate(self._vocabulary) if token == wanted] if wanted else []

    @torch.no_grad()
    def run(self, text: str, neuron: tuple[int, int] | None = None, top: int = 20) -> dict:
        """Activations on ``text`` (at most ``max_tokens`` tokens).

        Returns {"token_ids", "tokens", "truncated", "max_tokens", "top": the ``top`` neurons with the
        highest activation on any token, each {"layer", "index", "max", "activations"} (one per
        token)}, and "neuron" with the same fields for the neuron asked for.
        """
        model, tokenizer, neurons = self.load()
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_tokens)
        ids = encoded["input_ids"][0].tolist()
        per_layer: dict[int, torch.Tensor] = {}

        def keep(layer: int, z: torch.Tensor) -> None:
            per_layer[layer] = z.reshape(-1, z.shape[-1]).float().cpu()  # (T, D)

        with self._lock, capture(neurons, on_activation=keep):
            model(**{k: v.to(next(model.parameters()).device) for k, v in encoded.items()})
        full = len(tokenizer(text)["input_ids"])
        result = {"token_ids": ids, "tokens": token_texts(tokenizer, ids), "truncated": full > len(ids),
                  "max_tokens": self.max_tokens, "top": _most_active(per_layer, top)}
        if neuron is not None:
            layer, index = neuron
            values = per_layer[layer][:, index]
            result["neuron"] = {"layer": layer, "index": index, "max": float(values.max()), "activations": values.tolist()}
        return result


def _most_active(per_layer: dict[int, torch.Tensor], top: int) -> list[dict]:
    """The ``top`` neurons with the highest activation on any token, over all layers."""
    candidates = []
    for layer, z in per_layer.items():  # z: (T, D)
        peak = z.max(0).values
        best = peak.topk(min(top, peak.numel()))
        candidates += [(float(v), layer, int(j)) for v, j in zip(best.values.tolist(), best.indices.tolist())]
    candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [{"layer": layer, "index": index, "max": value, "activations": per_layer[layer][:, index].tolist()}
            for value, layer, index in candidates[:top]]
