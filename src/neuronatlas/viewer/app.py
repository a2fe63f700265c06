"""The FastAPI app: pages, a JSON API and live text over one atlas, read-only.

No request parameter names a file: the atlas, sets and explanations are read at start-up and the
two static files are served from memory.
"""

from __future__ import annotations

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import NeuronAtlasError
from ..tokens import decode_bytes, display_spans, piece_text, token_bytes
from .data import AtlasData
from .live import LiveModel, ModelUnavailable
from .pages import Pages, Site, add_samples, finite, neuron_record, static_files
from .search import Searcher

MAX_LIVE_CHARS = 2000
MEDIA_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = {
    # Defence in depth behind escaping: no inline or foreign scripts, no plugins, no framing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(data: AtlasData, model: LiveModel | None, allowed_hosts: list[str] | None = None,
               max_live_chars: int = MAX_LIVE_CHARS) -> FastAPI:
    """The viewer app. ``allowed_hosts``: Host headers to accept (against DNS rebinding); None = any."""
    app = FastAPI(title="neuronatlas", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    pages, searcher, site = Pages(data, model), Searcher(data, model), Site()
    assets = static_files()
    generator = np.random.default_rng()

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, error: StarletteHTTPException):
        message = error.detail if isinstance(error.detail, str) else "not found"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=error.status_code)
        return HTMLResponse(pages.error(site, str(error.status_code), message), status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse)
    def overview():
        return pages.overview(site)

    @app.get("/neuron/{layer}/{index}", response_class=HTMLResponse)
    def neuron_page(layer: str, index: str):
        layer_number, index_number = _neuron(data, layer, index)
        previous, following = data.neighbours(layer_number, index_number)
        record = neuron_record(data, model, layer_number, index_number)
        return pages.neuron(site, record, previous, following, site.random())

    _sample_routes(app, data, model, pages, site)

    @app.get("/neuron")
    def jump(layer: str = "", index: str = ""):
        layer_number, index_number = _neuron(data, layer, index)
        return RedirectResponse(site.neuron(layer_number, index_number), status_code=303)

    @app.get("/random")
    def random_neuron():
        return RedirectResponse(site.neuron(*data.random_neuron(generator)), status_code=303)

    @app.get("/search", response_class=HTMLResponse)
    def search_page(by: str = "token", q: str = "", page: int = 1):
        return pages.search(site, searcher.search(by, q, page))

    @app.get("/live", response_class=HTMLResponse)
    def live_page(layer: int | None = None, index: int | None = None, text: str = ""):
        return pages.live(site, "/api/live", layer, index, text[:max_live_chars], max_live_chars)

    @app.get("/api/summary")
    def summary_api():
        return _json(data.summary)

    @app.get("/api/neuron/{layer}/{index}")
    def neuron_api(layer: str, index: str):
        return _json(neuron_record(data, model, *_neuron(data, layer, index)))

    @app.get("/api/search")
    def search_api(by: str = "token", q: str = "", page: int = 1):
        return _json(searcher.search(by, q, page))

    @app.post("/api/live")
    def live_api(body: dict):
        return _live(data, model, body, max_live_chars)

    @app.get("/static/{name}")
    def asset(name: str):
        if name not in assets:
            raise StarletteHTTPException(404, f"no static file {name!r}")
        return Response(assets[name], media_type=MEDIA_TYPES[name[name.rfind("."):]])

    return app


def _neuron(data: AtlasData, layer: str, index: str) -> tuple[int, int]:
    """Parse and check a neuron's (layer, index); anything else is a 404 with the reason."""
    try:
        layer_number, index_number = int(layer), int(index)
    except ValueError:
        raise StarletteHTTPException(404, f"not a neuron: layer {layer!r}, index {index!r} (give two integers)") from None
    try:
        data.check_neuron(layer_number, index_number)
    except NeuronAtlasError as error:
        raise StarletteHTTPException(404, str(error)) from None
    return layer_number, index_number


def _sample_routes(app: FastAPI, data: AtlasData, model: LiveModel | None, pages: Pages, site: Site) -> None:
    """A neuron's samples (see neuronatlas.samples), drawn on first request: the page's section and JSON."""

    @app.get("/neuron/{layer}/{index}/samples", response_class=HTMLResponse)
    def samples_section(layer: str, index: str):
        """The neuron page's samples section, drawn now if need be (the page fetches it)."""
        layer_number, index_number = _neuron(data, layer, index)
        return pages.samples(site, add_samples(_sample_record(data, layer_number, index_number), data, model))

    @app.get("/api/neuron/{layer}/{index}/samples")
    def samples_api(layer: str, index: str):
        record = add_samples(_sample_record(data, *_neuron(data, layer, index)), data, model)
        if record.get("samples_error"):
            return JSONResponse({"error": record["samples_error"]}, status_code=503)
        return _json(record["samples"])


def _sample_record(data: AtlasData, layer: int, index: int) -> dict:
    """What the samples section needs of a neuron: its place and colour scale, no samples yet."""
    stats = data.atlas
    return {"layer": layer, "index": index, "samples": None,
            "max": float(stats.overall("max", layer)[index]), "min": float(stats.overall("min", layer)[index])}


def _live(data: AtlasData, model: LiveModel | None, body: dict, max_chars: int) -> JSONResponse:
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        return JSONResponse({"error": "give some text in the field 'text'"}, status_code=400)
    if len(text) > max_chars:
        return JSONResponse({"error": f"the text has {len(text)} characters; at most {max_chars} are run"}, status_code=413)
    neuron = None
    if body.get("layer") is not None or body.get("index") is not None:
        try:
            neuron = (int(body.get("layer")), int(body.get("index")))
            data.check_neuron(*neuron)
        except (TypeError, ValueError, NeuronAtlasError) as error:
            return JSONResponse({"error": f"bad neuron: {error}"}, status_code=400)
    if model is None:
        return JSONResponse({"error": "no model: live text needs the atlas's model"}, status_code=503)
    try:
        reply = model.run(text, neuron)
        _, tokenizer, _ = model.load()
    except ModelUnavailable as error:
        return JSONResponse({"error": str(error)}, status_code=503)
    return _json(readable_live(reply, tokenizer))


def readable_live(reply: dict, tokenizer) -> dict:
    """The live reply with readable tokens, the text, and "spans": the tokens joined into whole characters
    ({"text", "tokens": their indices}; the page colours each span by the max of its tokens)."""
    pieces = token_bytes(tokenizer, reply["token_ids"])
    spans = [{"text": span.text, "tokens": span.tokens} for span in display_spans(pieces)]
    return dict(reply, tokens=[piece_text(piece) for piece in pieces], text=decode_bytes(pieces), spans=spans)


def _json(value) -> JSONResponse:
    return JSONResponse(finite(value))
