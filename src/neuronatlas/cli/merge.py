"""``neuronatlas merge``: merge atlases of consecutive parts of a corpus into one."""

from __future__ import annotations

from pathlib import Path

from ..errors import NeuronAtlasError
from .args import debug_arg, out_arg, overwrite_arg


def register(commands) -> None:
    parser = commands.add_parser("merge", help="merge atlases of consecutive parts of a corpus")
    parser.add_argument("atlases", nargs="+", help="atlas folders, in corpus order")
    out_arg(parser, "the merged atlas folder")
    overwrite_arg(parser, "replace an atlas already in --out")
    debug_arg(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..atlas import is_atlas, load_atlas
    from ..atlas_merge import merge_atlases

    if len(args.atlases) < 2:
        raise NeuronAtlasError("merge needs at least two atlases")
    if is_atlas(args.out) and not args.overwrite:
        raise NeuronAtlasError(f"{args.out} already holds an atlas; pass --overwrite to replace it")
    merged = load_atlas(args.atlases[0])
    for path in args.atlases[1:]:
        merged = merge_atlases(merged, load_atlas(path))
    merged.save(Path(args.out))
    print(f"merged {len(args.atlases)} atlases into {args.out}: {merged.summary()['tokens']:,} tokens")
    return 0
