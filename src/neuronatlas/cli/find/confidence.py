"""``find entropy`` and ``find frequency``: confidence-regulation neurons, read from the weights, with
an optional mean-ablation check on a corpus."""

from __future__ import annotations

from ..args import corpus_args, layers_arg, load_args, model_arg, out_arg, parse_layers, window_args
from ..common import check_causal_model, load_model_from, read_corpus_from
from .base import FindMethod, write_found


def _shared_options(parser, corpus_required: bool) -> None:
    model_arg(parser)
    out_arg(parser)
    layers_arg(parser, default_text="the last")
    parser.add_argument("--top-k", type=int, default=10, help="neurons kept (default: 10)")
    parser.add_argument("--check-docs", type=int, default=40,
                        help="documents of --corpus the mean-ablation check runs on (default: 40; 0 = no check)")
    corpus_args(parser, required=corpus_required, label=None)
    window_args(parser)


def _check_needs_a_causal_model(args) -> None:
    check_causal_model(args, "the mean-ablation check", "next-token loss and entropy",
                       fix="pass --check-docs 0 for the set from the weights alone")


def _layers(args, model) -> list[int] | None:
    """--layers; ``all`` names every layer here, since no flag means the last."""
    if args.layers is not None and args.layers.strip() == "all":
        from ...models import locate_neurons

        return list(range(locate_neurons(model).num_layers))
    return parse_layers(args.layers)


def _entropy_options(parser) -> None:
    _shared_options(parser, corpus_required=False)
    parser.add_argument("--null-dims", type=int, default=None, help="null-space dimensions (default: 1%% of d_model, >= 1)")
    parser.add_argument("--norm-quantile", type=float, default=0.5, help="||w_out|| at least this quantile of its layer (default: 0.5)")
    parser.add_argument("--logit-var-quantile", type=float, default=0.5,
                        help="LogitVar at most this quantile of its layer (default: 0.5)")
    parser.add_argument("--min-null-share", type=float, default=0.0, help="null-space share at least this (default: 0)")
    load_args(parser)


def _run_entropy(args) -> int:
    from ...methods.confidence import find_entropy

    parse_layers(args.layers)  # fail before loading the model
    corpus = read_corpus_from(args) if args.corpus is not None else None
    if corpus is not None and args.check_docs:
        _check_needs_a_causal_model(args)
    model, tokenizer = load_model_from(args)
    found = find_entropy(model, _layers(args, model), args.null_dims, args.top_k, args.norm_quantile,
                         args.logit_var_quantile, args.min_null_share)
    found.params["model"] = args.model
    if corpus is not None and args.check_docs:
        _check(found, model, tokenizer, corpus, args, direction=None)
    write_found(found, args.out, f"{found.params['candidates']:,} candidates, null dims {found.params['null_dims']}")
    return 0


def _frequency_options(parser) -> None:
    _shared_options(parser, corpus_required=True)
    parser.add_argument("--min-cosine", type=float, default=0.0, help="|cosine| at least this (default: 0)")
    parser.add_argument("--smoothing", type=float, default=1.0, help="count added to every token (default: 1)")
    parser.add_argument("--count-docs", type=int, default=None, help="documents counted for the unigram (default: all)")
    load_args(parser)


def _run_frequency(args) -> int:
    from ...methods.confidence import find_frequency, unigram_direction
    from ...methods.vocab import unembedding

    parse_layers(args.layers)  # fail before loading the model
    corpus = read_corpus_from(args)
    if args.check_docs:
        _check_needs_a_causal_model(args)
    model, tokenizer = load_model_from(args)
    direction = unigram_direction(tokenizer, corpus, unembedding(model).shape[0], args.smoothing, args.count_docs)
    found = find_frequency(model, direction, _layers(args, model), args.top_k, args.min_cosine)
    found.params["model"] = args.model
    if args.check_docs:
        _check(found, model, tokenizer, corpus, args, direction)
    write_found(found, args.out, f"{found.params['candidates']:,} candidates")
    return 0


def _check(found, model, tokenizer, corpus, args, direction) -> None:
    """Run the mean-ablation check; its numbers go into the set's details and a table."""
    from ...methods.confidence import mean_ablation_effects

    result = mean_ablation_effects(model, tokenizer, corpus, [(n.layer, n.index) for n in found.neurons], direction,
                                   max_docs=args.check_docs, max_length=args.max_length, batch_size=args.batch_size)
    found.params["check"] = {"tokens": result["tokens"], "clean": result["clean"], "documents": args.check_docs}
    columns = ["loss_total", "loss_direct", "entropy_abs_total", "entropy_abs_direct"]
    if direction is not None:
        columns += ["projection_slope", "loss_frequency_frozen"]
    print(f"mean ablation over {result['tokens']:,} predicted tokens (changes; entropy_abs = mean |change|)")
    print(f"{'neuron':>10} " + " ".join(f"{name:>20}" for name in columns))
    for key, info in result["neurons"].items():
        found.params["details"].setdefault(key, {}).update(info)
        print(f"{key:>10} " + " ".join(f"{'-' if info[name] is None else format(info[name], '.5f'):>20}" for name in columns))


METHODS = (
    FindMethod("entropy", "entropy neurons: w_out in the unembedding's null space", ("model", "corpus optional"),
               _entropy_options, _run_entropy),
    FindMethod("frequency", "token-frequency neurons: W_U w_out along the log-unigram direction", ("model", "corpus"),
               _frequency_options, _run_frequency),
)
