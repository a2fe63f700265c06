"""The ``neuronatlas`` command line: parse arguments, call one verb, print its result.

One module per verb the user types; each has ``register(commands)`` (its parser) and ``run(args)``.
Shared flags live in :mod:`.args`, shared handler helpers in :mod:`.common`, and ``find``'s methods
in the registry of :mod:`.find`. User errors print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import NeuronAtlasError
from . import bench, demo, evaluate, explain, export, find, info, merge, profile, report, serve, sparsify, steer, vocab
from .args import Parser, resolve_atlas

# The order of `neuronatlas --help`.
VERBS = (profile, info, merge, demo, find, vocab, evaluate, steer, serve, report, explain, export, sparsify, bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a bad flag (one line printed by Parser.error)
        return exit.code if isinstance(exit.code, int) else 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        resolve_atlas(args)
        status = args.handler(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except NeuronAtlasError as error:
        if args.debug:
            raise
        print(f"neuronatlas: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # profile's carries where its checkpoint is and 130 or 143
        print(f"neuronatlas: {interrupt}" if str(interrupt) else "neuronatlas: interrupted", file=sys.stderr)
        return getattr(interrupt, "exit_status", 130)
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of stdout went away (``neuronatlas info ATLAS | head -1``): end quietly, with the
    status of a process ended by SIGPIPE, as other command-line tools do."""
    try:
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in-process)
        pass
    return 128 + 13  # 13 = SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="neuronatlas", description="Map the FFN neurons of transformer models.")
    parser.add_argument("--version", action="version", version=f"neuronatlas {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        verb.register(commands)
    return parser
