"""``neuronatlas merge``: merge atlases of consecutive parts of a corpus into one.

The atlases' metadata is compared first, so a refusal names what differs: the same atlas or corpus part
given twice (every count would double), another model, or the option that differs.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import NeuronAtlasError
from .args import debug_arg, out_arg, overwrite_arg
from .common import preflight_output

# The profile options every part must share (those merge_atlases compares): counts of one threshold,
# exemplar lists of one length, histograms over the same edges.
SHARED_OPTIONS = ("threshold", "top_k", "hist_edges")


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
    from ..docpool import why_not_merged

    if len(args.atlases) < 2:
        raise NeuronAtlasError("merge needs at least two atlases")
    _refuse_repeated_paths(args.atlases)
    if is_atlas(args.out) and not args.overwrite:
        raise NeuronAtlasError(f"{args.out} already holds an atlas; pass --overwrite to replace it")
    preflight_output(args.out, "folder", overwrite=args.overwrite, what="merged atlas")
    atlases = [load_atlas(path) for path in args.atlases]
    check_parts([(path, atlas.meta) for path, atlas in zip(args.atlases, atlases)])
    merged, dropped = atlases[0], None
    for atlas in atlases[1:]:
        if merged.docpool is not None or atlas.docpool is not None:
            dropped = dropped or why_not_merged(merged.docpool, atlas.docpool)
        merged = merge_atlases(merged, atlas)
    merged.save(Path(args.out))
    if dropped:
        print(f"note: the merged atlas has no document sample (find's document-level scores need one): {dropped}")
    print(f"merged {len(args.atlases)} atlases into {args.out}: {merged.summary()['tokens']:,} tokens")
    return 0


def _refuse_repeated_paths(paths: list[str]) -> None:
    seen: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise NeuronAtlasError(f"merge got the atlas {path} twice (as {seen[resolved]} and {path}): every count "
                                   "would double; give each part once")
        seen[resolved] = path


def check_parts(parts: list[tuple[str, dict]]) -> None:
    """Refuse parts (path, atlas metadata) of other models, with differing shared options, or whose
    corpora overlap (the same corpus fingerprint over intersecting document ranges)."""
    first_path, first = parts[0]
    covered: list[tuple[str, str, tuple[float, float]]] = []  # (atlas path, fingerprint, documents range)
    for path, meta in parts:
        if meta["model"].get("fingerprint") != first["model"].get("fingerprint"):
            raise NeuronAtlasError(f"cannot merge atlases of different models: {first_path} profiled "
                                   f"{first['model'].get('name_or_path')}, {path} {meta['model'].get('name_or_path')}")
        _check_options(first_path, first["options"], path, meta["options"])
        for fingerprint, span in corpus_parts(meta):
            for other_path, other_fingerprint, other_span in covered:
                if fingerprint == other_fingerprint and span[0] < other_span[1] and other_span[0] < span[1]:
                    raise NeuronAtlasError(
                        f"{path} and {other_path} profiled the same corpus documents (corpus fingerprint "
                        f"{fingerprint[:12]}): merging would count them twice; merge atlases of distinct corpus parts")
            covered.append((path, fingerprint, span))


def _check_options(first_path: str, first: dict, path: str, options: dict) -> None:
    differing = [key for key in SHARED_OPTIONS if first.get(key) != options.get(key)]
    if differing:
        shown = "; ".join(f"{key} {_shown(first.get(key))} in {first_path} but {_shown(options.get(key))} in {path}"
                          for key in differing)
        raise NeuronAtlasError(f"cannot merge atlases profiled with different options: {shown} "
                               "(profile every part with the same options)")


def _shown(value) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{value[0]}, {value[1]}, ... {value[-1]}] ({len(value)} values)"
    return str(value)


def corpus_parts(meta: dict) -> list[tuple[str, tuple[float, float]]]:
    """(fingerprint, [first, stop) documents) of each corpus an atlas profiled; a merged atlas lists its
    parts. A part without a recorded range covers its whole corpus."""
    corpus = meta.get("corpus") or {}
    leaves = corpus.get("parts") or [corpus]
    found = []
    for leaf in leaves:
        if "parts" in leaf:
            found.extend(corpus_parts({"corpus": leaf}))
            continue
        span = leaf.get("documents_range") or (0, math.inf)
        found.append((str(leaf.get("fingerprint")), (span[0], span[1])))
    return found
