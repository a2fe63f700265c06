"""The ``neuronatlas`` command line: parse arguments, call one verb, print its result.

One module per verb the user types; each has ``register(commands)`` (its parser) and ``run(args)``.
Shared flags live in :mod:`.args`, shared handler helpers in :mod:`.common`, and ``find``'s methods
in the registry of :mod:`.find`. User errors print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import NeuronAtlasError
from . import bench, demo, evaluate, explain, find, info, merge, profile, report, serve, sparsify, steer, vocab

# The order of `neuronatlas --help`.
VERBS = (profile, info, merge, demo, find, vocab, evaluate, steer, serve, report, explain, sparsify, bench)


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
    for verb in VERBS:
        verb.register(commands)
    return parser
