"""``neuronatlas find METHOD``: the registry of find methods.

Each module of :data:`FAMILIES` lists its methods in ``METHODS``, as :class:`FindMethod` entries
(name, help, what it needs, a function adding its options, a function running it); ``find --help``
and the parser are built from them. Adding a method: write it in ``neuronatlas/methods/`` and add
its entry to a family module here (or a new module, named in :data:`FAMILIES`).
"""

from __future__ import annotations

import argparse

from ..args import debug_arg, overwrite_arg, quiet_arg
from ..common import preflight_output
from . import activation, confidence, detectors, gradients, probe, universal, weights
from .base import FindMethod, null_args

# The order of `find --help`.
FAMILIES = (activation, detectors, weights, gradients, probe, universal, confidence)


def methods() -> list[FindMethod]:
    """Every registered find method, in the order of ``find --help``."""
    return [method for family in FAMILIES for method in family.METHODS]


def register(commands) -> None:
    """Add ``find`` and its methods to the CLI's subcommands."""
    names = ", ".join(method.name for method in methods())
    find = commands.add_parser("find", help=f"identify neurons ({names}) into a neuron set JSON",
                               description="Identify neurons into a neuron set JSON; each METHOD lists [what it needs].")
    find.set_defaults(handler=lambda args: _no_method(find), debug=False)
    add_methods(find.add_subparsers(dest="method", metavar="METHOD"))


def add_methods(subparsers) -> None:
    """Add every registered method to ``subparsers`` (those of ``find``)."""
    for method in methods():
        parser = subparsers.add_parser(method.name, help=f"{method.help} [{', '.join(method.needs)}]",
                                       description=method.help[:1].upper() + method.help[1:] + ".")
        method.add_options(parser)
        if method.permutations is not None:
            null_args(parser, method.permutations)
        overwrite_arg(parser, "replace the neuron set already at --out")
        quiet_arg(parser)  # every method takes it, as the other verbs do (the atlas-only ones show no bar)
        debug_arg(parser)
        parser.set_defaults(handler=_preflighted(method.run))


def _preflighted(run):
    """``run`` after refusing an --out that exists (unless --overwrite), before any model or atlas loads."""

    def checked(args: argparse.Namespace) -> int:
        preflight_output(args.out, "file", overwrite=args.overwrite, what="neuron set JSON")
        return run(args)

    return checked


def _no_method(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
