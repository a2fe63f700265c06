"""Open an atlas for viewing and serve it with uvicorn on a socket bound up front."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeuronAtlasError
from .data import AtlasData
from .live import LiveModel

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class Viewer:
    """An atlas opened for viewing and the model behind it (loaded on first use)."""

    data: AtlasData
    model: LiveModel


def open_viewer(atlas: str | Path, sets=(), explanations=(), evaluations=(), model: str | None = None,
                device: str = "cpu", max_tokens: int = 256) -> Viewer:
    """Read the atlas and the files given; the model is the atlas's unless ``model`` names another copy."""
    data = AtlasData(atlas, sets, explanations, evaluations)
    meta = data.meta["model"]
    live = LiveModel(model or meta["name_or_path"], meta.get("fingerprint"), device=device, max_tokens=max_tokens)
    return Viewer(data, live)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); a port in use is a user error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise NeuronAtlasError(f"port {port} on {host} is in use; pick another with --port") from None
        raise NeuronAtlasError(f"cannot listen on {host}:{port} ({error.strerror}); check --host and --port") from None
    sock.listen(128)
    return sock


def allowed_hosts(host: str) -> list[str] | None:
    """Host headers a loopback-bound server accepts (a page on another site cannot reach it by DNS rebinding)."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return list(LOOPBACK_NAMES) if loopback else None


def serve(viewer: Viewer, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> None:
    """Serve until interrupted."""
    import uvicorn

    from .app import create_app

    sock = bind(host, port)
    app = create_app(viewer.data, viewer.model, allowed_hosts=allowed_hosts(host))
    shown = f"[{host}]" if ":" in host else host
    if not quiet:
        print(f"neuronatlas viewer on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet)
    uvicorn.Server(config).run(sockets=[sock])
