"""``neuronatlas find selectivity | tokens | positional``: label-selective, token-detector and positional neurons.

:func:`add_find_commands` adds the three methods to the ``find`` command's sub-subparsers. Each
writes a neuron set JSON (``--out``) and prints a short summary. Torch-heavy modules are imported
inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_sets import write_set
from .errors import NeuronAtlasError


def add_find_commands(methods) -> None:
    """Add ``selectivity``, ``tokens`` and ``positional`` to the subparsers of ``neuronatlas find``."""
    _add_selectivity(methods)
    _add_tokens(methods)
    _add_positional(methods)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _atlas_and_out(parser: argparse.ArgumentParser, atlas_help: str = "an atlas folder") -> None:
    parser.add_argument("--atlas", required=True, help=atlas_help)
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")


def _check_out(out: str) -> None:
    if Path(out).is_dir():
        raise NeuronAtlasError(f"--out {out} is a folder; give the path of the neuron set JSON file to write")


def _save(found, args, extra: str) -> None:
    found.params["atlas"] = str(args.atlas)
    write_set(found, args.out, extra)


# ---- selectivity --------------------------------------------------------------------------------


def _add_selectivity(methods) -> None:
    parser = methods.add_parser(
        "selectivity", help="neurons whose response tells one label from the rest (average precision, AUROC)")
    _atlas_and_out(parser, "an atlas profiled with labels (--label-field) and a document sample (--doc-sample)")
    parser.add_argument("--label", default=None, help="only this label (default: every label)")
    parser.add_argument("--metric", default="ap", choices=["ap", "auroc", "prob_diff"],
                        help="ap (average precision), auroc, or prob_diff (token-level activation "
                             "probability difference) (default: ap)")
    parser.add_argument("--pool", default="mean", choices=["mean", "max"],
                        help="a document's response: mean or max of z over its tokens (default: mean)")
    parser.add_argument("--top-k", type=int, default=None, help="neurons kept per label (default: 50 without --threshold)")
    parser.add_argument("--threshold", type=float, default=None, help="keep neurons scoring at least this")
    _common(parser)
    parser.set_defaults(handler=_run_selectivity)


def _run_selectivity(args) -> int:
    from .atlas import load_atlas
    from .methods.selectivity import find_selective

    _check_out(args.out)
    atlas = load_atlas(args.atlas)
    found = find_selective(atlas, label=args.label, metric=args.metric, pool=args.pool, top_k=args.top_k,
                           threshold=args.threshold)
    best = ", ".join(f"{label} {stats['max']:.3f}" for label, stats in found.params["per_label"].items()
                     if stats["max"] is not None)
    _save(found, args, f"metric {args.metric}" + (f" of the {args.pool}" if args.metric != "prob_diff" else "")
          + f"; best per label: {best}")
    return 0


# ---- token detectors ----------------------------------------------------------------------------


def _add_tokens(methods) -> None:
    parser = methods.add_parser("tokens", help="token / bigram detectors: a few trigger tokens explain the neuron")
    _atlas_and_out(parser, "an atlas with exemplars (--top-k > 0)")
    parser.add_argument("--model", default=None,
                        help="the atlas's model: measure variance explained (with --corpus) and trigger suppression")
    parser.add_argument("--corpus", default=None, help="a corpus to measure variance explained on (needs --model)")
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    parser.add_argument("--label-field", default=None, help="field or column holding the label (not used)")
    parser.add_argument("--max-triggers", type=int, default=3, help="distinct triggers allowed (default: 3)")
    parser.add_argument("--coverage", type=float, default=0.9,
                        help="share of the top exemplars the triggers must cover (default: 0.9)")
    parser.add_argument("--ngram", type=int, default=1, choices=[1, 2], help="1: token, 2: (previous, token) (default: 1)")
    parser.add_argument("--min-vr", type=float, default=0.5,
                        help="variance explained by the token at least this, with --model and --corpus (default: 0.5)")
    parser.add_argument("--feature", default="token", choices=["token", "triggers"],
                        help="VR of the current token's identity, or of whether it is one of the triggers (default: token)")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="corpus tokens measured (default: 20000)")
    parser.add_argument("--suppress-quantile", type=float, default=0.05,
                        help="trigger logit below this quantile of the neuron's vocab projection = suppresses (default: 0.05)")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    _common(parser)
    parser.set_defaults(handler=_run_tokens)


def _run_tokens(args) -> int:
    from .atlas import load_atlas
    from .methods.detectors import find_token_detectors

    _check_out(args.out)
    if args.corpus is not None and args.model is None:
        raise NeuronAtlasError("--corpus needs --model: variance explained is measured by running the model")
    atlas = load_atlas(args.atlas)
    model = tokenizer = corpus = None
    if args.model is not None:
        from .loading import load_model

        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code, quiet=True)
    if args.corpus is not None:
        from .corpus import read_corpus

        corpus = read_corpus(args.corpus, text_field=args.text_field, label_field=args.label_field)
    found = find_token_detectors(atlas, model, tokenizer, corpus, max_triggers=args.max_triggers,
                                 coverage=args.coverage, min_variance_explained=args.min_vr, ngram=args.ngram,
                                 max_tokens=args.max_tokens, suppress_quantile=args.suppress_quantile,
                                 feature=args.feature)
    extra = f"{found.params['candidates']:,} candidates from exemplars"
    if corpus is not None:
        extra += f", VR ({args.feature}) >= {args.min_vr:g} on {found.params['tokens_measured']:,} tokens"
    if model is not None:
        suppressing = sum(1 for info in found.params["details"].values() if info.get("suppresses_trigger"))
        extra += f", {suppressing:,} suppress their trigger"
    _save(found, args, extra)
    return 0


# ---- positional ---------------------------------------------------------------------------------


def _add_positional(methods) -> None:
    parser = methods.add_parser("positional", help="neurons whose activation the position in the window explains")
    _atlas_and_out(parser, "an atlas profiled with position statistics (the default)")
    parser.add_argument("--min-vr", type=float, default=0.5,
                        help="variance explained by the position bucket at least this (default: 0.5)")
    parser.add_argument("--min-position", type=int, default=0,
                        help="leave out buckets starting below this position (1 drops position 0, the <s> token)")
    _common(parser)
    parser.set_defaults(handler=_run_positional)


def _run_positional(args) -> int:
    from .atlas import load_atlas
    from .methods.positional import find_positional

    _check_out(args.out)
    found = find_positional(load_atlas(args.atlas), min_variance_explained=args.min_vr, min_position=args.min_position)
    _save(found, args, f"VR by position bucket >= {args.min_vr:g}")
    return 0
