"""``find universal``: neurons whose activations another model (e.g. another seed) shares."""

from __future__ import annotations

from ...errors import NeuronAtlasError
from ..args import corpus_args, load_args, model_arg, out_arg, window_args
from ..common import check_out, load_model_from, read_corpus_from, write_json
from .base import FindMethod, null_options, write_found


def _options(parser) -> None:
    model_arg(parser, help="model A: its universal neurons form the set")
    parser.add_argument("--other", required=True, help="model B, with the same tokenizer")
    corpus_args(parser, label=None)
    window_args(parser)
    out_arg(parser)
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="universal when best correlation minus the rotation baseline exceeds this (default: 0.5)")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="tokens correlated (default: 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rotations (default: 0)")
    parser.add_argument("--report", default=None, help="write the shares and weight statistics to this JSON")
    load_args(parser)


def _run(args) -> int:
    from ...methods.universal import find_universal

    check_out(args.report, "--report", "report JSON")
    corpus = read_corpus_from(args)
    model_a, tokenizer = load_model_from(args)
    model_b, tokenizer_b = load_model_from(args, args.other)
    if tokenizer.get_vocab() != tokenizer_b.get_vocab():
        raise NeuronAtlasError(f"--model {args.model} and --other {args.other} have different tokenizers; "
                               "universal neurons need both models to read the same tokens")
    found = find_universal(model_a, model_b, tokenizer, corpus, threshold=args.threshold, seed=args.seed,
                           max_tokens=args.max_tokens, max_length=args.max_length, batch_size=args.batch_size,
                           null=null_options(args))
    found.params["model"], found.params["other_model"] = args.model, args.other
    _print_statistics(found.params)
    if args.report:
        write_json(args.report, {"method": "universal", "params": found.params}, indent=1)
        print(f"report written to {args.report}")
    write_found(found, args.out, f"excess correlation > {args.threshold:g} over {found.params['tokens']:,} tokens")
    return 0


def _print_statistics(params: dict) -> None:
    """The shares of universal neurons, then the median weight statistics of universal neurons vs the rest."""
    share = params["share"]
    print(f"{params['tokens']:,} tokens; universal: A {100 * share['a']['all']:.2f}%, B {100 * share['b']['all']:.2f}% "
          f"(per layer of A: {', '.join(f'{100 * s:.1f}%' for s in share['a']['per_layer'])})")
    print(f"medians {'statistic':>22} {'universal':>10} {'rest':>10} {'layer z':>8} {'p':>9} {'rho(excess)':>11}")
    for name, entry in params["statistics"].items():
        mine, rest = entry["universal"]["median"], entry["rest"]["median"]
        print(f"        {name:>22} {_number(mine):>10} {_number(rest):>10} {_number(entry['layer_z']):>8} "
              f"{_number(entry['p_value']):>9} {_number(entry['spearman_excess']):>11}")


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


METHODS = (
    FindMethod("universal", "neurons whose activations another model (e.g. another seed) shares",
               ("two models", "corpus"), _options, _run, permutations=10),
)
