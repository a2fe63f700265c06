"""The viewer's pages as static HTML files that open without a server.

    DIR/index.html              the overview
    DIR/neuron/L/I.html         one page per neuron
    DIR/search.html             search in the browser over DIR/static/search-index.js
    DIR/static/                 the CSS and JS

Live text needs the model and is left out. The report is written next to DIR and moved into
place at the end: a complete report or none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atlas import is_atlas
from ..errors import NeuronAtlasError
from .pages import Pages, Site, finite, neuron_record, static_files
from .search import PER_PAGE, Searcher
from .server import Viewer

INDEX_FILE = "search-index.js"
NEURON_ROOT = "../../"  # from DIR/neuron/L/I.html back to DIR


def write_report(viewer: Viewer, out: str | Path, neurons: list[tuple[int, int]] | None = None,
                 overwrite: bool = False, seed: int = 0, quiet: bool = False) -> Path:
    """Write the overview, search and a page per neuron (all neurons, or ``neurons``) into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NeuronAtlasError(f"{out} is a file, not a folder; give a folder for the report")
    if is_atlas(out):
        raise NeuronAtlasError(f"{out} holds an atlas; write the report into another folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise NeuronAtlasError(f"{out} is not empty; pass --overwrite to replace it")
    data = viewer.data
    chosen = neurons if neurons is not None else [(l, i) for l, w in enumerate(data.widths) for i in range(w)]
    for layer, index in chosen:
        data.check_neuron(layer, index)
    staging = out.with_name(out.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "static").mkdir(parents=True)
    pages = Pages(data, viewer.model)
    for name, content in static_files().items():
        (staging / "static" / name).write_bytes(content)
    (staging / "index.html").write_text(pages.overview(Site("", static=True)), encoding="utf-8")
    (staging / "search.html").write_text(pages.search(Site("", static=True), Searcher(data, None).search("token", "")),
                                         encoding="utf-8")
    entries = _write_neurons(pages, staging, chosen, seed, quiet)
    (staging / "static" / INDEX_FILE).write_text(_search_index(entries), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _write_neurons(pages: Pages, staging: Path, chosen: list[tuple[int, int]], seed: int, quiet: bool) -> list[dict]:
    """Write each neuron's page; return the search entries of the neurons written."""
    generator = np.random.default_rng(seed)
    entries = []
    for position, (layer, index) in enumerate(tqdm(chosen, desc="neuron pages", disable=quiet, unit="page")):
        pages.data.preload_layer(layer)
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


def _search_entry(record: dict) -> dict:
    """What the static search needs of one neuron: peak tokens, promoted tokens, sets, explanations."""
    peaks: dict[str, int] = {}
    for item in record["exemplars"]:
        if 0 <= item["peak"] < len(item["tokens"]):
            token = item["tokens"][item["peak"]]
            peaks[token] = peaks.get(token, 0) + 1
    return {
        "layer": record["layer"], "index": record["index"], "max": record["max"],
        "peaks": peaks,
        "promotes": [[row["token"], row["logit"]] for row in record["top_tokens"]],
        "sets": record["sets"],
        "explanations": [{"explanation": e["explanation"], "score": e["score"], "source": e["source"],
                          "clusters": [c["explanation"] for c in e["clusters"]]} for e in record["explanations"]],
    }


def _search_index(entries: list[dict]) -> str:
    """A script that defines the index (a script, not JSON: browsers do not fetch files from file:// pages)."""
    index = {"per_page": PER_PAGE, "neurons": finite(entries)}
    return "window.NEURONATLAS_SEARCH = " + json.dumps(index, ensure_ascii=True, allow_nan=False) + ";\n"

