"""``neuronatlas evaluate``: ablate each label's neurons, measure every label's NLL, against random controls.

    neuronatlas evaluate --model DIR --sets SET.json --corpus FILE.jsonl --text-field text \\
        --label-field lang --out EVAL.json [--controls 5]
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NeuronAtlasError
from .args import corpus_args, debug_arg, finite_float, model_args, out_arg, overwrite_arg, quiet_arg, window_args
from .common import check_causal_model, load_model_from, preflight_output, read_corpus_from, write_json


def register(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="ablate each label's neurons and measure every label's NLL, against random controls",
        description="The causal check: for each label L of the neuron set, ablate L's neurons (all layers) and "
                    "measure the mean token NLL on held-out text of every label; compare with random sets of the "
                    "same per-layer sizes on L's text.",
    )
    model_args(parser)
    parser.add_argument("--sets", required=True, help="a neuron set JSON with labels (e.g. from find lape)")
    corpus_args(parser, help="held-out text with labels (.jsonl/.csv/.parquet/...)", formats=True)
    out_arg(parser, "where to write EVAL.json")
    overwrite_arg(parser, "replace EVAL.json (and the --markdown / --heatmap files) if they exist")
    parser.add_argument("--controls", type=int, default=5, help="random control sets per label (default: 5; 0 = none)")
    parser.add_argument("--op", default="zero", choices=["zero", "mean", "constant", "scale"],
                        help="how to ablate (default: zero)")
    parser.add_argument("--value", type=finite_float, default=None, help="the value of --op constant / scale")
    parser.add_argument("--atlas", default=None, help="the model's atlas (needed by --op mean)")
    parser.add_argument("--signal", default=None, choices=["z", "gate"],
                        help="the signal to ablate (default: the one the set was selected on, else z)")
    parser.add_argument("--max-docs-per-label", type=int, default=None, help="use at most N documents per label")
    window_args(parser, max_length=None, default_text="min(model positions, 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random control sets (default: 0)")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to PATH")
    parser.add_argument("--heatmap", default=None, help="also write a heatmap PNG to PATH")
    quiet_arg(parser, "print only the result lines")
    debug_arg(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..distributed import refuse_distributed

    refuse_distributed("evaluate")
    preflight_output(args.out, "file", overwrite=args.overwrite, what="evaluation JSON")
    preflight_output(args.markdown, "file", overwrite=args.overwrite, what="markdown table", flag="--markdown")
    preflight_output(args.heatmap, "file", overwrite=args.overwrite, what="heatmap PNG", flag="--heatmap")
    from ..evaluate import evaluate, format_matrix, plot_heatmap, to_markdown
    from ..loading import model_fingerprint
    from ..models import locate_neurons
    from ..neuronset import load_neuron_set

    neuron_set = load_neuron_set(args.sets)
    if not neuron_set.labels:
        if not neuron_set.neurons:
            raise NeuronAtlasError(f"neuron set {args.sets} is empty: {neuron_set.why_no_neurons()}")
        raise NeuronAtlasError(f"neuron set {args.sets} has no labels; evaluate needs labelled neurons (e.g. from find lape)")
    corpus = read_corpus_from(args)
    if args.label_field is None:
        raise NeuronAtlasError("evaluate needs labelled text: pass --label-field (e.g. --label-field lang)")
    check_causal_model(args, "evaluate", "next-token NLL")
    model, tokenizer = load_model_from(args)
    neuron_set.check_model(model_fingerprint(model), locate_neurons(model).widths)
    atlas = None
    if args.atlas:
        from ..atlas import load_atlas

        atlas = load_atlas(args.atlas)
    result = evaluate(
        model, tokenizer, neuron_set, corpus, controls=args.controls, op=args.op,
        max_docs_per_label=args.max_docs_per_label, seed=args.seed, atlas=atlas, value=args.value,
        signal=args.signal, batch_size=args.batch_size, max_length=args.max_length, check_fingerprint=False,
        quiet=args.quiet,
    )
    result["neuron_set"]["path"] = str(args.sets)
    result["model"]["name_or_path"] = args.model
    write_json(args.out, result)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(to_markdown(result))
    if args.heatmap:
        plot_heatmap(result, args.heatmap)
    print(format_matrix(result))
    if not args.quiet:
        print(f"evaluation written to {Path(args.out)} ({result['seconds']:.1f} s)")
    return 0
