"""What the viewer tests share: the atlas, sets, evaluation and explanations they view, and fixtures.

The atlas is the bundled tiny-llama profiled on a few documents per language plus two documents
with HTML in them; built once per session for test_viewer_api.py, test_viewer_pages.py,
test_report.py and test_viewer_browser.py (import the fixtures from here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.methods import find_lape
from neuronatlas.models import locate_neurons

TINY_LLAMA = bundled.model_path("tiny-llama")
DOCS_PER_LABEL = 4
MAX_LENGTH = 48
HOSTILE = [
    'Look: <script>alert("xss-script")</script> and then more plain text follows here.',
    'Then "><img src=x onerror=alert("xss-img")> closes the tag and the text goes on.',
]
HOSTILE_EXPLANATION = 'fires on <img src=x onerror=alert("xss-expl")> tags'

needs_bundled = pytest.mark.skipif(not (TINY_LLAMA / "config.json").exists(),
                                   reason=f"the bundled tiny-llama is not there ({TINY_LLAMA})")
_BUILT: dict[str, dict] = {}  # the files, made once per session for the viewer test modules


def build_viewer_files(tmp_path_factory) -> dict:
    """Atlas, LAPE set, evaluation and explanations of the bundled tiny-llama on a small corpus."""
    if "files" in _BUILT:
        return _BUILT["files"]
    from neuronatlas.evaluate import evaluate
    from neuronatlas.profile import ProfileOptions, profile

    root = tmp_path_factory.mktemp("viewer")
    corpus = root / "corpus.jsonl"
    rows, seen = [], {}
    for line in bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if seen.get(row["lang"], 0) < DOCS_PER_LABEL:
            seen[row["lang"]] = seen.get(row["lang"], 0) + 1
            rows.append({"text": row["text"], "lang": row["lang"]})
    rows += [{"text": text, "lang": "en"} for text in HOSTILE]
    corpus.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    atlas = profile(str(TINY_LLAMA), corpus, root / "atlas", label_field="lang", device="cpu", quiet=True,
                    options=ProfileOptions(max_length=MAX_LENGTH, top_k=8, doc_sample=0))
    lape = find_lape(atlas, top_rate=0.05)
    lape.save(root / "lape.json")
    model, tokenizer = load_model(str(TINY_LLAMA), device="cpu", quiet=True)
    result = evaluate(model, tokenizer, lape, corpus, controls=2, max_docs_per_label=2, label_field="lang",
                      max_length=MAX_LENGTH, batch_size=4)
    (root / "eval.json").write_text(json.dumps(result))
    explained = [lape.neurons[0], lape.neurons[-1]]
    explanations = {
        "format": "neuronatlas.explanations", "version": 1,
        "model": {"name_or_path": str(TINY_LLAMA), "fingerprint": atlas.meta["model"]["fingerprint"]},
        "explainer": "hand-written", "simulator": "none",
        "neurons": [
            {"layer": explained[0].layer, "index": explained[0].index, "explanation": HOSTILE_EXPLANATION,
             "score": 0.42, "score_top": 0.5, "score_random": 0.1,
             "clusters": [{"explanation": "angle brackets", "size": 3, "score": 0.2}]},
            {"layer": explained[1].layer, "index": explained[1].index, "explanation": "Cyrillic word pieces",
             "score": None, "score_top": None, "score_random": None, "clusters": []},
        ],
    }
    (root / "expl.json").write_text(json.dumps(explanations))
    _BUILT["files"] = {"root": root, "atlas": root / "atlas", "sets": root / "lape.json", "eval": root / "eval.json",
                       "explanations": root / "expl.json", "lape": lape, "explained": explained}
    return _BUILT["files"]


def hostile_neuron(atlas: Path, fragment: str) -> tuple[int, int, str]:
    """A neuron with an exemplar window holding ``fragment``, and that window's text."""
    from neuronatlas.viewer.data import AtlasData

    data = AtlasData(atlas)
    rows = duckdb.sql(f"select layer, neuron from '{atlas}/exemplars.parquet' order by layer, neuron, rank").fetchall()
    for layer, neuron in rows:
        for item in data.exemplars(layer, neuron):
            text = item["text"]
            if fragment in text:
                return layer, neuron, text
    raise AssertionError(f"no exemplar window holds {fragment!r}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not (TINY_LLAMA / "config.json").exists():
        pytest.skip(f"the bundled tiny-llama is not there ({TINY_LLAMA})")
    return build_viewer_files(tmp_path_factory)


@pytest.fixture(scope="module")
def viewer(files):
    from neuronatlas.viewer import open_viewer

    return open_viewer(files["atlas"], sets=[files["sets"]], explanations=[files["explanations"]],
                       evaluations=[files["eval"]])


@pytest.fixture(scope="module")
def client(viewer):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer.app import create_app

    return TestClient(create_app(viewer.data, viewer.model))


@pytest.fixture(scope="module")
def bare_client(files):
    """The viewer as the acceptance check starts it: the atlas alone, no sets."""
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    viewer = open_viewer(files["atlas"])
    return TestClient(create_app(viewer.data, viewer.model))


@pytest.fixture(scope="module")
def viewer_lape(files):
    """LAPE with its default options on the test atlas: what the viewer should find by itself."""
    return find_lape(load_atlas(files["atlas"]))


def search_all(client, by: str, q: str) -> list[dict]:
    """Every result of a search, page after page."""
    first = client.get("/api/search", params={"by": by, "q": q}).json()
    rows = first["results"]
    for page in range(2, first["pages"] + 1):
        rows += client.get("/api/search", params={"by": by, "q": q, "page": page}).json()["results"]
    assert len(rows) == first["total"]
    return rows


@pytest.fixture(scope="module")
def model():
    return load_model(str(TINY_LLAMA), device="cpu", quiet=True)


def z_on(model, token_ids: list[int]) -> dict[int, torch.Tensor]:
    """{layer: (T, D) z} of the model on one sequence of token ids."""
    neurons, out = locate_neurons(model), {}
    with torch.no_grad(), capture(neurons, on_activation=lambda layer, z: out.__setitem__(layer, z[0].clone())):
        model(input_ids=torch.tensor([token_ids]))
    return out



def heatmap_counts(page: str, table_id: str) -> dict[str, list[int]]:
    """{label: counts per layer} of a heatmap table on a page."""
    table = page[page.index(f'id="{table_id}"') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r'<th><a href="[^"]*">([^<]+)</a></th>(.*?)</tr>', table, re.S)
    return {label: [int(n) for n in re.findall(r"<td[^>]*>(\d+)</td>", cells)][:-1] for label, cells in rows}



PARTIAL_BYTE = re.compile(r"<0x[0-9A-F]{2}>")


def readable_copy(files: dict, tmp_path_factory) -> Path:
    """A copy of the test atlas with the vocab table of neuronatlas.tokens (each token's bytes), as profile writes it."""
    import shutil

    from transformers import AutoTokenizer

    from neuronatlas.tokens import vocab_table

    if "readable" not in _BUILT:
        folder = tmp_path_factory.mktemp("readable") / "atlas"
        shutil.copytree(files["atlas"], folder)
        ids = pq.read_table(folder / "vocab.parquet")["id"].to_pylist()
        pq.write_table(vocab_table(AutoTokenizer.from_pretrained(str(TINY_LLAMA)), ids), folder / "vocab.parquet")
        _BUILT["readable"] = folder
    return _BUILT["readable"]


def cyrillic_neurons(data, count: int = 3) -> list[tuple[int, int]]:
    """Neurons with an exemplar window whose Cyrillic letters are split over byte tokens."""
    rows = duckdb.sql(f"select distinct layer, neuron from '{data.path}/exemplars.parquet' order by all").fetchall()
    return [(layer, index) for layer, index in rows
            if any(PARTIAL_BYTE.search("".join(item["tokens"])) and re.search("[а-яА-Я]", item["text"])
                   for item in data.exemplars(layer, index))][:count]



def written_pages(out: Path) -> list[tuple[int, int]]:
    return sorted((int(path.parent.name), int(path.stem)) for path in out.glob("neuron/*/*.html"))


def pages_script(out: Path) -> dict:
    text = (out / "static" / "pages.js").read_text()
    return json.loads(text[len("window.NEURONATLAS_PAGES = "):].rstrip().rstrip(";"))

