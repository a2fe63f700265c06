"""Command line: serve and report (the web viewer)."""

from __future__ import annotations


def register(commands) -> None:
    """Add ``serve`` and ``report`` to the CLI."""
    _add_serve(commands)
    _add_report(commands)


def _add_sources(parser) -> None:
    parser.add_argument("atlas", help="an atlas folder (from `neuronatlas profile`)")
    parser.add_argument("--sets", nargs="+", default=[], metavar="SET.json", help="neuron sets to show (from `neuronatlas find`)")
    parser.add_argument("--explanations", nargs="+", default=[], metavar="EXPL.json",
                        help="explanations to show (from `neuronatlas explain`)")
    parser.add_argument("--eval", nargs="+", default=[], metavar="EVAL.json", dest="evaluations",
                        help="evaluations to show on the overview (from `neuronatlas evaluate --out`)")
    parser.add_argument("--model", default=None,
                        help="the model's folder or id, when not where atlas.json says (vocabulary projection, live text)")
    parser.add_argument("--device", default="cpu", help="device for the model (default: cpu)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="browse an atlas in a local web viewer")
    _add_sources(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens of live text run at most (default: 256)")
    parser.add_argument("--quiet", action="store_true", help="no request log")
    parser.set_defaults(handler=_run_serve)


def _add_report(commands) -> None:
    parser = commands.add_parser("report", help="write the viewer's pages as static HTML")
    _add_sources(parser)
    parser.add_argument("-o", "--out", required=True, help="folder to write the report into")
    parser.add_argument("--neurons", default=None, metavar="SET.json",
                        help="write pages only for this neuron set's neurons (default: every neuron)")
    parser.add_argument("--max-pages", type=int, default=20_000,
                        help="refuse to write more neuron pages than this (default: 20000); pick neurons with --neurons")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_report)


def _open(args):
    from .viewer import open_viewer

    return open_viewer(args.atlas, sets=args.sets, explanations=args.explanations, evaluations=args.evaluations,
                       model=args.model, device=args.device, max_tokens=getattr(args, "max_tokens", 256))


def _run_serve(args) -> int:
    from .errors import NeuronAtlasError
    from .viewer import serve

    if not 0 <= args.port <= 65535:
        raise NeuronAtlasError(f"port {args.port} is not a TCP port; give one in 0-65535")
    if args.max_tokens < 1:
        raise NeuronAtlasError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    serve(_open(args), host=args.host, port=args.port, quiet=args.quiet)
    return 0


def _run_report(args) -> int:
    from .errors import NeuronAtlasError
    from .neuronset import load_neuron_set
    from .viewer import write_report

    viewer = _open(args)
    neurons = None
    if args.neurons:
        chosen = load_neuron_set(args.neurons)
        chosen.check_model(viewer.data.meta["model"]["fingerprint"], viewer.data.widths)
        neurons = sorted({(n.layer, n.index) for n in chosen.neurons})
    pages = len(neurons) if neurons is not None else sum(viewer.data.widths)
    if pages > args.max_pages:
        raise NeuronAtlasError(f"the report would have {pages:,} neuron pages, more than --max-pages {args.max_pages:,}; "
                               "choose neurons with --neurons SET.json or raise --max-pages")
    out = write_report(viewer, args.out, neurons=neurons, overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        print(f"report written to {out}: open {out / 'index.html'} ({pages:,} neuron pages)")
    return 0
