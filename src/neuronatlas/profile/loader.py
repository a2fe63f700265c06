"""The model to profile: loaded already, or loaded on demand on this process's device."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NeuronAtlasError
from ..loading import input_device, load_config, load_model, resolve_device
from .options import ProfileOptions, resolve_max_length


class ModelLoader:
    """A model given by name (loaded by :meth:`load`, after the device is known) or already loaded."""

    def __init__(self, model, tokenizer, device: str, device_map: str | None, load_in: str | None, dtype: str,
                 trust_remote_code: bool, quiet: bool):
        self.model, self.tokenizer, self.device, self.device_map, self.load_in = model, tokenizer, device, device_map, load_in
        self.dtype, self.trust_remote_code, self.quiet = dtype, trust_remote_code, quiet
        self.loaded = not isinstance(model, (str, Path))
        if self.loaded and tokenizer is None:
            raise NeuronAtlasError("a loaded model needs its tokenizer: profile(model, corpus, out, tokenizer=...)")

    @property
    def name(self) -> str:
        return str(self.model) if not self.loaded else str(getattr(self.model, "name_or_path", ""))

    def comm_device(self) -> torch.device:
        """Where this process's collective tensors live under torchrun."""
        if self.loaded:
            return input_device(self.model)
        if self.device_map is not None or self.load_in is not None:
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return resolve_device(self.device)

    def load(self, options: ProfileOptions):
        """(model, tokenizer), loading them unless given loaded."""
        if self.loaded:
            return self.model, self.tokenizer
        config = load_config(str(self.model), self.trust_remote_code)
        resolve_max_length(config, options.max_length)  # fail before loading weights
        return load_model(str(self.model), self.device, options.dtype, self.trust_remote_code, quiet=self.quiet,
                          device_map=self.device_map, load_in=self.load_in)
