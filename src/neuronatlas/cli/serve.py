"""``neuronatlas serve``: browse an atlas in a local web viewer. :func:`source_args` and
:func:`open_from` are shared with ``report``."""

from __future__ import annotations

from ..errors import NeuronAtlasError
from .args import atlas_positional, debug_arg, device_arg, quiet_arg


def register(commands) -> None:
    parser = commands.add_parser("serve", help="browse an atlas in a local web viewer")
    source_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens of live text run at most (default: 256)")
    quiet_arg(parser, "no request log")
    parser.set_defaults(handler=run)


def source_args(parser) -> None:
    """The atlas and what the viewer shows with it."""
    atlas_positional(parser, "an atlas folder (from `neuronatlas profile`)")
    parser.add_argument("--sets", nargs="+", default=[], metavar="SET.json", help="neuron sets to show (from `neuronatlas find`)")
    parser.add_argument("--explanations", nargs="+", default=[], metavar="EXPL.json",
                        help="explanations to show (from `neuronatlas explain`)")
    parser.add_argument("--eval", nargs="+", default=[], metavar="EVAL.json", dest="evaluations",
                        help="evaluations to show on the overview (from `neuronatlas evaluate --out`)")
    parser.add_argument("--model", default=None,
                        help="the model's folder or id, when not where atlas.json says (vocabulary projection, live text)")
    device_arg(parser)
    debug_arg(parser)


def open_from(args):
    """The viewer of the atlas and sources the flags name."""
    from ..viewer import open_viewer

    return open_viewer(args.atlas, sets=args.sets, explanations=args.explanations, evaluations=args.evaluations,
                       model=args.model, device=args.device, max_tokens=getattr(args, "max_tokens", 256))


def run(args) -> int:
    from ..viewer import serve

    if not 0 <= args.port <= 65535:
        raise NeuronAtlasError(f"port {args.port} is not a TCP port; give one in 0-65535")
    if args.max_tokens < 1:
        raise NeuronAtlasError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    serve(open_from(args), host=args.host, port=args.port, quiet=args.quiet)
    return 0
