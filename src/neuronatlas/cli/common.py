"""What the verbs' handlers share: check an output path, load the model and corpus the flags name,
write JSON, write and summarise a neuron set.

Heavy modules are imported inside the functions, so building the parser imports no torch.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import NeuronAtlasError


def check_out(path: str | None, flag: str = "--out", kind: str = "neuron set JSON") -> None:
    """Refuse an output file path that is a folder (before any slow work)."""
    if path is not None and Path(path).is_dir():
        raise NeuronAtlasError(f"{flag} {path} is a folder; give the path of the {kind} file to write")


def load_model_from(args, name_or_path: str | None = None):
    """(model, tokenizer) of ``name_or_path`` (default: --model) as --device, --dtype and
    --trust-remote-code say."""
    from ..loading import load_model

    return load_model(name_or_path or args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=getattr(args, "trust_remote_code", False), quiet=True)


def read_corpus_from(args, path: str | None = None, label_field: str | None = None):
    """The corpus at ``path`` (default: --corpus), read with the corpus flags the verb has."""
    from ..corpus import read_corpus

    return read_corpus(path or args.corpus, text_field=args.text_field,
                       label_field=label_field or getattr(args, "label_field", None),
                       format=getattr(args, "format", None), label_from_folder=getattr(args, "label_from_folder", False))


def read_windowed_corpus(args):
    """--corpus, after checking --max-length and --batch-size (methods that window it themselves)."""
    if args.max_length < 2 or args.batch_size < 1:
        raise NeuronAtlasError(f"--max-length must be at least 2 and --batch-size at least 1 "
                               f"(got {args.max_length} and {args.batch_size})")
    return read_corpus_from(args)


def atlas_meta(path: str | None) -> dict | None:
    """The metadata of the atlas at ``path`` (None without one): names a set after the atlas's model."""
    if path is None:
        return None
    from ..atlas import load_atlas

    return load_atlas(path).meta


def write_json(path: str | Path, data: dict, indent: int = 2) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


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
