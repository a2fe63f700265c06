"""``neuronatlas find METHOD`` (lape, dead, vocab, weights; selectivity, tokens and positional from
cli_detect) and ``neuronatlas vocab``.

Each find method writes a neuron set JSON (``--out``) and prints a short summary: neurons per label
and per layer. Torch-heavy modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_detect import add_find_commands
from .cli_find_grad import add_find_commands as add_gradient_commands
from .cli_find_stats import add_find_commands as add_statistics_commands
from .cli_sets import write_set
from .errors import NeuronAtlasError


def register(commands) -> None:
    """Add ``find`` (with its methods) and ``vocab`` to the CLI's subcommands."""
    find = commands.add_parser("find", help="identify neurons (lape, dead, selectivity, tokens, positional, vocab, weights, attribution, ig, atp, cett, probe, universal, entropy, frequency) into a neuron set JSON")
    find.set_defaults(handler=lambda args: _no_method(find), debug=False)
    methods = find.add_subparsers(dest="method", metavar="METHOD")
    _add_lape(methods)
    _add_dead(methods)
    _add_find_vocab(methods)
    _add_weights(methods)
    add_find_commands(methods)  # selectivity, tokens, positional
    add_gradient_commands(methods)  # attribution, ig, atp, cett
    add_statistics_commands(methods)  # probe, universal, entropy, frequency
    _add_vocab(commands)


def _no_method(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model id or a local model folder")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def _load(args):
    from .loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, quiet=True)


def _check_out(out: str | None) -> None:
    if out is not None and Path(out).is_dir():
        raise NeuronAtlasError(f"--out {out} is a folder; give the path of the neuron set JSON file to write")


# ---- lape ---------------------------------------------------------------------------------------


def _add_lape(methods) -> None:
    parser = methods.add_parser("lape", help="label (language) specific neurons by activation probability entropy")
    parser.add_argument("--atlas", required=True, help="an atlas profiled with labels (--label-field)")
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--top-rate", type=float, default=0.01, help="share of all neurons kept (default: 0.01)")
    parser.add_argument("--percentile", type=float, default=0.95,
                        help="tau = this quantile of all activation probabilities (default: 0.95)")
    parser.add_argument("--signal", default=None, help="gate or z (default: gate when the atlas has it, else z)")
    parser.add_argument("--no-filter", action="store_true",
                        help="keep neurons with no label above tau (they go to their argmax label)")
    _common(parser)
    parser.set_defaults(handler=_run_lape)


def _run_lape(args) -> int:
    from .atlas import load_atlas
    from .methods.lape import find_lape

    _check_out(args.out)
    atlas = load_atlas(args.atlas)
    found = find_lape(atlas, top_rate=args.top_rate, percentile=args.percentile, signal=args.signal,
                      filter=not args.no_filter)
    found.params["atlas"] = str(args.atlas)
    write_set(found, args.out, extra=f"signal {found.params['signal']}, tau {found.params['tau']:.4g}")
    return 0


# ---- dead ---------------------------------------------------------------------------------------


def _add_dead(methods) -> None:
    parser = methods.add_parser("dead", help="neurons never (or rarely) active over the profiled corpus")
    parser.add_argument("--atlas", required=True, help="an atlas folder")
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--max-rate", type=float, default=0.0,
                        help="keep neurons active on at most this share of tokens (default: 0 = dead)")
    parser.add_argument("--signal", default="z", help="z or gate (default: z)")
    _common(parser)
    parser.set_defaults(handler=_run_dead)


def _run_dead(args) -> int:
    from .atlas import load_atlas
    from .methods.dead import find_dead

    _check_out(args.out)
    atlas = load_atlas(args.atlas)
    found = find_dead(atlas, max_rate=args.max_rate, signal=args.signal)
    found.params["atlas"] = str(args.atlas)
    write_set(found, args.out, extra=f"rate <= {args.max_rate:g} on signal {found.params['signal']}")
    return 0


# ---- vocab ---------------------------------------------------------------------------------------


def _add_find_vocab(methods) -> None:
    parser = methods.add_parser("vocab", help="prediction / suppression neurons by vocabulary kurtosis")
    _model_args(parser)
    parser.add_argument("--atlas", default=None, help="name the set after this atlas's model (must be --model)")
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--kind", default="prediction", help="prediction (skew > 0) or suppression (skew < 0)")
    parser.add_argument("--kurtosis", type=float, default=10.0, help="vocabulary kurtosis above this (default: 10)")
    _common(parser)
    parser.set_defaults(handler=_run_find_vocab)


def _run_find_vocab(args) -> int:
    from .methods.vocab import KINDS, find_vocab

    _check_out(args.out)
    if args.kind not in KINDS:
        raise NeuronAtlasError(f"unknown kind {args.kind!r}; use prediction or suppression")
    meta = None
    if args.atlas is not None:
        from .atlas import load_atlas

        meta = load_atlas(args.atlas).meta
    model, _ = _load(args)
    found = find_vocab(model, meta, kind=args.kind, kurtosis=args.kurtosis)
    found.params["model"] = args.model
    write_set(found, args.out, extra=f"{args.kind} neurons, vocab kurtosis > {args.kurtosis:g}")
    return 0


def _add_vocab(commands) -> None:
    parser = commands.add_parser("vocab", help="the tokens one neuron's value vector promotes and suppresses")
    _model_args(parser)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--index", type=int, required=True, help="the neuron's index within its layer")
    parser.add_argument("--top", type=int, default=30, help="tokens shown each way (default: 30)")
    parser.add_argument("--through-norm", action="store_true", help="scale by the final norm's weight first")
    parser.add_argument("--json", action="store_true", help="print JSON")
    _common(parser)
    parser.set_defaults(handler=_run_vocab)


def _run_vocab(args) -> int:
    from .methods.vocab import vocab_projection

    model, tokenizer = _load(args)
    result = vocab_projection(model, args.layer, args.index, top=args.top, through_norm=args.through_norm,
                              tokenizer=tokenizer)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return 0
    print(f"neuron {args.layer}:{args.index} of {args.model}" + (" (through the final norm)" if args.through_norm else ""))
    print(f"{'promoted':>32} {'logit':>9}   {'suppressed':>32} {'logit':>9}")
    for up, down in zip(result["promoted"], result["suppressed"]):
        print(f"{_shown(up):>32} {up['logit']:>9.3f}   {_shown(down):>32} {down['logit']:>9.3f}")
    return 0


def _shown(row: dict) -> str:
    if not row["token"] or not row["token"].strip():
        return f"<{row['id']}>" if not row["token"] else f"{row['token']!r} <{row['id']}>"[:32]
    return repr(row["token"])[1:-1][:32]


# ---- weights ------------------------------------------------------------------------------------


def _add_weights(methods) -> None:
    parser = methods.add_parser("weights", help="gated input/output weight classes (enrichment, depletion ...)")
    _model_args(parser)
    parser.add_argument("--class", dest="cls", default=None,
                        help="the class to write: enrichment, conditional-enrichment, depletion, conditional-depletion, "
                             "proportional-change, orthogonal-output or atypical")
    parser.add_argument("--out", default=None, help="the neuron set JSON to write (needs --class)")
    parser.add_argument("--threshold", type=float, default=0.5, help="round cosines to ±1 at |c| >= this (default: 0.5)")
    parser.add_argument("--atlas", default=None, help="name the set after this atlas's model (must be --model)")
    _common(parser)
    parser.set_defaults(handler=_run_weights)


def _run_weights(args) -> int:
    from .methods.weight_classes import CLASSES, class_name, find_weight_class, weight_classes

    if args.out is not None and args.cls is None:
        raise NeuronAtlasError("--out needs --class: name the weight class to write (e.g. --class depletion)")
    cls = class_name(args.cls) if args.cls is not None else None
    _check_out(args.out)
    meta = None
    if args.atlas is not None:
        from .atlas import load_atlas

        meta = load_atlas(args.atlas).meta
    model, _ = _load(args)
    classes = weight_classes(model, args.threshold)
    short = ("enrich", "c-enrich", "deplete", "c-deplete", "prop", "orth", "atypical")
    print(f"{'layer':>5} " + " ".join(f"{name:>9}" for name in short))
    for layer, counts in enumerate(classes["counts"]):
        print(f"{layer:>5} " + " ".join(f"{counts[name]:>9}" for name in CLASSES))
    totals = [sum(counts[name] for counts in classes["counts"]) for name in CLASSES]
    print(f"{'all':>5} " + " ".join(f"{total:>9}" for total in totals))
    if cls is not None:
        found = find_weight_class(model, cls, args.threshold, atlas_meta=meta, classes=classes)
        found.params["model"] = args.model
        if args.out is not None:
            write_set(found, args.out, extra=f"class {cls}")
        else:
            print(f"{cls}: {len(found)} neurons (pass --out to write them)")
    return 0
