"""Command line: find probe, universal, entropy and frequency."""

from __future__ import annotations


def add_find_commands(methods) -> None:
    """Add this module's methods to `neuronatlas find` (work in progress)."""
