"""``neuronatlas info``: metadata and per-layer summary of an atlas."""

from __future__ import annotations

import json

from .args import atlas_positional, debug_arg


def register(commands) -> None:
    parser = commands.add_parser("info", help="metadata and per-layer summary of an atlas")
    atlas_positional(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    debug_arg(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..atlas import load_atlas
    from ..summary import print_summary

    summary = load_atlas(args.atlas).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0
