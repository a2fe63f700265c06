"""The CLI's shared arguments: each flag has one default, one help text and one parser in every verb.

A verb adds the groups it needs (``model_args``, ``corpus_args``, ``window_args`` ...) and parses the
text flags (``--layers``, ``--ks``) with the functions here, in its handler, so a bad value is a
one-line :class:`NeuronAtlasError` rather than argparse's usage dump. Nothing here imports torch, so
``neuronatlas --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ..errors import NeuronAtlasError

DTYPES = ("float32", "bfloat16", "float16")
CORPUS_FORMATS = ("txt", "jsonl", "csv", "parquet", "dataset", "folder")
MODEL_HELP = "a Hugging Face model id, a local model folder, or a .gguf file (or a folder holding one)"
CORPUS_HELP = "a .txt/.jsonl/.csv/.parquet file, a datasets folder or a folder of .txt files"
SET_OUT_HELP = "the neuron set JSON to write"


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line (no usage dump) with exit status 2, like every other
    user error. Subcommand parsers inherit the class."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"neuronatlas: error: {message} (see `{self.prog} --help`)\n")


# --- value types: argparse calls them on the flag's text; a refusal names the value and the range --------


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a{'n integer' if kind is int else ' number'}, not {text!r}") from None
    return value


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """How a range reads in a refusal: "positive", "at least 1", "in [0, 1)"."""
    if high == math.inf:
        return "positive" if (low, low_open) == (0, True) else f"{'above' if low_open else 'at least'} {low:g}"
    if low == -math.inf:
        return f"{'below' if high_open else 'at most'} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False,
             name: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float within [low, high] (an end is left out with ``*_open``);
    a refusal reads "argument --flag: [name ]must be in [low, high), not VALUE"."""

    def parse(text: str) -> float:
        value = _number(text, float)  # nan and inf fail the range test too
        if not math.isfinite(value) or not low <= value <= high or (low_open and value == low) \
                or (high_open and value == high):
            shown = _range_text(low, high, low_open, high_open) if low > -math.inf or high < math.inf else "a finite number"
            raise argparse.ArgumentTypeError(f"{name + ' ' if name else ''}must be {shown}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


def doc_pools(text: str) -> list[str]:
    """An argparse type: the document sample's pools, "mean", "max" or "mean,max"."""
    pools = [pool.strip() for pool in text.split(",") if pool.strip()]
    if not pools or any(pool not in ("mean", "max") for pool in pools):
        raise argparse.ArgumentTypeError(f"must be mean, max or mean,max, not {text!r}")
    return pools


doc_pools.__name__ = "pools"


def int_at_least(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least`` (and <= ``most``, if given)."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if most is not None and not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be {least} to {most}, not {text}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {text}")
        return value

    parse.__name__ = "integer"
    return parse


finite_float = float_in()  # any real number, not nan or inf
positive_float = float_in(0.0, low_open=True)  # > 0
nonnegative_float = float_in(0.0)  # >= 0
fraction = float_in(0.0, 1.0)  # [0, 1]
proper_fraction = float_in(0.0, 1.0, high_open=True)  # [0, 1): a share that cannot be all (--sparsity)
positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def atlas_positional(parser: argparse.ArgumentParser, help: str = "an atlas folder") -> None:
    """ATLAS as the first argument, or ``--atlas ATLAS`` as find, steer and explain take it."""
    parser.add_argument("atlas", nargs="?", default=None, help=f"{help}; or --atlas ATLAS")
    parser.add_argument("--atlas", dest="atlas_option", default=None, metavar="ATLAS", help=argparse.SUPPRESS)


def resolve_atlas(args: argparse.Namespace) -> None:
    """Set ``args.atlas`` from ATLAS or --atlas (commands that take it either way); one of them, once."""
    if not hasattr(args, "atlas_option"):
        return
    given = [path for path in (args.atlas, args.atlas_option) if path is not None]
    if not given:
        raise NeuronAtlasError(f"{args.command} needs an atlas folder: give it as ATLAS or --atlas ATLAS")
    if len(given) == 2 and given[0] != given[1]:
        raise NeuronAtlasError(f"two atlases given ({given[0]} and --atlas {given[1]}); give one")
    args.atlas = given[0]


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
    invalid_text_arg(parser)


def invalid_text_arg(parser: argparse.ArgumentParser) -> None:
    """--on-invalid-text: text that is not valid Unicode (bytes that are not UTF-8, a lone surrogate
    escape in JSON) stops the command naming its line, or is replaced by U+FFFD with a count."""
    parser.add_argument("--on-invalid-text", default="error", choices=("error", "replace"),
                        help="text that is not valid UTF-8/Unicode: stop naming its line, or replace it with "
                             "U+FFFD and count it (default: error)")


def window_args(parser: argparse.ArgumentParser, max_length: int | None = None,
                default_text: str | None = "min(model positions, 128)",
                batch_size: bool = True, least_length: int = 2) -> None:
    """--max-length (tokens per window, at least ``least_length``) and --batch-size (windows per forward pass)."""
    shown = default_text or str(max_length)
    parser.add_argument("--max-length", type=int_at_least(least_length), default=max_length,
                        help=f"tokens per window (default: {shown})")
    if batch_size:
        parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default: 8)")


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
