"""Command line: sparsify (calibrate a sparse plan) and bench (its speed and quality next to dense)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NeuronAtlasError

METHOD_CHOICES = ("teal", "wina", "coreinfer", "hot", "moe")


def register(commands) -> None:
    """Add ``sparsify`` and ``bench`` to the CLI."""
    _add_sparsify(commands)
    _add_bench(commands)


def _add_model(parser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model id or a local model folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-init", action="store_true",
                        help="build the model from its config with seeded random weights (speed benchmarks)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_corpus(parser, help_text: str) -> None:
    parser.add_argument("--corpus", default=None, help=help_text)
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")


def _add_sparsify(commands) -> None:
    parser = commands.add_parser("sparsify", help="calibrate a sparse plan (teal, wina, coreinfer, hot, moe)")
    parser.add_argument("method", choices=METHOD_CHOICES)
    _add_model(parser)
    parser.add_argument("--atlas", default=None, help="an atlas of this model (hot needs one; teal/wina use its histograms)")
    _add_corpus(parser, "a calibration corpus (teal/wina thresholds, coreinfer clusters, moe co-activation/router)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of FFN work skipped, in [0, 1) (default: 0.5)")
    parser.add_argument("--ppl-within", type=float, default=None, metavar="P",
                        help="instead of --sparsity: the highest sparsity within P%% of dense perplexity on --eval-corpus")
    parser.add_argument("--eval-corpus", default=None, help="held-out corpus for --ppl-within (default: --corpus)")
    parser.add_argument("--out", required=True, help="the plan folder to write")
    group = parser.add_argument_group("method options")
    group.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens read from --corpus")
    group.add_argument("--hot-score", default="rms", choices=["rms", "rate"], help="hot: rank by rms of z or activation rate")
    group.add_argument("--hot-signal", default="z", choices=["z", "gate"], help="hot: signal of the atlas to rank")
    group.add_argument("--alpha", type=float, default=0.2, help="coreinfer: top share of positive activations per token")
    group.add_argument("--core-score", default="signed", choices=["signed", "abs"], help="coreinfer: rank z signed or |z|")
    group.add_argument("--layers", default=None, help="coreinfer: layers to convert, e.g. 1-3 or 0,2 (default: all)")
    group.add_argument("--clusters", type=int, default=0, help="coreinfer: similarity-guided variant with N clusters")
    group.add_argument("--cluster-layer", type=int, default=None, help="coreinfer: layer clustered (default: middle)")
    group.add_argument("--experts", type=int, default=16, help="moe: experts per layer (default: 16)")
    group.add_argument("--split", default="weights", choices=["weights", "coactivation"], help="moe: how neurons are grouped")
    group.add_argument("--router", default="centroid", choices=["centroid", "mlp"], help="moe: router kind")
    group.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_run_sparsify)


def _add_bench(commands) -> None:
    parser = commands.add_parser("bench", help="decode speed and perplexity of a sparse plan next to the dense model")
    _add_model(parser)
    parser.add_argument("--plan", required=True, help="a plan folder from `neuronatlas sparsify`")
    _add_corpus(parser, "a held-out corpus for perplexity (dense and sparse)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each, alternating (default: 5)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per run (default: 32)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    parser.add_argument("--max-windows", type=int, default=32, help="held-out windows for perplexity (default: 32)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per held-out window (default: 128)")
    parser.add_argument("--controls", action="store_true", help="also the perplexity of the random control plan")
    parser.add_argument("--sweep", default=None, help="also perplexity (plan and random) at these sparsities, e.g. 0.25,0.5,0.75")
    parser.set_defaults(handler=_run_bench)


def _load(args):
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise NeuronAtlasError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    if args.random_init:
        return _random_model(args)
    from .loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, quiet=True)


def _random_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import load_config, resolve_device, resolve_dtype
    from .models import site_for

    config = load_config(args.model)
    site_for(config.model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype))
    model.to(resolve_device(args.device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _layers(text: str | None) -> list[int] | None:
    """``1-3,5`` -> [1, 2, 3, 5]; a backwards range or an empty list is an error."""
    if text is None:
        return None
    layers = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            low, high = int(low), int(high or low)
            if high < low:
                raise NeuronAtlasError(f"--layers {text!r}: the range {part} runs backwards; write {high}-{low}")
            layers.extend(range(low, high + 1))
    except ValueError:
        raise NeuronAtlasError(f"--layers {text!r} is not a list of layers; write e.g. 1-3 or 0,2") from None
    return layers


def _run_sparsify(args) -> int:
    from .distributed import refuse_distributed

    refuse_distributed("sparsify")
    from .atlas import load_atlas
    from .sparse import SparsifyOptions, sparsify
    from .sparse.plan import check_sparsity

    check_sparsity(args.sparsity)
    if args.ppl_within is not None and args.ppl_within <= 0:
        raise NeuronAtlasError(f"--ppl-within must be a positive percentage, not {args.ppl_within:g} (1 = within 1% of dense)")
    if args.ppl_within is not None and not (args.eval_corpus or args.corpus):
        raise NeuronAtlasError("--ppl-within measures perplexity: pass --eval-corpus FILE (or --corpus FILE)")
    model, tokenizer = _load(args)
    atlas = load_atlas(args.atlas) if args.atlas else None
    options = SparsifyOptions(calib_tokens=args.calib_tokens, hot_score=args.hot_score, hot_signal=args.hot_signal,
                              alpha=args.alpha, core_score=args.core_score, layers=_layers(args.layers),
                              clusters=args.clusters, cluster_layer=args.cluster_layer, experts=args.experts,
                              split=args.split, router=args.router, seed=args.seed)
    plan = sparsify(args.method, model, tokenizer, args.sparsity, atlas=atlas, corpus=args.corpus,
                    text_field=args.text_field, options=options, name_or_path=args.model)
    if args.ppl_within is not None:
        from .sparse.bench import eval_windows
        from .sparse.search import ppl_p_sparsity

        windows = eval_windows(tokenizer, args.eval_corpus or args.corpus, args.text_field)
        found = ppl_p_sparsity(model, plan, windows, args.ppl_within)
        plan = plan.at_sparsity(found["sparsity"])
        plan.calibration["ppl_p_search"] = found
        print(f"PPL-{args.ppl_within:g}% sparsity: {found['sparsity']:.3f} (perplexity {found['ppl']:.3f}, dense {found['ppl_dense']:.3f})")
    plan.save(args.out)
    calibrated = sorted({key.split(".")[1] for key in plan.tensors if key.startswith("quantiles.")})
    note = f", thresholds on the inputs of {', '.join(calibrated)}" if calibrated else ""
    print(f"{args.method} plan at sparsity {plan.sparsity:g}{note} written to {args.out}")
    return 0


def _run_bench(args) -> int:
    from .sparse import load_plan
    from .sparse.bench import bench

    for flag, least in (("runs", 1), ("new_tokens", 2), ("prompt_tokens", 1), ("max_windows", 1), ("max_length", 4)):
        if getattr(args, flag) < least:
            raise NeuronAtlasError(f"--{flag.replace('_', '-')} must be at least {least}, not {getattr(args, flag)}")
    if (args.controls or args.sweep) and args.corpus is None:
        raise NeuronAtlasError("--controls and --sweep measure perplexity: pass --corpus HELDOUT.jsonl")
    sweep = _sweep(args.sweep)
    plan = load_plan(args.plan)
    model, tokenizer = _load(args)
    if args.corpus is not None and tokenizer is None:
        raise NeuronAtlasError(f"{args.model} has no tokenizer to read --corpus with; drop --corpus or add a tokenizer")
    result = bench(model, tokenizer, plan, args.corpus, text_field=args.text_field, runs=args.runs,
                   new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, max_windows=args.max_windows,
                   max_length=args.max_length, controls=args.controls, sweep=sweep)
    _print_bench(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _sweep(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from .sparse.plan import check_sparsity

    try:
        return [check_sparsity(float(part)) for part in text.split(",")]
    except ValueError:
        raise NeuronAtlasError(f"--sweep {text!r} is not a list of sparsities; write e.g. 0.25,0.5,0.75") from None


def _print_bench(result: dict) -> None:
    print(f"{result['method']} at sparsity {result['sparsity']:g}, {result['threads']} threads, "
          f"median of {result['runs']} runs of {result['new_tokens']} tokens")
    print(f"decode: dense {result['dense_tokens_per_s']:.1f} tok/s, sparse {result['sparse_tokens_per_s']:.1f} tok/s, "
          f"speedup {result['speedup']:.2f}x")
    print(f"prefill ({result['prompt_tokens']} tokens): dense {1e3 * result['dense_prefill_s']:.1f} ms, "
          f"sparse {1e3 * result['sparse_prefill_s']:.1f} ms")
    if "ppl_dense" in result:
        line = f"perplexity: dense {result['ppl_dense']:.3f}, sparse {result['ppl_sparse']:.3f} (x{result['ppl_ratio']:.3f})"
        if "ppl_random" in result:
            line += f", random control {result['ppl_random']:.3f}"
        print(line)
    for point in result.get("sweep", []):
        print(f"  sparsity {point['sparsity']:.2f}: ppl x{point['ppl_ratio']:.3f}, random x{point['ppl_random'] / point['ppl_dense']:.3f}")
