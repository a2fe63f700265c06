"""The web atlas viewer: ``serve`` an atlas over HTTP, or write it as a static ``report``.

    >>> viewer = open_viewer("ATLAS", sets=["lape.json"])   # doctest: +SKIP
    >>> serve(viewer, port=8000)                             # doctest: +SKIP
    >>> write_report(viewer, "REPORT")                       # doctest: +SKIP
"""

from __future__ import annotations

from .report import write_report
from .server import Viewer, open_viewer, serve

__all__ = ["Viewer", "open_viewer", "serve", "write_report"]
