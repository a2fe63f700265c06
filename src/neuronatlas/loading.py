"""Load any Hugging Face model and tokenizer by id, local folder or GGUF file, and fingerprint it."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import NeuronAtlasError
from .models import is_encoder, site_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The model's config, with clear errors for a missing path, an unreachable hub id or a bad GGUF file."""
    from transformers import AutoConfig

    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise NeuronAtlasError(f"model path not found: {name_or_path} (give a local model folder or a Hugging Face id)")
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        stat = gguf.stat()
        return copy.deepcopy(_gguf_config(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns))
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise NeuronAtlasError(
            f"could not load model config {name_or_path!r}: {_first_line(error)} "
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

    ``name_or_path`` is a hub id, a model folder, a ``.gguf`` file or a folder holding one (dequantised
    to ``dtype`` by transformers; the model's name_or_path becomes the file). ``device_map`` ("auto",
    "balanced", "sequential" ...) lets accelerate spread a model larger than one device over the GPUs
    and the CPU instead; ``load_in`` ("8bit" or "4bit") quantises the linear layers with bitsandbytes.
    Sharded safetensors checkpoints load like single files.
    """
    config = load_config(name_or_path, trust_remote_code)
    site_for(config.model_type)  # unsupported families fail here, before loading weights
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    placement = _placement(device_map, load_in, torch_device)
    model = load_weights(auto_class(config), name_or_path, config, torch_dtype, trust_remote_code, quiet, placement)
    if not placement:
        model.to(torch_device)
    model.eval()
    return model, load_tokenizer(name_or_path, trust_remote_code)


def load_weights(auto, name_or_path: str, config, dtype: torch.dtype, trust_remote_code: bool = False,
                 quiet: bool = False, placement: dict | None = None):
    """``auto.from_pretrained`` on a folder, hub id or GGUF file (dequantised to ``dtype``), on the CPU
    unless ``placement`` (device_map, quantisation) says otherwise; ``quiet``: no bars, no load report."""
    from transformers.utils import logging as hf_logging

    placement = placement or {}
    gguf = gguf_file(name_or_path)
    bars_were_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if quiet:  # no bars, and no load report (a sentence-transformers checkpoint's missing head is expected)
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        # Weights a checkpoint lacks (all-MiniLM-L6-v2 has no masked-LM head) are initialised at random:
        # seeded, every load gives the same model and the same model_fingerprint.
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: no CUDA context for a CPU run
            torch.default_generator.manual_seed(0)
            if gguf is None:
                return auto.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                            **placement)
            return _load_gguf_model(auto, gguf, config, dtype, placement, quiet)
    finally:
        hf_logging.set_verbosity(verbosity)
        if quiet and bars_were_on:
            hf_logging.enable_progress_bar()


def auto_class(config):
    """The transformers Auto class a model of ``config`` loads with: masked LM for encoders, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if is_encoder(config) else AutoModelForCausalLM


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer with any padding and truncation its files switch on turned off.

    The project windows and pads documents itself; a tokenizer.json that pads every text to 128 and
    cuts it there (all-MiniLM-L6-v2's does) would otherwise add pads to or cut every window.
    """
    from transformers import AutoTokenizer

    source, gguf = pretrained_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf)
    if gguf:
        tokenizer.name_or_path = str(Path(source) / gguf["gguf_file"])  # the file, as the model's
    return without_builtin_padding(tokenizer)


def without_builtin_padding(tokenizer):
    """``tokenizer`` with its backend's padding and truncation off (in place); slow tokenizers carry none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    for key in ("max_length", "truncation_strategy", "stride", "pad_to_multiple_of"):  # copied from tokenizer.json
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


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
    """How many positions the model can attend to, when its config (or its text model's, e.g. Gemma 3's) says."""
    for source in (config, getattr(config, "text_config", None)):
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "max_seq_len"):
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


WINDOW_LENGTH = 128  # tokens per window of the methods that run the model, where the model has as many positions


def window_length(config, requested: int | None, default: int = WINDOW_LENGTH) -> int:
    """Tokens per window: ``requested``, checked against the model's positions (one-line error when
    beyond them: a learned position table would fail with an IndexError), or min(positions, ``default``)."""
    limit = max_positions(config)
    if requested is None:
        return min(limit or default, default)
    if requested < 2:
        raise NeuronAtlasError(f"max length must be at least 2 (got {requested})")
    if limit is not None and requested > limit:
        raise NeuronAtlasError(f"max length {requested} is beyond the model's {limit} positions; "
                               f"use --max-length {limit} or less")
    return requested


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
    source = gguf_source(model)
    if source is not None:  # the same dequantised weights from another GGUF file are another model
        digest.update(f"gguf:{source['bytes']}:{source['fingerprint']}".encode())
    return digest.hexdigest()[:16]


# ---- GGUF files -----------------------------------------------------------------------------------


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file ``name_or_path`` names: itself, or the one ``.gguf`` in a folder without config.json."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(file.name for file in found)
        raise NeuronAtlasError(f"{path} holds {len(found)} GGUF files ({names}): give one of them as the model path")
    return found[0] if found else None


def pretrained_source(name_or_path: str) -> tuple[str, dict]:
    """What any ``from_pretrained`` takes for ``name_or_path``: (it, {}), or (folder, {"gguf_file": name})."""
    gguf = gguf_file(name_or_path)
    return (str(name_or_path), {}) if gguf is None else (str(gguf.parent), {"gguf_file": gguf.name})


def gguf_source(model) -> dict | None:
    """{"file", "bytes", "fingerprint"} of the GGUF file a model was loaded from; None for other models."""
    gguf = gguf_file(str(getattr(model, "name_or_path", "") or ""))
    if gguf is None:
        return None
    return {"file": str(gguf.resolve()), "bytes": gguf.stat().st_size, "fingerprint": file_fingerprint(gguf)}


def file_fingerprint(path: Path, blocks: int = 64, block_bytes: int = 1 << 16) -> str:
    """sha256 of a file's size and ``blocks`` evenly spaced blocks of it: at most 4 MiB read, even for 16 GB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        for block in range(blocks):
            handle.seek(block * max(size - block_bytes, 0) // max(blocks - 1, 1))
            digest.update(handle.read(block_bytes))
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, size: int, mtime_ns: int):
    """A GGUF file's config, read once per version of the file: reading parses its whole header
    (seconds for SmolLM2's 49k-token vocabulary), and a profile asks for the config three times."""
    from transformers import AutoConfig

    gguf = Path(path)
    with _gguf_errors(gguf, "config"):
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _load_gguf_model(auto, gguf: Path, config, dtype: torch.dtype, placement: dict, quiet: bool):
    """``auto.from_pretrained`` on a GGUF file, which transformers dequantises to ``dtype``."""
    with _gguf_errors(gguf, "weights"), _quiet_gguf_bar(quiet):
        model = auto.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config, dtype=dtype, **placement)
    model.name_or_path = model.config._name_or_path = str(gguf)  # what the atlas records, and reloads
    return model


@contextmanager
def _gguf_errors(gguf: Path, what: str):
    """One-line NeuronAtlasErrors for a missing gguf package, an unsupported quantisation or a bad file."""
    if importlib.util.find_spec("gguf") is None:
        raise NeuronAtlasError(f"loading the GGUF file {gguf} needs the gguf package: pip install gguf")
    try:
        yield
    except NotImplementedError as error:  # gguf's dequantize: "Dequantization for Q8_1 is not yet implemented"
        kind = str(error).split("for ")[-1].split(" is ")[0] if "for " in str(error) else _first_line(error)
        raise NeuronAtlasError(
            f"cannot load {gguf}: its tensors are quantised as {kind}, which gguf cannot dequantise "
            "(upgrade it: pip install -U gguf, or convert the model to Q8_0, F16 or a safetensors folder)"
        ) from None
    except NeuronAtlasError:
        raise
    except Exception as error:  # noqa: BLE001 - the gguf reader raises many kinds for a damaged file
        raise NeuronAtlasError(
            f"cannot read the {what} of GGUF file {gguf}: {_first_line(error)} "
            "(check the file is a complete GGUF of a family transformers supports, e.g. llama, qwen2, gpt2)"
        ) from None


@contextmanager
def _quiet_gguf_bar(quiet: bool):
    """Hide transformers' dequantisation progress bar (plain tqdm, not switched off by its logging)."""
    if not quiet:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    shown = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(shown, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = shown


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
