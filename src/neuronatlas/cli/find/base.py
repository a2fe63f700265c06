"""What one ``neuronatlas find`` method is, for the registry in :mod:`neuronatlas.cli.find`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from ..common import write_set


@dataclass(frozen=True)
class FindMethod:
    """``neuronatlas find NAME``: ``add_options`` adds its flags (``--debug`` is added for it),
    ``run(args)`` writes the neuron set and returns the exit status. ``needs`` names its inputs
    (atlas, model, corpus, facts ...), shown by ``find --help``."""

    name: str
    help: str
    needs: tuple[str, ...]
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def save(found, args, extra: str, source: str = "atlas") -> None:
    """Record where the set came from (``--atlas`` or ``--model``) in its params, then write it."""
    found.params[source] = str(getattr(args, source))
    write_set(found, args.out, extra)
