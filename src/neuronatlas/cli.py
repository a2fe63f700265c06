"""The ``neuronatlas`` command line: parse arguments, call one verb, print its result.

User errors print one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .cli_explain import register as register_explain
from .cli_find import register as register_find
from .cli_prove import register as register_prove
from .cli_sparse import register as register_sparse
from .cli_view import register as register_view
from .errors import NeuronAtlasError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except NeuronAtlasError as error:
        if args.debug:
            raise
        print(f"neuronatlas: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuronatlas: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronatlas", description="Map the FFN neurons of transformer models.")
    parser.add_argument("--version", action="version", version=f"neuronatlas {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_profile(commands)
    _add_info(commands)
    _add_merge(commands)
    _add_demo(commands)
    register_find(commands)
    register_prove(commands)
    register_view(commands)
    register_explain(commands)
    register_sparse(commands)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_corpus_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--corpus", required=required, help="a .txt/.jsonl/.csv/.parquet file, a datasets folder or a folder of .txt files")
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    parser.add_argument("--label-field", default=None, help="field or column holding the label (language, topic ...)")
    parser.add_argument("--label-from-folder", action="store_true", help="label each file of a folder corpus by its subfolder")
    parser.add_argument("--format", default=None, choices=["txt", "jsonl", "csv", "parquet", "dataset", "folder"],
                        help="corpus format (default: from the suffix)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model id or a local model folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                        help="spread a model larger than one device over the GPUs and the CPU (accelerate); "
                             "replaces --device")
    parser.add_argument("--load-in", default=None, choices=["8bit", "4bit"],
                        help="quantise the linear layers while loading (needs bitsandbytes and a CUDA GPU)")


def _add_profile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per window (default: min(model positions, 512))")
    parser.add_argument("--threshold", type=float, default=0.0, help="active means activation > threshold (default: 0)")
    parser.add_argument("--top-k", type=int, default=20, help="exemplars kept per neuron (default: 20)")
    parser.add_argument("--no-gate", action="store_true", help="skip the gate signal of gated families")
    parser.add_argument("--padding-side", default="right", choices=["left", "right"])
    parser.add_argument("--doc-sample", type=int, default=256, metavar="N",
                        help="keep the mean and max z of the first N documents of each label, for "
                             "`find selectivity` (default: 256; 0 = none)")
    parser.add_argument("--no-positions", action="store_true",
                        help="skip the statistics per position bucket that `find positional` reads")
    parser.add_argument("--exemplar-radius", type=int, default=16, metavar="R",
                        help="keep each exemplar's z at R tokens either side, for the viewer and "
                             "explanations (one more forward pass over the exemplar windows; default: 16; 0 = none)")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints (default: 300)")
    parser.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others at the rendezvous and at the "
                             "merge (default: 1800)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_profile(commands) -> None:
    parser = commands.add_parser("profile", help="profile every FFN neuron over a corpus into an atlas")
    _add_model_args(parser)
    _add_corpus_args(parser)
    _add_profile_options(parser)
    parser.add_argument("--out", required=True, help="the atlas folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an atlas already in --out")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted profile in --out")
    _common(parser)
    parser.set_defaults(handler=_run_profile)


def _profile_options(args):
    from .profile import ProfileOptions

    return ProfileOptions(
        batch_size=args.batch_size, max_length=args.max_length, threshold=args.threshold, top_k=args.top_k,
        gate=not args.no_gate, padding_side=args.padding_side, dtype=args.dtype,
        doc_sample=args.doc_sample, positions=not args.no_positions, exemplar_radius=args.exemplar_radius,
    )


def _read_corpus(args):
    from .corpus import read_corpus

    return read_corpus(args.corpus, text_field=args.text_field, label_field=args.label_field,
                       format=args.format, label_from_folder=args.label_from_folder)


def _run_profile(args) -> int:
    from .distributed import launch_from_env
    from .profile import profile

    atlas = profile(
        args.model, _read_corpus(args), args.out, options=_profile_options(args), device=args.device,
        device_map=args.device_map, load_in=args.load_in, overwrite=args.overwrite, resume=args.resume,
        quiet=args.quiet, checkpoint_every=args.checkpoint_every, trust_remote_code=args.trust_remote_code,
        dist_timeout=args.dist_timeout,
    )
    launch = launch_from_env()
    if not args.quiet and (launch is None or launch.rank == 0):  # one summary per job
        print_summary(atlas.summary())
        print(f"atlas written to {args.out}")
    return 0


def _add_info(commands) -> None:
    parser = commands.add_parser("info", help="metadata and per-layer summary of an atlas")
    parser.add_argument("atlas", help="an atlas folder")
    parser.add_argument("--json", action="store_true", help="print JSON")
    _common(parser)
    parser.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    from .atlas import load_atlas

    summary = load_atlas(args.atlas).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def _add_merge(commands) -> None:
    parser = commands.add_parser("merge", help="merge atlases of consecutive parts of a corpus")
    parser.add_argument("atlases", nargs="+", help="atlas folders, in corpus order")
    parser.add_argument("--out", required=True, help="the merged atlas folder")
    parser.add_argument("--overwrite", action="store_true")
    _common(parser)
    parser.set_defaults(handler=_run_merge)


def _run_merge(args) -> int:
    from pathlib import Path

    from .atlas import is_atlas, load_atlas, merge_atlases

    if len(args.atlases) < 2:
        raise NeuronAtlasError("merge needs at least two atlases")
    if is_atlas(args.out) and not args.overwrite:
        raise NeuronAtlasError(f"{args.out} already holds an atlas; pass --overwrite to replace it")
    merged = load_atlas(args.atlases[0])
    for path in args.atlases[1:]:
        merged = merge_atlases(merged, load_atlas(path))
    merged.save(Path(args.out))
    print(f"merged {len(args.atlases)} atlases into {args.out}: {merged.summary()['tokens']:,} tokens")
    return 0


def _add_demo(commands) -> None:
    parser = commands.add_parser("demo", help="profile the bundled tiny model on the bundled corpus")
    parser.add_argument("--model", default="tiny-llama", help="a bundled model (tiny-llama, tiny-gpt2) or any model path")
    parser.add_argument("--out", default="neuronatlas-demo", help="folder for the atlas, neuron set, evaluation and plot (default: neuronatlas-demo)")
    parser.add_argument("--quiet", action="store_true")
    _common(parser)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.out, quiet=args.quiet)
    return 0


def print_summary(summary: dict) -> None:
    """A per-layer table: neurons, activation rate, % dead."""
    print(f"model {summary['model']} ({summary['model_type']}), corpus {summary['corpus']}")
    print(f"{summary['tokens']:,} tokens in {summary['documents']:,} documents ({summary['windows']:,} windows)")
    print("tokens per label: " + ", ".join(f"{k} {v:,}" for k, v in summary["tokens_per_label"].items()))
    gate = summary.get("gate_dead_fraction_per_layer")
    header = f"{'layer':>5} {'neurons':>8} {'active %':>9} {'dead %':>7}" + (f" {'gate dead %':>11}" if gate else "")
    print(header)
    rows = zip(summary["neurons_per_layer"], summary["activation_rate_per_layer"], summary["dead_fraction_per_layer"])
    for layer, (width, rate, dead) in enumerate(rows):
        line = f"{layer:>5} {width:>8} {100 * rate:>9.2f} {100 * dead:>7.2f}"
        if gate:
            line += f" {100 * gate[layer]:>11.2f}"
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
