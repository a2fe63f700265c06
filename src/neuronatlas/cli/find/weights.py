"""``find vocab`` and ``find weights``: neurons read from the model's weights alone."""

from __future__ import annotations

from ...errors import NeuronAtlasError
from ..args import finite_float, model_args, out_arg
from ..common import atlas_meta, load_model_from
from .base import FindMethod, save

ATLAS_HELP = "name the set after this atlas's model (must be --model)"


def _vocab_options(parser) -> None:
    model_args(parser)
    parser.add_argument("--atlas", default=None, help=ATLAS_HELP)
    out_arg(parser)
    parser.add_argument("--kind", default="prediction", help="prediction (skew > 0) or suppression (skew < 0)")
    parser.add_argument("--kurtosis", type=finite_float, default=10.0, help="vocabulary kurtosis above this (default: 10)")


def _run_vocab(args) -> int:
    from ...methods.vocab import KINDS, find_vocab

    if args.kind not in KINDS:
        raise NeuronAtlasError(f"unknown kind {args.kind!r}; use prediction or suppression")
    meta = atlas_meta(args.atlas)
    model, _ = load_model_from(args)
    found = find_vocab(model, meta, kind=args.kind, kurtosis=args.kurtosis)
    save(found, args, f"{args.kind} neurons, vocab kurtosis > {args.kurtosis:g}", source="model")
    return 0


def _weights_options(parser) -> None:
    model_args(parser)
    parser.add_argument("--class", dest="cls", default=None,
                        help="the class to write: enrichment, conditional-enrichment, depletion, conditional-depletion, "
                             "proportional-change, orthogonal-output or atypical")
    out_arg(parser, "the neuron set JSON to write (needs --class)", required=False)
    parser.add_argument("--threshold", type=float, default=0.5, help="round cosines to ±1 at |c| >= this (default: 0.5)")
    parser.add_argument("--atlas", default=None, help=ATLAS_HELP)


def _run_weights(args) -> int:
    from ...methods.weight_classes import CLASSES, class_name, find_weight_class, weight_classes

    if args.out is not None and args.cls is None:
        raise NeuronAtlasError("--out needs --class: name the weight class to write (e.g. --class depletion)")
    cls = class_name(args.cls) if args.cls is not None else None
    meta = atlas_meta(args.atlas)
    model, _ = load_model_from(args)
    classes = weight_classes(model, args.threshold)
    short = ("enrich", "c-enrich", "deplete", "c-deplete", "prop", "orth", "atypical")
    print(f"{'layer':>5} " + " ".join(f"{name:>9}" for name in short))
    for layer, counts in enumerate(classes["counts"]):
        print(f"{layer:>5} " + " ".join(f"{counts[name]:>9}" for name in CLASSES))
    totals = [sum(counts[name] for counts in classes["counts"]) for name in CLASSES]
    print(f"{'all':>5} " + " ".join(f"{total:>9}" for total in totals))
    if cls is None:
        return 0
    found = find_weight_class(model, cls, args.threshold, atlas_meta=meta, classes=classes)
    if args.out is None:
        print(f"{cls}: {len(found)} neurons (pass --out to write them)")
    else:
        save(found, args, f"class {cls}", source="model")
    return 0


METHODS = (
    FindMethod("vocab", "prediction / suppression neurons by vocabulary kurtosis", ("model",),
               _vocab_options, _run_vocab),
    FindMethod("weights", "gated input/output weight classes (enrichment, depletion ...)", ("model",),
               _weights_options, _run_weights),
)
