"""``find selectivity``, ``find tokens`` and ``find positional``: label-selective, token-detector and
positional neurons, from an atlas."""

from __future__ import annotations

from ...errors import NeuronAtlasError
from ..args import corpus_args, load_args, model_arg, out_arg
from ..common import load_model_from, read_corpus_from
from .base import FindMethod, check_label_field, label_field_arg, null_options, save


def _selectivity_options(parser) -> None:
    parser.add_argument("--atlas", required=True,
                        help="an atlas profiled with labels (--label-field) and a document sample (--doc-sample)")
    out_arg(parser)
    parser.add_argument("--label", default=None, help="only this label (default: every label)")
    parser.add_argument("--metric", default="ap", choices=["ap", "auroc", "prob_diff"],
                        help="ap (average precision), auroc, or prob_diff (token-level activation "
                             "probability difference) (default: ap)")
    parser.add_argument("--pool", default="mean", choices=["mean", "max"],
                        help="a document's response: mean or max of z over its tokens (default: mean)")
    parser.add_argument("--top-k", type=int, default=None, help="neurons kept per label (default: 50 without --threshold)")
    parser.add_argument("--threshold", type=float, default=None, help="keep neurons scoring at least this")
    label_field_arg(parser)


def _run_selectivity(args) -> int:
    from ...atlas import load_atlas
    from ...methods.selectivity import find_selective

    atlas = load_atlas(args.atlas)
    check_label_field(atlas, args.label_field)
    found = find_selective(atlas, label=args.label, metric=args.metric, pool=args.pool,
                           top_k=args.top_k, threshold=args.threshold, null=null_options(args))
    best = ", ".join(f"{label} {stats['max']:.3f}" for label, stats in found.params["per_label"].items()
                     if stats["max"] is not None)
    save(found, args, f"metric {args.metric}" + (f" of the {args.pool}" if args.metric != "prob_diff" else "")
         + f"; best per label: {best}")
    return 0


def _tokens_options(parser) -> None:
    parser.add_argument("--atlas", required=True, help="an atlas with exemplars (--top-k > 0)")
    out_arg(parser)
    model_arg(parser, required=False,
              help="the atlas's model: measure variance explained (with --corpus) and trigger suppression")
    corpus_args(parser, required=False, help="a corpus to measure variance explained on (needs --model)")
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
    load_args(parser)


def _run_tokens(args) -> int:
    from ...atlas import load_atlas
    from ...methods.detectors import find_token_detectors

    if args.corpus is not None and args.model is None:
        raise NeuronAtlasError("--corpus needs --model: variance explained is measured by running the model")
    atlas = load_atlas(args.atlas)
    model, tokenizer = load_model_from(args) if args.model is not None else (None, None)
    corpus = read_corpus_from(args) if args.corpus is not None else None
    found = find_token_detectors(atlas, model, tokenizer, corpus, max_triggers=args.max_triggers,
                                 coverage=args.coverage, min_variance_explained=args.min_vr, ngram=args.ngram,
                                 max_tokens=args.max_tokens, suppress_quantile=args.suppress_quantile,
                                 feature=args.feature, null=null_options(args))
    extra = f"{found.params['candidates']:,} candidates from exemplars"
    if corpus is not None:
        extra += f", VR ({args.feature}) >= {args.min_vr:g} on {found.params['tokens_measured']:,} tokens"
    if model is not None:
        suppressing = sum(1 for info in found.params["details"].values() if info.get("suppresses_trigger"))
        extra += f", {suppressing:,} suppress their trigger"
    save(found, args, extra)
    return 0


def _positional_options(parser) -> None:
    parser.add_argument("--atlas", required=True, help="an atlas profiled with position statistics (the default)")
    out_arg(parser)
    parser.add_argument("--min-vr", type=float, default=0.5,
                        help="variance explained by the position bucket at least this (default: 0.5)")
    parser.add_argument("--min-position", type=int, default=0,
                        help="leave out buckets starting below this position (1 drops position 0, the window's first token: <s>, or the document's first token, where real models have many first-token neurons; default: 0)")


def _run_positional(args) -> int:
    from ...atlas import load_atlas
    from ...methods.positional import find_positional

    found = find_positional(load_atlas(args.atlas), min_variance_explained=args.min_vr, min_position=args.min_position,
                            null=null_options(args))
    save(found, args, f"VR by position bucket >= {args.min_vr:g}" + _first_token_note(found))
    return 0


def _first_token_note(found) -> str:
    """How many found neurons are positional only through position 0 (see methods.positional)."""
    only_first = found.params.get("first_token_only", 0)
    if not only_first:
        return ""
    return (f"; {only_first:,} of them only through position 0, the window's first token "
            "(--min-position 1 leaves it out)")


METHODS = (
    FindMethod("selectivity", "neurons whose response tells one label from the rest (average precision, AUROC)",
               ("atlas",), _selectivity_options, _run_selectivity, permutations=20),
    FindMethod("tokens", "token / bigram detectors: a few trigger tokens explain the neuron",
               ("atlas", "model and corpus optional"), _tokens_options, _run_tokens, permutations=20),
    FindMethod("positional", "neurons whose activation the position in the window explains", ("atlas",),
               _positional_options, _run_positional, permutations=0),
)
