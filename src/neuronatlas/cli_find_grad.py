"""Command line: find attribution, ig, atp and cett (gradient-based methods)."""

from __future__ import annotations


def add_find_commands(methods) -> None:
    """Add this module's methods to `neuronatlas find` (work in progress)."""
