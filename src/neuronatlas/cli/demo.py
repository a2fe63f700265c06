"""``neuronatlas demo``: the whole pipeline on the bundled tiny model and corpus (see neuronatlas.demo)."""

from __future__ import annotations

from ..errors import NeuronAtlasError
from .args import debug_arg, quiet_arg
from .common import preflight_output


def register(commands) -> None:
    parser = commands.add_parser("demo", help="profile the bundled tiny model on the bundled corpus")
    parser.add_argument("--model", default="tiny-llama", help="a bundled model (tiny-llama, tiny-gpt2) or any model path")
    parser.add_argument("--out", default="neuronatlas-demo",
                        help="folder for the atlas, neuron set, evaluation and plot (default: neuronatlas-demo)")
    quiet_arg(parser)
    debug_arg(parser)
    parser.set_defaults(handler=run)


DEMO_FILES = ("corpus.jsonl", "atlas")  # what a demo's folder holds: a rerun replaces it


def run(args) -> int:
    from ..demo import run_demo

    out = preflight_output(args.out, "folder", overwrite=None, what="demo")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in DEMO_FILES):
        raise NeuronAtlasError(f"--out {out} is not empty and holds no earlier demo; choose another --out")
    run_demo(args.model, args.out, quiet=args.quiet)
    return 0
