"""``neuronatlas sparsify``: calibrate a sparse plan. :func:`speed_model_args` and
:func:`load_speed_model` are shared with ``bench``."""

from __future__ import annotations

from ..errors import NeuronAtlasError
from .args import (debug_arg, float_in, layers_arg, load_args, model_arg, nonnegative_int, out_arg,
                   overwrite_arg, parse_layers, positive_float, positive_int, quiet_arg)
from .common import check_causal_model, preflight_output

METHOD_CHOICES = ("teal", "wina", "cats", "coreinfer", "hot", "moe")
SPARSITY = float_in(0.0, 1.0, high_open=True, name="sparsity")  # as sparse.plan.check_sparsity says it


def register(commands) -> None:
    parser = commands.add_parser("sparsify", help="calibrate a sparse plan (teal, wina, cats, coreinfer, hot, moe)")
    parser.add_argument("method", choices=METHOD_CHOICES)
    speed_model_args(parser)
    parser.add_argument("--atlas", default=None, help="an atlas of this model (hot needs one; teal/wina use its histograms)")
    sparse_corpus_args(parser, "a calibration corpus (teal/wina/cats thresholds, coreinfer clusters, moe co-activation/router)")
    parser.add_argument("--sparsity", type=SPARSITY, default=0.5, help="share of FFN work skipped, in [0, 1) (default: 0.5)")
    parser.add_argument("--ppl-within", type=positive_float, default=None, metavar="P",
                        help="instead of --sparsity: the highest sparsity within P%% of dense perplexity on --eval-corpus")
    parser.add_argument("--eval-corpus", default=None, help="held-out corpus for --ppl-within (default: --corpus)")
    out_arg(parser, "the plan folder to write")
    overwrite_arg(parser, "replace a plan already in --out")
    quiet_arg(parser, "no progress bar (the greedy allocation's)")
    group = parser.add_argument_group("method options")
    group.add_argument("--calib-tokens", type=positive_int, default=4096, help="calibration tokens read from --corpus")
    group.add_argument("--scope", default="mlp", choices=["mlp", "all"],
                       help="teal/wina: threshold the inputs of the FFN, or of every linear layer (default: mlp)")
    group.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"],
                       help="teal/wina: the same sparsity for every input, or TEAL's greedy per-block allocation")
    group.add_argument("--greedy-step", type=float_in(0.0, 1.0, low_open=True, high_open=True), default=0.05,
                       help="teal/wina greedy: TEAL's base step, sparsity added per step to a projection the size of o (default: 0.05)")
    group.add_argument("--greedy-tokens", type=positive_int, default=512,
                       help="teal/wina greedy: calibration tokens whose block outputs measure the error (default: 512)")
    group.add_argument("--greedy-units", default="auto", choices=["auto", "projection", "input"],
                       help="teal/wina greedy: allocate per projection (published) or per input (q/k/v and gate/up "
                            "share one mask: faster decode, worse perplexity); auto: projection (default: auto)")
    group.add_argument("--greedy-search", default="auto", choices=["auto", "exact", "lazy"],
                       help="teal/wina greedy: try every unit each step (published) or re-measure only the cheapest; "
                            "auto: exact on a GPU, lazy on a CPU, 4x faster there (default: auto)")
    group.add_argument("--greedy-error", default="channel", choices=["channel", "squared"],
                       help="teal/wina greedy: block error as TEAL's code (per-channel L2 over positions) or squared")
    group.add_argument("--greedy-last", type=float_in(0.0, 1.0, low_open=True), default=0.25,
                       help="teal/wina greedy: share of each sequence's last tokens scored (default: 0.25, published)")
    group.add_argument("--prefill", default="sparse", choices=["sparse", "dense"],
                       help="teal/wina/cats: threshold a prompt's own tokens too, or run them dense and threshold only "
                            "the decode steps (TEAL's released evaluation; its greedy replay then thresholds each "
                            "sequence's last half) (default: sparse)")
    group.add_argument("--hot-score", default="rms", choices=["rms", "rate"], help="hot: rank by rms of z or activation rate")
    group.add_argument("--hot-signal", default="z", choices=["z", "gate"], help="hot: signal of the atlas to rank")
    group.add_argument("--alpha", type=float_in(0.0, 1.0, low_open=True), default=0.2, help="coreinfer: top share of positive activations per token")
    group.add_argument("--core-score", default="signed", choices=["signed", "abs"], help="coreinfer: rank z signed or |z|")
    layers_arg(group, prefix="coreinfer: ")
    group.add_argument("--clusters", type=nonnegative_int, default=0, help="coreinfer: similarity-guided variant with N clusters")
    group.add_argument("--cluster-layer", type=nonnegative_int, default=None, help="coreinfer: layer clustered (default: middle)")
    group.add_argument("--experts", type=positive_int, default=16, help="moe: experts per layer (default: 16)")
    group.add_argument("--split", default="weights", choices=["weights", "coactivation"], help="moe: how neurons are grouped")
    group.add_argument("--router", default="centroid", choices=["centroid", "mlp"], help="moe: router kind")
    group.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run)


def speed_model_args(parser) -> None:
    """--model, --device, --dtype, and what speed measurements add: --random-init, --threads."""
    model_arg(parser)
    load_args(parser, trust=False)
    parser.add_argument("--random-init", action="store_true",
                        help="build the model from its config with seeded random weights (speed benchmarks)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    debug_arg(parser)


def sparse_corpus_args(parser, help: str) -> None:
    """--corpus (optional; the sparse functions read it themselves) and --text-field."""
    parser.add_argument("--corpus", default=None, help=help)
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")


def load_speed_model(args):
    """(model, tokenizer): loaded, or built from the config with seeded random weights (--random-init);
    the tokenizer is None when a random-init model has none."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.random_init:
        return _random_model(args)
    from .common import load_model_from

    return load_model_from(args)


def _random_model(args):
    import torch

    from ..loading import auto_class, load_config, load_tokenizer, resolve_device, resolve_dtype
    from ..models import site_for

    config = load_config(args.model)
    site_for(config.model_type)
    torch.manual_seed(0)
    model = auto_class(config).from_config(config, dtype=resolve_dtype(args.dtype))  # as load_model would
    model.to(resolve_device(args.device)).eval()
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def run(args) -> int:
    from ..distributed import refuse_distributed

    refuse_distributed("sparsify")
    from ..atlas import load_atlas
    from ..sparse import SparsifyOptions, sparsify

    if args.ppl_within is not None and not (args.eval_corpus or args.corpus):
        raise NeuronAtlasError("--ppl-within measures perplexity: pass --eval-corpus FILE (or --corpus FILE)")
    layers = parse_layers(args.layers)
    preflight_output(args.out, "folder", overwrite=args.overwrite, what="plan")
    if args.ppl_within is not None:
        check_causal_model(args, "--ppl-within", "next-token perplexity")
    model, tokenizer = load_speed_model(args)
    atlas = load_atlas(args.atlas) if args.atlas else None
    options = SparsifyOptions(calib_tokens=args.calib_tokens, hot_score=args.hot_score, hot_signal=args.hot_signal,
                              alpha=args.alpha, core_score=args.core_score, layers=layers,
                              clusters=args.clusters, cluster_layer=args.cluster_layer, experts=args.experts,
                              split=args.split, router=args.router, seed=args.seed, scope=args.scope,
                              allocation=args.allocation, greedy_step=args.greedy_step, greedy_tokens=args.greedy_tokens,
                              greedy_units=args.greedy_units, greedy_search=args.greedy_search,
                              greedy_error=args.greedy_error, greedy_last=args.greedy_last,
                              prefill=args.prefill, progress=not args.quiet)
    plan = sparsify(args.method, model, tokenizer, args.sparsity, atlas=atlas, corpus=args.corpus,
                    text_field=args.text_field, options=options, name_or_path=args.model)
    if args.ppl_within is not None:
        plan = _within_ppl(args, model, tokenizer, plan)
    plan.save(args.out)
    calibrated = sorted({key.split(".")[1] for key in plan.tensors if key.startswith("quantiles.")})
    note = (", thresholds on the gate's activation" if calibrated == ["act"]  # cats
            else f", thresholds on the inputs of {', '.join(calibrated)}" if calibrated else "")
    print(f"{args.method} plan at sparsity {plan.sparsity:g}{note} written to {args.out}")
    return 0


def _within_ppl(args, model, tokenizer, plan):
    """``plan`` at the highest sparsity within --ppl-within % of dense perplexity."""
    from ..loading import window_length
    from ..sparse.bench import eval_windows
    from ..sparse.search import ppl_p_sparsity

    windows = eval_windows(tokenizer, args.eval_corpus or args.corpus, args.text_field,
                           max_length=window_length(model.config, None))
    found = ppl_p_sparsity(model, plan, windows, args.ppl_within)
    plan = plan.at_sparsity(found["sparsity"])
    plan.calibration["ppl_p_search"] = found
    print(f"PPL-{args.ppl_within:g}% sparsity: {found['sparsity']:.3f} (perplexity {found['ppl']:.3f}, dense {found['ppl_dense']:.3f})")
    return plan
