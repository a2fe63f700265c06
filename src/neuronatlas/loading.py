"""Load any Hugging Face model and tokenizer by id or local path, and fingerprint it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from .errors import NeuronAtlasError
from .models import site_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENCODER_TYPES = ("bert", "roberta")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise NeuronAtlasError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeuronAtlasError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise NeuronAtlasError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config, with clear errors for a missing path or an unreachable hub id."""
    from transformers import AutoConfig

    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise NeuronAtlasError(f"model path not found: {name_or_path} (give a local model folder or a Hugging Face id)")
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise NeuronAtlasError(
            f"could not load model config {name_or_path!r}: {first_line} "
            "(check the id or path; pass --trust-remote-code only for models you trust)"
        ) from error


def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    quiet: bool = False,
    device_map: str | None = None,
    load_in: str | None = None,
):
    """(model, tokenizer) for a supported family, in eval mode on ``device``.

    ``device_map`` ("auto", "balanced", "sequential" ...) lets accelerate spread a model larger than
    one device over the GPUs and the CPU instead; ``load_in`` ("8bit" or "4bit") quantises the
    linear layers with bitsandbytes. Sharded safetensors checkpoints load like single files.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = load_config(name_or_path, trust_remote_code)
    site_for(config.model_type)  # unsupported families fail here, before loading weights
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    placement = _placement(device_map, load_in, torch_device)
    auto = AutoModelForMaskedLM if config.model_type in ENCODER_TYPES else AutoModelForCausalLM
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **placement)
    finally:
        if quiet and bars_were_on:
            hf_logging.enable_progress_bar()
    if not placement:
        model.to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
LOAD_IN = ("8bit", "4bit")


def _placement(device_map: str | None, load_in: str | None, device: torch.device) -> dict:
    """from_pretrained's keywords for a device map and bitsandbytes quantisation; {} for neither."""
    placement = {}
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise NeuronAtlasError(f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
        if importlib.util.find_spec("accelerate") is None:
            raise NeuronAtlasError(f"--device-map {device_map} needs accelerate: pip install accelerate")
        placement["device_map"] = device_map
    if load_in is not None:
        if load_in not in LOAD_IN:
            raise NeuronAtlasError(f"unknown quantisation {load_in!r}; use 8bit or 4bit")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise NeuronAtlasError(
                f"--load-in {load_in} needs bitsandbytes, which is not installed: pip install bitsandbytes "
                "(it runs on CUDA GPUs), or leave --load-in out"
            )
        from transformers import BitsAndBytesConfig

        bits = {"load_in_8bit": True} if load_in == "8bit" else {"load_in_4bit": True}
        placement["quantization_config"] = BitsAndBytesConfig(**bits)
        placement.setdefault("device_map", {"": str(device)})  # quantised weights are placed while loading
    return placement


def input_device(model) -> torch.device:
    """Where a model's inputs go: its input embedding's device (with a device map, the first layer's)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    device = weight.device if weight is not None else next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def max_positions(config) -> int | None:
    """How many positions the model can attend to, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache")


def model_fingerprint(model) -> str:
    """sha256 of the config and, per weight, its name, shape and 64 evenly spaced values.

    Cheap (no full read of the weights) yet different for any other checkpoint; the same for
    the same weights loaded in another dtype or on another device.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() and flat.is_floating_point() and flat.device.type != "meta":
            step = max(flat.numel() // 64, 1)
            sample = flat[::step][:64].to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
