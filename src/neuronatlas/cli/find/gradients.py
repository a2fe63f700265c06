"""``find attribution``, ``find ig``, ``find atp`` and ``find cett``: gradient-based ways to find
neurons. Each loads a model and writes a neuron set."""

from __future__ import annotations

from ..args import corpus_args, layers_arg, model_args, out_arg, parse_layers, window_args
from ..common import check_causal_model, load_model_from, read_corpus_from
from .base import FindMethod, null_options, save


def _model_options(parser) -> None:
    """What every gradient method takes: the model and --out (--quiet: every find method)."""
    model_args(parser)
    out_arg(parser)


def _attribution_options(parser) -> None:
    _model_options(parser)
    corpus_args(parser, help="a labelled corpus (.jsonl/.csv/.parquet ...)", label="required")
    parser.add_argument("--control", default=None, help="a control corpus (default: the other labels' text)")
    parser.add_argument("--labels", default=None, help="comma-separated labels to find neurons for (default: all)")
    parser.add_argument("--top-rate", type=float, default=0.01, help="share of all neurons kept per label (default: 0.01)")
    parser.add_argument("--target", default="logprob", choices=["logprob", "prob"],
                        help="differentiate the mean log-probability or probability of the next tokens (default: logprob)")
    parser.add_argument("--pool", default="max", choices=["max", "mean", "sum"],
                        help="pool a x grad over a window's positions (default: max, as CULNIG)")
    parser.add_argument("--no-clamp-control", action="store_true", help="subtract negative control scores too")
    parser.add_argument("--exclude", default=None, help="a neuron set (of this model) whose neurons are never kept")
    parser.add_argument("--max-docs-per-label", type=int, default=None, help="documents read per label (default: all)")
    window_args(parser)


def _run_attribution(args) -> int:
    from ...methods.attribution import find_attribution
    from ...neuronset import load_neuron_set

    corpus = read_corpus_from(args)
    exclude = load_neuron_set(args.exclude) if args.exclude else None
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    check_causal_model(args, "find attribution", "the probability of each next token")
    model, tokenizer = load_model_from(args)
    found = find_attribution(model, tokenizer, corpus, control=args.control, labels=labels, top_rate=args.top_rate,
                             target=args.target, pool=args.pool, clamp_control=not args.no_clamp_control,
                             exclude=exclude, max_docs_per_label=args.max_docs_per_label,
                             max_length=args.max_length, batch_size=args.batch_size, quiet=args.quiet,
                             null=null_options(args))
    save(found, args, f"target {args.target}, pool {args.pool}, control {found.params['control']}", source="model")
    return 0


def _ig_options(parser) -> None:
    _model_options(parser)
    parser.add_argument("--facts", required=True, help='JSONL: {"fact" (or "id"), "prompt", "answer"}, several prompts per fact')
    parser.add_argument("--steps", type=int, default=20, help="integration steps m from the zero baseline (default: 20)")
    parser.add_argument("--threshold", type=float, default=0.2,
                        help="keep IG >= this x the prompt's largest IG (default: 0.2)")
    parser.add_argument("--share", type=float, default=0.7, help="keep neurons of at least this share of a fact's prompts (default: 0.7)")
    layers_arg(parser)
    parser.add_argument("--min-paraphrases", type=int, default=2, help="prompts each fact needs (default: 2)")
    parser.add_argument("--target-count", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="move the share by 0.05 until each fact has LOW..HIGH neurons (the paper: 2 5)")
    parser.add_argument("--check", action="store_true",
                        help="zero each fact's neurons; print P(answer)'s relative drop on its own vs other facts")


def _run_ig(args) -> int:
    from ...methods.ig import find_knowledge_neurons, group_facts, knowledge_check, read_facts

    layers = parse_layers(args.layers)
    facts = read_facts(args.facts)
    group_facts(facts, args.min_paraphrases)  # fail before loading the model
    check_causal_model(args, "find ig", "the probability of the answer after each prompt")
    model, tokenizer = load_model_from(args)
    found = find_knowledge_neurons(model, tokenizer, facts, steps=args.steps, threshold=args.threshold,
                                   share=args.share, layers=layers, min_paraphrases=args.min_paraphrases,
                                   target_count=tuple(args.target_count) if args.target_count else None,
                                   quiet=args.quiet)
    if args.check and len(found):
        check = knowledge_check(model, tokenizer, facts, found)
        found.params["check"] = check
        ratio = "n/a" if check["ratio"] is None else f"{check['ratio']:.1f}"
        print(f"zeroing a fact's neurons: P(answer) drops {100 * check['own']:.1f}% on its own prompts, "
              f"{100 * check['others']:.1f}% on other facts' (ratio {ratio})")
    save(found, args, f"{len(found.labels)} facts with neurons, {args.steps} steps, threshold {args.threshold:g}, "
                      f"share {args.share:g}", source="model")
    return 0


def _atp_options(parser) -> None:
    _model_options(parser)
    parser.add_argument("--pairs", required=True, help='JSONL: {"clean", "corrupt", "target", "foil"?}, same token length')
    parser.add_argument("--metric", default=None, choices=["logit_diff", "logprob"],
                        help="logit(target) - logit(foil), or log P(target) (default: logit_diff when every pair has a foil)")
    parser.add_argument("--top-k", type=int, default=100, help="neurons kept by |estimate| (default: 100)")
    parser.add_argument("--graddrop", action="store_true", help="AtP* GradDrop: one extra pass per layer")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="patch the N highest and N lowest neurons for real; Spearman into the set's params")


def _run_atp(args) -> int:
    from ...methods.atp import find_atp, read_pairs

    pairs = read_pairs(args.pairs)
    check_causal_model(args, "find atp", "the next token's logits after each prompt")
    model, tokenizer = load_model_from(args)
    found = find_atp(model, tokenizer, pairs, metric=args.metric, top_k=args.top_k, graddrop=args.graddrop,
                     verify=args.verify, quiet=args.quiet)
    extra = f"metric {found.params['metric']} over {len(pairs)} pairs" + (", GradDrop" if args.graddrop else "")
    if "verify" in found.params:
        check = found.params["verify"]
        extra += f"; Spearman {check['spearman']:.3f} with real patching of {len(check['neurons'])} neurons"
    save(found, args, extra, source="model")
    return 0


def _cett_options(parser) -> None:
    _model_options(parser)
    parser.add_argument("--data", required=True, help='JSONL: a label and "text", or "prompt" + "answer"')
    parser.add_argument("--label-field", default="label", help="field holding the label (default: label)")
    parser.add_argument("--positive", required=True, help="the label the classifier predicts (e.g. hallucinated)")
    parser.add_argument("--negative", default=None, help="the other label (default: every other label)")
    parser.add_argument("--pool", default="mean", choices=["mean", "max"], help="pool CETT over answer tokens (default: mean)")
    parser.add_argument("--C", dest="c", type=float, default=None, help="inverse L1 strength (default: grid search)")
    parser.add_argument("--test-size", type=float, default=0.3, help="held-out share (default: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="split, solver and label-shuffle seed (default: 0)")
    window_args(parser, batch_size=False)


def _run_cett(args) -> int:
    from ...methods.cett import find_cett, read_examples

    records = read_examples(args.data, args.label_field)
    model, tokenizer = load_model_from(args)
    found = find_cett(model, tokenizer, records, args.positive, label_field=args.label_field, negative=args.negative,
                      pool=args.pool, c=args.c, test_size=args.test_size, seed=args.seed, max_length=args.max_length,
                      null=null_options(args))
    p = found.params
    save(found, args, f"held-out accuracy {p['test_accuracy']:.3f} (chance {p['chance']:.3f}), AUROC "
                      f"{p['test_auroc']:.3f}, C {p['C']:g}; scale them with intervene --op scale", source="model")
    return 0


METHODS = (
    FindMethod("attribution", "per-label neurons by activation x gradient of the text's next tokens",
               ("model", "labelled corpus"), _attribution_options, _run_attribution, permutations=10),
    FindMethod("ig", "knowledge neurons of facts by integrated gradients (Dai et al.)", ("model", "facts"),
               _ig_options, _run_ig),
    FindMethod("atp", "neurons that matter for clean vs corrupted prompts, by attribution patching",
               ("model", "prompt pairs"), _atp_options, _run_atp),
    FindMethod("cett", "neurons whose share of the FFN output predicts a binary label (H-Neurons)",
               ("model", "labelled answers"), _cett_options, _run_cett, permutations=20),
)
