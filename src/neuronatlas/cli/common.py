"""What the verbs' handlers share: check an output path, load the model and corpus the flags name,
write JSON, write and summarise a neuron set.

Heavy modules are imported inside the functions, so building the parser imports no torch.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ..errors import NeuronAtlasError
from ..files import write_text_whole

OUTPUT_KINDS = ("file", "folder")


def preflight_output(path: str | Path | None, kind: str = "file", overwrite: bool | None = False,
                     what: str = "output", flag: str = "--out") -> Path | None:
    """Check, before any model is loaded, that ``path`` can be written as a ``kind`` ("file" or
    "folder") named ``what``: it is not the other kind, its nearest existing folder is writable, and it
    does not exist yet (a folder: is empty) unless ``overwrite``. ``overwrite=None`` leaves an existing
    output to the verb (profile's --resume, demo's reruns). Returns the path (None for None)."""
    if path is None:
        return None
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, not {kind!r}")
    path = Path(path)
    if path.exists():
        _check_existing(path, kind, overwrite, what, flag)
    folder = path if path.is_dir() else _existing_parent(path, flag)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NeuronAtlasError(f"{flag} {path}: cannot write in {folder} (permission denied); "
                               f"choose another {flag} or make the folder writable")
    return path


def _check_existing(path: Path, kind: str, overwrite: bool | None, what: str, flag: str) -> None:
    if kind == "file" and path.is_dir():
        raise NeuronAtlasError(f"{flag} {path} is a folder; give the path of the {what} file to write")
    if kind == "folder" and not path.is_dir():
        raise NeuronAtlasError(f"{flag} {path} is a file; give a folder to write the {what} into")
    if overwrite is False and (kind == "file" or any(path.iterdir())):
        held = "already exists" if kind == "file" else "is not empty"
        raise NeuronAtlasError(f"{flag} {path} {held}; pass --overwrite to replace it, or choose another {flag}")


def _existing_parent(path: Path, flag: str) -> Path:
    """The nearest existing ancestor of ``path``, which must be a folder (the rest is created)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NeuronAtlasError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    return parent


def check_out(path: str | None, flag: str = "--out", kind: str = "neuron set JSON") -> None:
    """Refuse an output file path that is a folder or cannot be written (before any slow work); an
    existing file is replaced."""
    preflight_output(path, "file", overwrite=True, what=kind, flag=flag)


def load_model_from(args, name_or_path: str | None = None):
    """(model, tokenizer) of ``name_or_path`` (default: --model) as --device, --dtype and
    --trust-remote-code say."""
    from ..loading import load_model

    return load_model(name_or_path or args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=getattr(args, "trust_remote_code", False), quiet=True)


def check_causal_model(args, verb: str, needs: str, **fix) -> None:
    """Refuse --model when it is an encoder and ``verb`` needs next-token predictions: from its config,
    before the weights load (see :func:`neuronatlas.models.check_causal`)."""
    from ..loading import load_config
    from ..models import check_causal

    check_causal(load_config(args.model, getattr(args, "trust_remote_code", False)), verb, needs, **fix)


def read_corpus_from(args, path: str | None = None, label_field: str | None = None):
    """The corpus at ``path`` (default: --corpus), read with the corpus flags the verb has."""
    from ..corpus import read_corpus

    return read_corpus(path or args.corpus, text_field=args.text_field,
                       label_field=label_field or getattr(args, "label_field", None),
                       format=getattr(args, "format", None), label_from_folder=getattr(args, "label_from_folder", False),
                       on_invalid_text=getattr(args, "on_invalid_text", "error"))


def atlas_meta(path: str | None) -> dict | None:
    """The metadata of the atlas at ``path`` (None without one): names a set after the atlas's model."""
    if path is None:
        return None
    from ..atlas import load_atlas

    return load_atlas(path).meta


def write_json(path: str | Path, data: dict, indent: int = 2) -> None:
    """Write ``data`` whole or not at all: a temporary file beside ``path``, then renamed onto it."""
    path = Path(path)
    if path.is_dir():  # a verb that did not preflight its output: still one line, not a traceback
        raise NeuronAtlasError(f"{path} is a folder; give the path of the JSON file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_set(found, out: str, extra: str = "") -> None:
    """Save ``found`` to ``out``, then print its summary and where it went."""
    found.save(out)
    print_set_summary(found, extra)
    print(f"neuron set written to {out}")


def print_set_summary(found, extra: str = "") -> None:
    """One line of totals, then neurons per label (when labelled) and per layer."""
    widths = found.model.get("widths") or []
    unique = {(n.layer, n.index) for n in found.neurons}
    total = sum(widths)
    share = f" ({100 * len(unique) / total:.2f}% of {total:,})" if total else ""
    print(f"{found.method}: {len(unique):,} neurons{share}" + (f"; {extra}" if extra else ""))
    labels = Counter(n.label for n in found.neurons if n.label is not None)
    if labels:
        print("per label: " + ", ".join(f"{label} {count:,}" for label, count in sorted(labels.items())))
    layers = Counter(layer for layer, _ in unique)
    if layers:
        print("per layer: " + ", ".join(f"{layer}: {layers.get(layer, 0):,}" for layer in range(len(widths) or max(layers) + 1)))
