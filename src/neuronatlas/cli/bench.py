"""``neuronatlas bench``: decode speed and perplexity of a sparse plan next to the dense model."""

from __future__ import annotations

import sys

from ..errors import NeuronAtlasError
from .args import int_at_least, overwrite_arg, positive_int, window_args
from .common import preflight_output, write_json
from .sparsify import load_speed_model, sparse_corpus_args, speed_model_args


def register(commands) -> None:
    parser = commands.add_parser("bench", help="decode speed and perplexity of a sparse plan next to the dense model")
    speed_model_args(parser)
    parser.add_argument("--plan", required=True, help="a plan folder from `neuronatlas sparsify`")
    sparse_corpus_args(parser, "a held-out corpus for perplexity (dense and sparse)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    overwrite_arg(parser, "replace the --json file if it exists")
    parser.add_argument("--runs", type=positive_int, default=5, help="timed runs of each, alternating (default: 5)")
    parser.add_argument("--new-tokens", type=int_at_least(2), default=32, help="greedy tokens per run (default: 32)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=64, help="prompt length (default: 64)")
    parser.add_argument("--max-windows", type=positive_int, default=32, help="held-out windows for perplexity (default: 32)")
    window_args(parser, batch_size=False, least_length=4)
    parser.add_argument("--label-field", default=None,
                        help="also perplexity per label of --corpus (up to --max-windows windows of each), e.g. lang")
    parser.add_argument("--controls", action="store_true", help="also the perplexity of the random control plan")
    parser.add_argument("--sweep", default=None, help="also perplexity (plan and random) at these sparsities, e.g. 0.25,0.5,0.75")
    parser.add_argument("--batches", default=None, help="also decode speed at these batch sizes, e.g. 4,16")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..sparse import load_plan
    from ..sparse.bench import bench

    if (args.controls or args.sweep or args.label_field) and args.corpus is None:
        raise NeuronAtlasError("--controls, --sweep and --label-field measure perplexity: pass --corpus HELDOUT.jsonl")
    sweep = _sweep(args.sweep)
    batches = _batches(args.batches)
    preflight_output(args.json, "file", overwrite=args.overwrite, what="bench JSON", flag="--json")
    plan = load_plan(args.plan)
    model, tokenizer = load_speed_model(args)
    if args.corpus is not None and tokenizer is None:
        raise NeuronAtlasError(f"{args.model} has no tokenizer to read --corpus with; drop --corpus or add a tokenizer")
    result = bench(model, tokenizer, plan, args.corpus, text_field=args.text_field, runs=args.runs,
                   new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, max_windows=args.max_windows,
                   max_length=args.max_length, controls=args.controls, sweep=sweep, threads=args.threads,
                   batches=batches, label_field=args.label_field)
    _print_bench(result)
    if args.json:
        write_json(args.json, result)
    return 0


def _sweep(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from ..sparse.plan import check_sparsity

    try:
        return [check_sparsity(float(part)) for part in text.split(",")]
    except ValueError:
        raise NeuronAtlasError(f"--sweep {text!r} is not a list of sparsities; write e.g. 0.25,0.5,0.75") from None


def _batches(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise NeuronAtlasError(f"--batches {text!r} is not a list of batch sizes; write e.g. 4,16")
    return sizes


def _print_bench(result: dict) -> None:
    from ..sparse.speed import speed_lines

    for warning in result.get("warnings", []):
        print(f"neuronatlas: warning: {warning}; rerun on an idle machine, or pin --threads below the free cores",
              file=sys.stderr)
    print(f"{result['method']} at sparsity {result['sparsity']:g}, median of {result['runs']} runs of "
          f"{result['new_tokens']} tokens")
    print("\n".join(line for line in speed_lines(result) if not line.startswith("warning:")))
    run_dense = ", run dense by the plan" if result.get("prefill") == "dense" else ""
    print(f"prefill ({result['prompt_tokens']} tokens{run_dense}): dense {1e3 * result['dense_prefill_s']:.1f} ms, "
          f"sparse {1e3 * result['sparse_prefill_s']:.1f} ms")
    if "ppl_dense" in result:
        print(_perplexity_line("perplexity", result))
    for label, point in result.get("by_label", {}).items():
        print(_perplexity_line(f"  {label} ({point['eval_windows']} windows)", point))
    for point in result.get("sweep", []):
        print(f"  sparsity {point['sparsity']:.2f}: ppl x{point['ppl_ratio']:.3f}, random x{point['ppl_random'] / point['ppl_dense']:.3f}")


def _perplexity_line(name: str, point: dict) -> str:
    line = f"{name}: dense {point['ppl_dense']:.3f}, sparse {point['ppl_sparse']:.3f} (x{point['ppl_ratio']:.3f})"
    return line + (f", random control {point['ppl_random']:.3f}" if "ppl_random" in point else "")
