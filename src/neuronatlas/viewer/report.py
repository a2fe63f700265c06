"""The viewer's pages as static HTML files that open without a server.

    DIR/index.html              the overview, with the neuron pages the report holds
    DIR/neuron/L/I.html         one page per neuron written
    DIR/search.html             search in the browser over DIR/static/search-index.js
    DIR/static/                 the CSS and JS; pages.js lists the neuron pages written

A large atlas gets pages for a chosen part of its neurons (:func:`choose_neurons`); the jump box
says so for a neuron without a page instead of leading to a missing file. Live text needs the
model and is left out. The report is written next to DIR and moved into place at the end: a
complete report or none.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atlas import is_atlas
from ..errors import NeuronAtlasError
from .data import AtlasData, best_first
from .pages import Pages, Site, finite, neuron_record, static_files
from .plots import edges_text
from .search import PER_PAGE, Searcher
from .server import Viewer

INDEX_FILE = "search-index.js"
PAGES_FILE = "pages.js"
NEURON_ROOT = "../../"  # from DIR/neuron/L/I.html back to DIR
OTHERS = "write others with --neurons SET.json, or every neuron with --all"


@dataclass
class ReportNeurons:
    """The neurons a report writes pages for, in (layer, index) order, and how they were chosen."""

    neurons: list[tuple[int, int]]
    total: int  # neurons in the atlas
    chosen_by: str  # "every neuron", or a phrase naming the groups

    @property
    def complete(self) -> bool:
        return len(self.neurons) == self.total

    def summary(self) -> str:
        """One line: how many neurons have a page, which, and how to get the others."""
        if self.complete:
            return f"all {self.total:,} neurons have a page"
        return f"{len(self.neurons):,} of {self.total:,} neurons have a page ({self.chosen_by}); {OTHERS}"


def every_neuron(widths: list[int]) -> ReportNeurons:
    total = sum(widths)
    return ReportNeurons([(l, i) for l, w in enumerate(widths) for i in range(w)], total, "every neuron")


def choose_neurons(data: AtlasData, max_pages: int) -> ReportNeurons:
    """Every neuron when at most ``max_pages``; else, in this order while pages remain: the neurons of
    the sets given, the viewer's LAPE neurons, then the N neurons of highest max activation in each
    layer, N the same for every layer and as large as ``max_pages`` allows."""
    if max_pages < 1:
        raise NeuronAtlasError(f"--max-pages must be at least 1 (got {max_pages})")
    if sum(data.widths) <= max_pages:
        return every_neuron(data.widths)
    named = dict.fromkeys((n.layer, n.index) for _, neuron_set in data.searchable_sets()
                          for n in best_first(neuron_set))  # unique, in order: the sets given first
    chosen = set(list(named)[:max_pages])
    per_layer = (max_pages - len(chosen)) // len(data.widths)
    for layer in range(len(data.widths)):
        peak = data.atlas.overall("max", layer).double().numpy()  # (D,)
        others = [index for index in np.argsort(-peak, kind="stable").tolist() if (layer, index) not in chosen]
        chosen.update((layer, index) for index in others[:per_layer])
    named_count = min(len(named), max_pages)
    return ReportNeurons(sorted(chosen), sum(data.widths), _chosen_by(data, named_count, per_layer))


def _chosen_by(data: AtlasData, named: int, per_layer: int) -> str:
    groups = [name for name, _ in data.sets] + (["the viewer's LAPE"] if data.viewer_lape else [])
    parts = [f"{named:,} neurons of {', '.join(groups)}"] if groups else []
    if per_layer:
        parts.append(f"the {per_layer:,} of highest max activation in each layer")
    return " and ".join(parts)


def write_report(viewer: Viewer, out: str | Path, neurons: ReportNeurons | None = None,
                 overwrite: bool = False, seed: int = 0, quiet: bool = False) -> Path:
    """Write the overview, search and a page per neuron (every neuron, or ``neurons``) into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NeuronAtlasError(f"{out} is a file, not a folder; give a folder for the report")
    if is_atlas(out):
        raise NeuronAtlasError(f"{out} holds an atlas; write the report into another folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise NeuronAtlasError(f"{out} is not empty; pass --overwrite to replace it")
    data = viewer.data
    chosen = neurons if neurons is not None else every_neuron(data.widths)
    for layer, index in chosen.neurons:
        data.check_neuron(layer, index)
    staging = out.with_name(out.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "static").mkdir(parents=True)
    pages = Pages(data, viewer.model)
    for name, content in static_files().items():
        (staging / "static" / name).write_bytes(content)
    (staging / "static" / PAGES_FILE).write_text(_pages_script(chosen, data), encoding="utf-8")
    (staging / "index.html").write_text(pages.overview(Site("", static=True), _report_facts(chosen, data.widths)),
                                        encoding="utf-8")
    (staging / "search.html").write_text(pages.search(Site("", static=True), Searcher(data, None).search("token", "")),
                                         encoding="utf-8")
    entries = _write_neurons(pages, staging, sorted(set(chosen.neurons)), seed, quiet)
    (staging / "static" / INDEX_FILE).write_text(_search_index(entries), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def report_size(out: str | Path) -> dict:
    """{"pages", "page_bytes" (mean of the neuron pages), "largest_page", "total_bytes"} of a written report."""
    out = Path(out)
    pages = [path.stat().st_size for path in out.glob("neuron/*/*.html")]
    total = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    return {"pages": len(pages), "page_bytes": sum(pages) / max(len(pages), 1), "largest_page": max(pages, default=0),
            "total_bytes": total}


def _write_neurons(pages: Pages, staging: Path, chosen: list[tuple[int, int]], seed: int, quiet: bool) -> list[dict]:
    """Write each neuron's page (``chosen`` in (layer, index) order); return their search entries."""
    generator = np.random.default_rng(seed)
    entries, loaded = [], None
    for position, (layer, index) in enumerate(tqdm(chosen, desc="neuron pages", disable=quiet, unit="page")):
        if layer != loaded:
            pages.data.preload_layer(layer, [i for l, i in chosen if l == layer])
            loaded = layer
        previous = chosen[position - 1] if position > 0 else None
        following = chosen[position + 1] if position + 1 < len(chosen) else None
        target = chosen[int(generator.integers(len(chosen)))]
        site = Site(NEURON_ROOT, static=True, random_target=Site(NEURON_ROOT, static=True).neuron(*target))
        folder = staging / "neuron" / str(layer)
        folder.mkdir(parents=True, exist_ok=True)
        record = neuron_record(pages.data, pages.model, layer, index)
        (folder / f"{index}.html").write_text(pages.neuron(site, record, previous, following, site.random()),
                                              encoding="utf-8")
        entries.append(_search_entry(record))
    return entries


def _report_facts(chosen: ReportNeurons, widths: list[int]) -> dict:
    """What the overview says about the pages written: the summary and, per layer, how many and the first."""
    per_layer: dict[int, list[int]] = {}
    for layer, index in sorted(chosen.neurons):
        per_layer.setdefault(layer, []).append(index)
    layers = [{"layer": layer, "pages": len(per_layer.get(layer, [])), "neurons": width,
               "first": per_layer[layer][0] if layer in per_layer else None} for layer, width in enumerate(widths)]
    summary = chosen.summary()
    return {"summary": f"{summary[0].upper()}{summary[1:]}.", "layers": layers}


def _pages_script(chosen: ReportNeurons, data: AtlasData) -> str:
    """window.NEURONATLAS_PAGES: the widths and, unless every neuron has one, the pages per layer (for the
    jump box); the histogram edges, the same for every neuron (its page holds only the counts)."""
    widths = data.widths
    hist_edges = data.atlas.signals["z"].hist_edges
    layers = None
    if not chosen.complete:
        layers = [[] for _ in widths]
        for layer, index in sorted(chosen.neurons):
            layers[layer].append(index)
    facts = {"widths": widths, "written": len(chosen.neurons), "total": chosen.total, "layers": layers,
             "edges": None if hist_edges is None else edges_text(hist_edges.tolist())}
    return "window.NEURONATLAS_PAGES = " + json.dumps(facts, separators=(",", ":")) + ";\n"


def _search_entry(record: dict) -> dict:
    """What the static search needs of one neuron: peak tokens, promoted tokens, sets, explanations."""
    peaks: dict[str, int] = {}
    for item in record["exemplars"]:
        if 0 <= item["peak"] < len(item["tokens"]):
            token = item["tokens"][item["peak"]]
            peaks[token] = peaks.get(token, 0) + 1
    return {
        "layer": record["layer"], "index": record["index"], "max": _rounded(record["max"]),
        "peaks": peaks,
        "promotes": [[row["token"], _rounded(row["logit"])] for row in record["top_tokens"]],
        "sets": record["sets"],
        "explanations": [{"explanation": e["explanation"], "score": e["score"], "source": e["source"],
                          "clusters": [c["explanation"] for c in e["clusters"]]} for e in record["explanations"]],
    }


def _rounded(value: float) -> float:
    """4 significant digits: the search shows no more, and the index is a tenth of a report."""
    return float(f"{value:.4g}") if isinstance(value, float) and math.isfinite(value) else value


def _search_index(entries: list[dict]) -> str:
    """A script that defines the index (a script, not JSON: browsers do not fetch files from file:// pages)."""
    index = {"per_page": PER_PAGE, "neurons": finite(entries)}
    return "window.NEURONATLAS_SEARCH = " + json.dumps(index, ensure_ascii=True, allow_nan=False) + ";\n"

