"""The CLI's shared arguments: each flag has one default, one help text and one parser in every verb.

A verb adds the groups it needs (``model_args``, ``corpus_args``, ``window_args`` ...) and parses the
text flags (``--layers``, ``--ks``) with the functions here, in its handler, so a bad value is a
one-line :class:`NeuronAtlasError` rather than argparse's usage dump. Nothing here imports torch, so
``neuronatlas --help`` stays fast.
"""

from __future__ import annotations

import argparse

from ..errors import NeuronAtlasError

DTYPES = ("float32", "bfloat16", "float16")
CORPUS_FORMATS = ("txt", "jsonl", "csv", "parquet", "dataset", "folder")
MODEL_HELP = "a Hugging Face model id or a local model folder"
CORPUS_HELP = "a .txt/.jsonl/.csv/.parquet file, a datasets folder or a folder of .txt files"
SET_OUT_HELP = "the neuron set JSON to write"


def debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def quiet_arg(parser: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    parser.add_argument("--quiet", action="store_true", help=help)


def device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the model's weights (default: float32)")


def trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def model_arg(parser: argparse.ArgumentParser, required: bool = True, help: str = MODEL_HELP) -> None:
    parser.add_argument("--model", required=required, default=None, help=help)


def load_args(parser: argparse.ArgumentParser, trust: bool = True) -> None:
    """How a model is loaded: --device, --dtype (and --trust-remote-code)."""
    device_arg(parser)
    dtype_arg(parser)
    if trust:
        trust_arg(parser)


def model_args(parser: argparse.ArgumentParser, required: bool = True, help: str = MODEL_HELP) -> None:
    """--model with --device, --dtype and --trust-remote-code."""
    model_arg(parser, required, help)
    load_args(parser)


def corpus_args(parser: argparse.ArgumentParser, required: bool = True, help: str = CORPUS_HELP,
                label: str | None = "optional", formats: bool = False, folder: bool = False) -> None:
    """--corpus and --text-field; --label-field unless ``label`` is None ("optional" or "required");
    --format with ``formats``; --label-from-folder with ``folder``."""
    parser.add_argument("--corpus", required=required, default=None, help=help)
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    if label is not None:
        parser.add_argument("--label-field", required=label == "required", default=None,
                            help="field or column holding the label (language, topic ...), e.g. lang")
    if folder:
        parser.add_argument("--label-from-folder", action="store_true", help="label each file of a folder corpus by its subfolder")
    if formats:
        parser.add_argument("--format", default=None, choices=CORPUS_FORMATS, help="corpus format (default: from the suffix)")


def window_args(parser: argparse.ArgumentParser, max_length: int | None = 128, default_text: str | None = None,
                batch_size: bool = True) -> None:
    """--max-length (tokens per window) and --batch-size (windows per forward pass)."""
    shown = default_text or str(max_length)
    parser.add_argument("--max-length", type=int, default=max_length, help=f"tokens per window (default: {shown})")
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")


def out_arg(parser: argparse.ArgumentParser, help: str = SET_OUT_HELP, required: bool = True) -> None:
    parser.add_argument("--out", required=required, default=None, help=help)


def overwrite_arg(parser: argparse.ArgumentParser, help: str = "replace what --out already holds") -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def layers_arg(parser, default_text: str = "all", prefix: str = "") -> None:
    """--layers, read by :func:`parse_layers` (``parser`` may be an argument group)."""
    parser.add_argument("--layers", default=None,
                        help=f"{prefix}layers, e.g. all, 3, 0,2 or 1-3,5 (default: {default_text})")


def parse_layers(text: str | None, flag: str = "--layers") -> list[int] | None:
    """``all`` or no flag -> None; ``3`` -> [3]; ``1-3,5`` -> [1, 2, 3, 5]. A backwards range or an
    empty list is an error."""
    if text is None or text.strip() == "all":
        return None
    layers = []
    try:
        for part in (part for part in text.split(",") if part.strip()):
            low, _, high = part.partition("-")
            low, high = int(low), int(high or low)
            if high < low:
                raise NeuronAtlasError(f"{flag} {text!r}: the range {part} runs backwards; write {high}-{low}")
            layers.extend(range(low, high + 1))
    except ValueError:
        layers = []
    if not layers:
        raise NeuronAtlasError(f"{flag} {text!r} is not a list of layers; write e.g. all, 3, 0,2 or 1-3,5")
    return layers


def int_list(text: str | None, flag: str) -> list[int] | None:
    """``1,2,4`` -> [1, 2, 4]; no flag -> None."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NeuronAtlasError(f"{flag} {text!r} is not a comma-separated list of integers; e.g. {flag} 1,2,4") from None
