"""``find probe``: sparse probing, from an atlas's document sample or by running a model over a corpus."""

from __future__ import annotations

from ...errors import NeuronAtlasError
from ..args import corpus_args, int_list, load_args, model_arg, out_arg, window_args
from ..common import check_out, load_model_from, read_corpus_from, write_json
from .base import FindMethod, null_options, write_found


def _options(parser) -> None:
    parser.add_argument("--atlas", default=None, help="an atlas with a document sample (or --model with --corpus)")
    model_arg(parser, required=False, help="collect samples by running this model over --corpus instead")
    corpus_args(parser, required=False)
    window_args(parser)
    out_arg(parser)
    parser.add_argument("--label", default=None, help="the label probed (default: every label, each against the rest)")
    parser.add_argument("--against", default=None, help="probe --label against this label only (default: the rest)")
    parser.add_argument("--ranking", default="mean_diff", choices=["mean_diff", "f_stat", "l1"],
                        help="how neurons are ranked on the training split (default: mean_diff)")
    parser.add_argument("--ks", default=None, help="probe sizes, comma-separated (default: 1,2,4,...,256)")
    parser.add_argument("--top-k", type=int, default=8, help="neurons kept per label in the set (default: 8)")
    parser.add_argument("--per-layer", action="store_true", help="keep the top k of every layer, not only the best")
    parser.add_argument("--pool", default="mean", choices=["mean", "max"], help="a document's z: mean or max (default: mean)")
    parser.add_argument("--unit", default="doc", choices=["doc", "token"],
                        help="with --model: a sample is a document (pooled) or a token (default: doc)")
    parser.add_argument("--max-per-label", type=int, default=200, help="with --model: samples per label (default: 200)")
    parser.add_argument("--tokens-per-window", type=int, default=8, help="with --unit token: tokens per window (default: 8)")
    parser.add_argument("--test-size", type=float, default=0.3, help="held-out share of the documents (default: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, token sampling and the null's label shuffles (default: 0)")
    parser.add_argument("--l1-c", type=float, default=0.1, help="C of the L1 ranking (default: 0.1)")
    parser.add_argument("--probe-c", type=float, default=1.0, help="C of the logistic probes (default: 1.0)")
    parser.add_argument("--report", default=None, help="write every layer's F1/AUROC/MCC against k to this JSON")
    parser.add_argument("--plot", default=None, help="plot F1 and AUROC against k per layer to this PNG")
    load_args(parser)


def _samples(args):
    """(samples, model block info): from --model over --corpus, or from --atlas's document sample."""
    from ...methods.probe import collect_samples, from_atlas

    if (args.atlas is None) == (args.model is None):
        raise NeuronAtlasError("give either --atlas (its document sample) or --model with --corpus, not both or neither")
    if args.model is None:
        from ...atlas import load_atlas
        from ...neuronset import model_info

        atlas = load_atlas(args.atlas)
        return from_atlas(atlas, args.pool), model_info(atlas.meta)
    if args.corpus is None or args.label_field is None:
        raise NeuronAtlasError("--model needs --corpus and --label-field (the label of each document)")
    from ...methods import model_block

    corpus = read_corpus_from(args)
    model, tokenizer = load_model_from(args)
    data = collect_samples(model, tokenizer, corpus, unit=args.unit, pool=args.pool, max_per_label=args.max_per_label,
                           tokens_per_window=args.tokens_per_window, max_length=args.max_length,
                           batch_size=args.batch_size, seed=args.seed)
    return data, model_block(model)


def _run(args) -> int:
    from ...methods.probe import plot_curves, sparse_probe

    check_out(args.report, "--report", "report JSON")
    check_out(args.plot, "--plot", "PNG")
    ks = int_list(args.ks, "--ks")
    data, block = _samples(args)
    found = sparse_probe(data, block, None if args.label is None else [args.label], args.against, ranking=args.ranking,
                         ks=ks, top_k=args.top_k, per_layer=args.per_layer, test_size=args.test_size, seed=args.seed,
                         l1_c=args.l1_c, probe_c=args.probe_c, null=null_options(args))
    source = "atlas" if args.atlas else "model"
    found.params[source] = str(getattr(args, source))  # before the report, which copies the params
    report = found.params["report"]
    print(f"{'label':>8} {'layer':>5} " + " ".join(f"{'F1@' + str(p['k']):>7}" for p in report[next(iter(report))]["layers"][0]["curve"]))
    for label, info in report.items():
        layer = info["layers"][info["best_layer"]]
        print(f"{label:>8} {layer['layer']:>5} " + " ".join(f"{p['f1']:>7.3f}" for p in layer["curve"]))
    if args.report:
        write_json(args.report, {"method": "probe", "params": {k: v for k, v in found.params.items() if k != "report"},
                                 "labels": report}, indent=1)
        print(f"report written to {args.report}")
    if args.plot:
        plot_curves(found, args.plot)
        print(f"plot written to {args.plot}")
    write_found(found, args.out, f"ranking {args.ranking}, best layer per label by mean F1 over k <= {args.top_k}")
    return 0


METHODS = (
    FindMethod("probe", "sparse probing: F1/AUROC of logistic probes on the top k neurons per layer",
               ("atlas, or model and labelled corpus",), _options, _run, permutations=20),
)
