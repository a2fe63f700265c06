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
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--neurons", default=None, metavar="SET.json",
                       help="write pages for this neuron set's neurons (default: every neuron when they are at most "
                            "--max-pages; else the sets' neurons, LAPE's and the top neurons of each layer by max activation)")
    which.add_argument("--all", action="store_true", dest="all_neurons",
                       help="write a page for every neuron, however many")
    parser.add_argument("--max-pages", type=int, default=5_000,
                        help="neuron pages written at most without --all (default: 5000)")
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
    from .viewer import write_report
    from .viewer.report import choose_neurons, every_neuron

    viewer = _open(args)
    if args.all_neurons:
        chosen = every_neuron(viewer.data.widths)
    elif args.neurons:
        chosen = _neurons_of(args.neurons, viewer.data, args.max_pages)
    else:
        chosen = choose_neurons(viewer.data, args.max_pages)
    out = write_report(viewer, args.out, neurons=chosen, overwrite=args.overwrite, quiet=args.quiet)
    print(f"report written to {out}: open {out / 'index.html'}; {chosen.summary()}")
    return 0


def _neurons_of(path: str, data, max_pages: int):
    from .errors import NeuronAtlasError
    from .neuronset import load_neuron_set
    from .viewer.report import ReportNeurons

    chosen = load_neuron_set(path)
    chosen.check_model(data.meta["model"]["fingerprint"], data.widths)
    neurons = sorted({(n.layer, n.index) for n in chosen.neurons})
    if len(neurons) > max_pages:
        raise NeuronAtlasError(f"{path} names {len(neurons):,} neurons, more than --max-pages {max_pages:,}; "
                               "raise --max-pages or choose fewer neurons")
    return ReportNeurons(neurons, sum(data.widths), f"the neurons of {path}")
