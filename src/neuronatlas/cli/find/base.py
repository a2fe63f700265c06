"""What one ``neuronatlas find`` method is, for the registry in :mod:`neuronatlas.cli.find`, and the
null option group every label-scoring method shares."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class FindMethod:
    """``neuronatlas find NAME``: ``add_options`` adds its flags (``--debug`` is added for it),
    ``run(args)`` writes the neuron set and returns the exit status. ``needs`` names its inputs
    (atlas, model, corpus, facts ...), shown by ``find --help``. ``permutations``: the default number
    of label shuffles of its null (None: the method scores no labels and has no null); the registry
    adds ``--fdr --no-null --permutations --min-docs --seed`` for it."""

    name: str
    help: str
    needs: tuple[str, ...]
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    permutations: int | None = None


def null_args(parser: argparse.ArgumentParser, permutations: int) -> None:
    """The permutation-null flags, one group, the same for every method that scores labels."""
    group = parser.add_argument_group("null", "a permutation baseline: the method again on shuffled labels; "
                                              "only neurons with q below --fdr are kept")
    group.add_argument("--fdr", type=float, default=0.05,
                       help="keep neurons whose Benjamini-Hochberg q-value is below this (default: 0.05)")
    group.add_argument("--no-null", action="store_true", help="no permutation null: keep what the method scores")
    group.add_argument("--permutations", type=int, default=None,
                       help=f"label shuffles of the null (default: {permutations})")
    group.add_argument("--min-docs", type=int, default=20,
                       help="refuse a label with fewer documents than this (default: 20)")
    try:
        group.add_argument("--seed", type=int, default=0, help="seed of the label shuffles (default: 0)")
    except argparse.ArgumentError:
        pass  # the method has its own --seed (of its split or rotations): it seeds the shuffles too


def null_options(args):
    """The :class:`~neuronatlas.methods.nulls.NullOptions` of the flags; None with --no-null."""
    from ...methods.nulls import NullOptions

    if args.no_null:
        return None
    return NullOptions(permutations=args.permutations, fdr=args.fdr, seed=args.seed, min_docs=args.min_docs)


def label_field_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-field", default=None,
                        help="the label field the atlas was profiled with (checked; the atlas holds the labels)")


def check_label_field(atlas, label_field: str | None) -> None:
    """--label-field of an atlas-based method: the atlas's labels come from its profile, so it must match."""
    from ...errors import NeuronAtlasError

    profiled = (atlas.meta.get("corpus") or {}).get("label_field")
    if label_field is not None and label_field != profiled:
        raise NeuronAtlasError(f"--label-field {label_field} does not match the atlas's label field "
                               f"({profiled or 'none'}); profile again with --label-field {label_field}")


def write_found(found, out: str, extra: str = "") -> None:
    """Save ``found`` to ``out``; print its summary (neurons vs pairs, labels with 0, signal, null)."""
    found.save(out)
    for line in found.summary_lines(extra):
        print(line)
    print(f"neuron set written to {out}")


def save(found, args, extra: str, source: str = "atlas") -> None:
    """Record where the set came from (``--atlas`` or ``--model``) in its params, then write it."""
    found.params[source] = str(getattr(args, source))
    write_found(found, args.out, extra)
