"""Command line: serve and report (the web viewer)."""

from __future__ import annotations


def register(commands) -> None:
    """Add this module's subcommands to the CLI (work in progress)."""
