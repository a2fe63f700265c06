"""``neuronatlas report``: write the viewer's pages as static HTML."""

from __future__ import annotations

from ..errors import NeuronAtlasError
from .args import overwrite_arg, quiet_arg
from .serve import open_from, source_args


def register(commands) -> None:
    parser = commands.add_parser("report", help="write the viewer's pages as static HTML")
    source_args(parser)
    parser.add_argument("-o", "--out", required=True, help="folder to write the report into")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--neurons", default=None, metavar="SET.json",
                       help="write pages for this neuron set's neurons (default: every neuron when they are at most "
                            "--max-pages; else the sets' neurons, LAPE's and the top neurons of each layer by max activation)")
    which.add_argument("--all", action="store_true", dest="all_neurons",
                       help="write a page for every neuron, however many")
    parser.add_argument("--max-pages", type=int, default=5_000,
                        help="neuron pages written at most without --all (default: 5000)")
    overwrite_arg(parser, "replace a non-empty --out")
    quiet_arg(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..viewer import write_report
    from ..viewer.report import choose_neurons, every_neuron, report_size

    viewer = open_from(args)
    if args.all_neurons:
        chosen = every_neuron(viewer.data.widths)
    elif args.neurons:
        chosen = _neurons_of(args.neurons, viewer.data, args.max_pages)
    else:
        chosen = choose_neurons(viewer.data, args.max_pages)
    out = write_report(viewer, args.out, neurons=chosen, overwrite=args.overwrite, quiet=args.quiet)
    size = report_size(out)
    print(f"report written to {out}: open {out / 'index.html'}; {chosen.summary()}; {size['pages']:,} neuron pages of "
          f"{size['page_bytes'] / 1000:.1f} KB on average (largest {size['largest_page'] / 1000:.1f} KB), "
          f"{size['total_bytes'] / 1e6:.1f} MB in all")
    return 0


def _neurons_of(path: str, data, max_pages: int):
    """The pages of the neurons of the set at ``path`` (at most ``max_pages``)."""
    from ..neuronset import load_neuron_set
    from ..viewer.report import ReportNeurons

    chosen = load_neuron_set(path)
    chosen.check_model(data.meta["model"]["fingerprint"], data.widths)
    neurons = sorted({(n.layer, n.index) for n in chosen.neurons})
    if len(neurons) > max_pages:
        raise NeuronAtlasError(f"{path} names {len(neurons):,} neurons, more than --max-pages {max_pages:,}; "
                               "raise --max-pages or choose fewer neurons")
    return ReportNeurons(neurons, sum(data.widths), f"the neurons of {path}")
