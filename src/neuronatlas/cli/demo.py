"""``neuronatlas demo``: the whole pipeline on the bundled tiny model and corpus (see neuronatlas.demo)."""

from __future__ import annotations

from .args import debug_arg, quiet_arg


def register(commands) -> None:
    parser = commands.add_parser("demo", help="profile the bundled tiny model on the bundled corpus")
    parser.add_argument("--model", default="tiny-llama", help="a bundled model (tiny-llama, tiny-gpt2) or any model path")
    parser.add_argument("--out", default="neuronatlas-demo",
                        help="folder for the atlas, neuron set, evaluation and plot (default: neuronatlas-demo)")
    quiet_arg(parser)
    debug_arg(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.model, args.out, quiet=args.quiet)
    return 0
