"""The viewer's pages as HTML strings (Jinja2, autoescaped), shared by the server and the report.

Where links point is the :class:`Site`'s business: absolute URLs for the server, relative file
names for the static report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from ..errors import NeuronAtlasError
from ..samples import read_cached
from ..tokens import Span, display_spans, token_texts
from .data import VIEWER_LAPE, AtlasData
from .exemplars import merge_near_duplicates
from .live import VIEWER_SAMPLES, LiveModel, ModelUnavailable
from .plots import bar_chart, heat_colour, histogram, scale_text, token_spans
from .search import COLUMNS, KINDS

STATIC_FILES = ("viewer.css", "viewer.js")


@dataclass
class Site:
    """Where links point. ``root``: "/" for the server, a relative prefix ("../../") in a report."""

    root: str = "/"
    static: bool = False
    random_target: str | None = None  # a report's "random" link (the server has /random)

    def home(self) -> str:
        return f"{self.root}index.html" if self.static else self.root

    def neuron(self, layer: int, index: int) -> str:
        return f"{self.neuron_root()}{layer}/{index}" + (".html" if self.static else "")

    def neuron_root(self) -> str:
        return f"{self.root}neuron/"

    def search(self, by: str | None = None, q: str | None = None, page: int = 1) -> str:
        query = {key: value for key, value in (("by", by), ("q", q), ("page", page if page > 1 else None)) if value}
        page_name = "search.html" if self.static else "search"  # a report's search reads the query in the browser
        return f"{self.root}{page_name}" + (f"?{urlencode(query)}" if query else "")

    def jump(self) -> str:
        return f"{self.root}neuron"

    def live(self, layer: int | None = None, index: int | None = None) -> str | None:
        if self.static:
            return None
        return f"{self.root}live" + (f"?{urlencode({'layer': layer, 'index': index})}" if layer is not None else "")

    def samples(self, layer: int, index: int) -> str | None:
        """Where the server draws a neuron's samples (a report holds only those drawn before)."""
        return None if self.static else f"{self.root}neuron/{layer}/{index}/samples"

    def random(self) -> str | None:
        return self.random_target if self.static else f"{self.root}random"

    def asset(self, name: str) -> str:
        return f"{self.root}static/{name}"


def static_files() -> dict[str, bytes]:
    """The CSS and JS the pages link to, read once from the package."""
    folder = resources.files("neuronatlas.viewer") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


class Pages:
    """Renders every page of one atlas."""

    def __init__(self, data: AtlasData, model: LiveModel | None):
        self.data, self.model = data, model
        self.env = Environment(loader=PackageLoader("neuronatlas.viewer", "templates"), trim_blocks=True,
                               lstrip_blocks=True,  # no template indentation in the pages: a report holds thousands
                               autoescape=select_autoescape(["html"], default_for_string=True, default=True))
        self.env.globals.update(window=self.window, heat=heat_colour, cell=_cell, scale_text=scale_text)

    def window(self, item: dict, scale: float = 0.0) -> Markup:
        """An exemplar's or sample's window as text in spans of whole characters, with each token's value."""
        values = item["activations"]
        if "spans" in item:  # a sample: spans made with the model's tokenizer (see neuronatlas.samples)
            spans = [_span(span, item["tokens"], values) for span in item["spans"]]
        else:
            spans = display_spans(self.data.pieces(item["token_ids"]), values)
        return token_spans(spans, item["peak"], scale)

    def _render(self, template: str, site: Site, **context) -> str:
        model_name = f"{self.data.summary['model']} · {self.data.summary['corpus']}"
        return self.env.get_template(template).render(site=site, model_name=model_name, **context)

    def overview(self, site: Site, report: dict | None = None) -> str:
        """The overview; ``report``: which neurons a static report holds pages for (see report.py)."""
        data, summary = self.data, self.data.summary
        layers = [str(layer) for layer in range(summary["layers"])]
        widths = layer_widths(summary["neurons_per_layer"])
        specialised = [_heatmap(data.specialised_counts(neuron_set, name)) for name, neuron_set in data.sets]
        lape = _heatmap(data.specialised_counts(data.viewer_lape, VIEWER_LAPE)) if data.viewer_lape else None
        evaluations = [dict(result, peak=_peak(result)) for result in data.evaluations]
        return self._render(
            "overview.html", site, summary=summary, widths=widths, fingerprint=data.meta["model"]["fingerprint"],
            has_windows=data.has_windows, specialised=specialised, evaluations=evaluations,
            lape=lape, lape_name=VIEWER_LAPE, lape_note=data.viewer_lape_note, explanations=data.explanations, report=report,
            rate_plot=bar_chart(summary["activation_rate_per_layer"], layers, "activation rate per layer", percent=True),
            dead_plot=bar_chart(summary["dead_fraction_per_layer"], layers, "dead neurons per layer", percent=True),
        )

    def neuron(self, site: Site, record: dict, previous=None, following=None, random=None) -> str:
        """The page of the neuron described by ``record`` (see :func:`neuron_record`)."""
        hist = record["histogram"]
        return self._render(
            "neuron.html", site, n=record, previous=previous, following=following, random=random,
            has_windows=self.data.has_windows, scale=_colour_scale(record), **self._samples_context(site, record),
            histogram=histogram(hist["edges"], hist["counts"], "activation histogram (all labels)",
                                shared_edges=site.static) if hist else None,
            profile_plot=_label_chart(record),
        )

    def samples(self, site: Site, record: dict) -> str:
        """The samples section alone, for a page that asked the server to draw them."""
        return self.env.get_template("samples.html").render(site=site, n=record, scale=_colour_scale(record),
                                                            **self._samples_context(site, record))

    def _samples_context(self, site: Site, record: dict) -> dict:
        return {"samples": record["samples"], "samples_error": record.get("samples_error"),
                "samples_url": None if record["samples"] or self.model is None else site.samples(record["layer"], record["index"]),
                "threshold": self.data.meta["options"].get("threshold", 0.0)}

    def search(self, site: Site, result: dict) -> str:
        return self._render("search.html", site, kinds=KINDS, columns=COLUMNS.get(result["by"], []),
                            columns_by_kind=COLUMNS, **result)

    def live(self, site: Site, api: str, layer: int | None, index: int | None, text: str, max_chars: int) -> str:
        unavailable = None
        if self.model is None:
            unavailable = "no model: live text needs the atlas's model"
        else:
            try:
                self.model.load()
            except ModelUnavailable as error:
                unavailable = str(error)
        return self._render("live.html", site, api=api, layer=layer, index=index, text=text, max_chars=max_chars,
                            max_tokens=self.model.max_tokens if self.model else 0, unavailable=unavailable)

    def error(self, site: Site, status: str, message: str) -> str:
        return self._render("error.html", site, status=status, message=message)


def neuron_record(data: AtlasData, model: LiveModel | None, layer: int, index: int) -> dict:
    """Everything about one neuron, as the API returns it and the neuron page shows it."""
    data.check_neuron(layer, index)
    record = {"layer": layer, "index": index, **data.neuron_stats(layer, index)}
    record["exemplars"] = merge_near_duplicates(data.exemplars(layer, index))
    bottom = data.bottom_exemplars(layer, index)
    record["bottom_exemplars"] = merge_near_duplicates(bottom) if bottom is not None else None
    record["label_signal"] = data.label_signal(layer, index)
    cached = read_cached(data.path, data.meta, (layer, index), **VIEWER_SAMPLES)
    record["samples"] = cached.to_json() if cached else None
    record["sets"] = [{"set": m.set_name, "method": m.method, "label": m.label, "score": m.score, "rank": m.rank}
                      for m in data.memberships.get((layer, index), [])]
    record["explanations"] = data.explanations_of(layer, index)
    record["top_tokens"], record["bottom_tokens"], record["vocab_projection_error"] = [], [], None
    try:
        if model is None:
            raise ModelUnavailable("no model given: the vocabulary projection needs the atlas's model")
        record["top_tokens"], record["bottom_tokens"] = readable_projection(model, layer, index)
    except ModelUnavailable as error:
        record["vocab_projection_error"] = str(error)
    return record


def add_samples(record: dict, data: AtlasData, model: LiveModel | None) -> dict:
    """Draw the neuron's samples into ``record`` (or the reason they cannot be: "samples_error")."""
    try:
        if model is None:
            raise ModelUnavailable("no model given: drawing samples needs the atlas's model")
        record["samples"] = model.samples(data.atlas, (record["layer"], record["index"])).to_json()
    except (ModelUnavailable, NeuronAtlasError) as error:
        record["samples_error"] = str(error)
    return record


def readable_projection(model: LiveModel, layer: int, index: int) -> tuple[list[dict], list[dict]]:
    """The promoted and suppressed rows of one neuron, each token as readable text, no id in both lists
    (a vocabulary smaller than twice the list would repeat its middle)."""
    projection = model.projection(layer, index)
    _, tokenizer, _ = model.load()

    def readable(rows):
        return [dict(row, token=text) for row, text in zip(rows, token_texts(tokenizer, [row["id"] for row in rows]))]

    promoted = {row["id"] for row in projection["promoted"]}
    suppressed = [row for row in projection["suppressed"] if row["id"] not in promoted]
    return readable(projection["promoted"]), readable(suppressed)


def _span(span: dict, tokens: list[str], values: list) -> Span:
    """A sample's span ({"text", "tokens"}) with its tokens' texts and values, as display_spans makes them."""
    own = [values[i] for i in span["tokens"]]
    known = [v for v in own if v is not None]
    return Span(span["text"], max(known) if known else None, span["tokens"], [tokens[i] for i in span["tokens"]], own)


def _label_chart(record: dict) -> Markup:
    """Activation probability per label, of the signal the neuron's set was found on (see AtlasData.label_signal)."""
    chosen = record["label_signal"]
    gate = chosen["signal"] == "gate" and record.get("gate_label_probability")
    probability = record["gate_label_probability"] if gate else record["label_probability"]
    found = f" ({chosen['set']} found this neuron on it)" if chosen["set"] and (gate or chosen["signal"] == "z") else ""
    title = f"activation probability per label, {'gate' if gate else 'z'} signal{found}"
    return bar_chart(list(probability.values()), list(probability), title, percent=True)


def layer_widths(widths: list[int]) -> str:
    """The layers' widths in a few words: "30 layers × 1,536 = 46,080", runs of equal widths joined by " + "."""
    runs: list[list[int]] = []
    for width in widths:
        if runs and runs[-1][1] == width:
            runs[-1][0] += 1
        else:
            runs.append([1, width])
    parts = [f"{count} layer{'s' if count > 1 else ''} × {width:,}" for count, width in runs]
    return f"{' + '.join(parts)} = {sum(widths):,}"


def _colour_scale(record: dict) -> float:
    """Colours saturate at the neuron's largest |activation| in the corpus (comparable across exemplars)."""
    values = [abs(record["max"]), abs(record["min"])]
    return max((v for v in values if math.isfinite(v)), default=0.0)


def _heatmap(counts: dict) -> dict:
    return dict(counts, peak=max((max(row) for row in counts["counts"]), default=0))


def _peak(result: dict) -> float:
    return max((abs(value) for row in result["delta"].values() for value in row.values()), default=0.0)


def _cell(row: dict, column: str) -> Markup:
    value = row.get(column)
    if isinstance(value, float):
        return escape(f"{value:.4g}")
    return escape("" if value is None else value)


def finite(value):
    """JSON has no inf or NaN: they become None (e.g. the min of a neuron that never saw a token)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
