"""Command line: sparsify and bench (sparse inference)."""

from __future__ import annotations


def register(commands) -> None:
    """Add this module's subcommands to the CLI (work in progress)."""
