"""The web viewer over HTTP (FastAPI's TestClient), its data against the model, and its CLI.

The atlas is the bundled tiny-llama profiled on a few documents per language plus two documents
with HTML in them; the same files serve tests/test_viewer_browser.py.
"""

from __future__ import annotations

import html
import json
import re
import socket
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli_fails

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.cli import main
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.methods import find_lape, vocab_projection
from neuronatlas.models import locate_neurons
from neuronatlas.viewer.data import VIEWER_LAPE

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
_BUILT: dict[str, dict] = {}  # the files, made once per session for both viewer test modules


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


# ---- the neuron API --------------------------------------------------------------------------------


def test_neuron_api_exemplars_match_the_model(client, files, model):
    atlas = load_atlas(files["atlas"])
    layer, index = 2, 5
    reply = client.get(f"/api/neuron/{layer}/{index}")
    assert reply.status_code == 200
    body = reply.json()
    stored = atlas.exemplars(layer, index)
    assert len(body["exemplars"]) == len(stored) > 0
    contexts = {row["seq"]: row["token_ids"] for row in atlas.contexts.to_pylist()}
    for item, expected in zip(body["exemplars"], stored):
        assert len(item["tokens"]) == len(item["activations"]) > 1
        assert item["seq"] == expected["seq"] and item["pos"] == expected["pos"]
        assert item["activations"][item["peak"]] == pytest.approx(expected["activation"], rel=1e-5)
        window = contexts[item["seq"]]
        assert item["token_ids"] == window[item["start"] : item["start"] + len(item["tokens"])]
        # Every value shown is the neuron's z on that token, recomputed on the window.
        z = z_on(model[0], window)[layer][:, index]
        shown = torch.tensor(item["activations"])
        assert torch.allclose(shown, z[item["start"] : item["start"] + len(shown)], atol=1e-3)
    activations = [item["activation"] for item in body["exemplars"]]
    assert activations == sorted(activations, reverse=True)


def test_neuron_api_label_probability_and_vocabulary(client, files, model):
    atlas = load_atlas(files["atlas"])
    body = client.get("/api/neuron/1/7").json()
    expected = atlas.activation_probability(1)[:, 7].tolist()
    assert list(body["label_probability"]) == atlas.labels
    assert list(body["label_probability"].values()) == pytest.approx(expected)
    projection = vocab_projection(model[0], 1, 7, top=20, tokenizer=model[1])
    assert [row["id"] for row in body["top_tokens"]] == [row["id"] for row in projection["promoted"]]
    assert [row["id"] for row in body["bottom_tokens"]] == [row["id"] for row in projection["suppressed"]]
    assert body["top_tokens"][0]["logit"] > body["bottom_tokens"][0]["logit"]
    assert body["vocab_projection_error"] is None
    assert sum(body["histogram"]["counts"]) == body["corpus_tokens"]


def test_neuron_page_shows_sets_explanations_and_neighbours(client, files):
    first = files["explained"][0]
    page = client.get(f"/neuron/{first.layer}/{first.index}").text
    assert "lape" in page and f"{first.score:.4g}" in page
    assert "hand-written" in page and "angle brackets" in page and "0.420" in page
    widths = load_atlas(files["atlas"]).widths
    page = client.get("/neuron/1/0").text
    assert f'href="/neuron/0/{widths[0] - 1}" id="previous"' in page and 'href="/neuron/1/1" id="next"' in page
    page = client.get("/neuron/0/0").text
    assert 'id="previous"' not in page and 'href="/neuron/0/1" id="next"' in page
    assert 'id="next"' not in client.get(f"/neuron/{len(widths) - 1}/{widths[-1] - 1}").text


def test_out_of_range_and_malformed_neurons_are_404(client, files):
    width = load_atlas(files["atlas"]).widths[0]
    for path in (f"/neuron/0/{width}", "/neuron/99/0", "/neuron/-1/0", "/neuron/a/b", "/neuron/0/1.5"):
        reply = client.get(path)
        assert reply.status_code == 404, path
        assert "<h1>404</h1>" in reply.text
    reply = client.get(f"/api/neuron/0/{width}")
    assert reply.status_code == 404 and f"0-{width - 1}" in reply.json()["error"]
    assert client.get("/no-such-page").status_code == 404
    assert client.get("/neuron?layer=0&index=x", follow_redirects=False).status_code == 404


def test_jump_and_random_redirect_to_neuron_pages(client):
    reply = client.get("/neuron?layer=1&index=3", follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/neuron/1/3"
    reply = client.get("/random", follow_redirects=False)
    assert re.fullmatch(r"/neuron/\d+/\d+", reply.headers["location"])


# ---- overview and search -------------------------------------------------------------------------


def test_overview_shows_layers_sets_and_evaluation(client, files):
    page = client.get("/").text
    atlas = load_atlas(files["atlas"])
    assert str(TINY_LLAMA) in page
    assert page.count("<svg") >= 2
    for layer, rate in enumerate(atlas.summary()["activation_rate_per_layer"]):
        assert f"<td>{layer}</td><td>{atlas.widths[layer]}</td>" in page
        assert f"{100 * rate:.2f}" in page
    evaluation = json.loads(files["eval"].read_text())
    label = evaluation["set_labels"][0]
    assert f"{evaluation['delta'][label][label]:+.4f}" in page
    counts = files["lape"].for_label(label)
    assert f">{label}</a></th>" in page and f"<td>{len(counts)}</td>" in page
    assert f"{VIEWER_LAPE}</h2>" in page and 'id="lape-heatmap"' in page


def heatmap_counts(page: str, table_id: str) -> dict[str, list[int]]:
    """{label: counts per layer} of a heatmap table on a page."""
    table = page[page.index(f'id="{table_id}"') :]
    table = table[: table.index("</table>")]
    rows = re.findall(r'<th><a href="[^"]*">([^<]+)</a></th>(.*?)</tr>', table, re.S)
    return {label: [int(n) for n in re.findall(r"<td[^>]*>(\d+)</td>", cells)][:-1] for label, cells in rows}


def test_without_sets_the_viewer_finds_label_neurons_by_lape(bare_client, files, viewer_lape):
    page = bare_client.get("/").text
    assert "No neuron sets given" in page and VIEWER_LAPE in page
    counts = heatmap_counts(page, "lape-heatmap")
    widths = load_atlas(files["atlas"]).widths
    assert list(counts) == viewer_lape.labels and sum(map(sum, counts.values())) == len(viewer_lape) > 0
    for label, row in counts.items():
        expected = [0] * len(widths)
        for neuron in viewer_lape.for_label(label).neurons:
            expected[neuron.layer] += 1
        assert row == expected, label
    label = max(viewer_lape.labels, key=lambda name: len(viewer_lape.for_label(name)))
    reply = bare_client.get("/api/search", params={"by": "label", "q": label}).json()
    assert reply["total"] == len(viewer_lape.for_label(label)) > 0
    assert {r["set"] for r in reply["results"]} == {VIEWER_LAPE} and VIEWER_LAPE in reply["note"]
    first = reply["results"][0]
    assert first["score"] == min(n.score for n in viewer_lape.for_label(label).neurons)
    neuron = bare_client.get(f"/neuron/{first['layer']}/{first['index']}").text
    assert VIEWER_LAPE in neuron and "No neuron set given names this neuron" not in neuron


def test_single_label_atlas_skips_lape_with_a_note(tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.profile import ProfileOptions, profile
    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    rows = [json.loads(line) for line in bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines()[:2]]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in rows), encoding="utf-8")
    profile(str(TINY_LLAMA), corpus, tmp_path / "atlas", device="cpu", quiet=True,
            options=ProfileOptions(max_length=16, top_k=2, doc_sample=0))
    viewer = open_viewer(tmp_path / "atlas")
    assert viewer.data.viewer_lape is None
    client = TestClient(create_app(viewer.data, viewer.model))
    page = client.get("/").text
    assert "single label ('all')" in html.unescape(page) and 'id="lape-heatmap"' not in page
    reply = client.get("/api/search", params={"by": "label", "q": "all"}).json()
    assert reply["total"] == 0 and "single label" in reply["note"]


def test_search_by_token_finds_neurons_that_peak_on_it(client, files):
    reply = client.get("/api/search", params={"by": "token", "q": "the"}).json()
    assert reply["total"] > 0
    for row in reply["results"][:5]:
        exemplars = client.get(f"/api/neuron/{row['layer']}/{row['index']}").json()["exemplars"]
        peaks = [item["tokens"][item["peak"]].strip().casefold() for item in exemplars]
        assert peaks.count("the") == row["exemplars"]


def test_search_by_label_method_and_explanation(client, files, viewer_lape):
    lape = files["lape"]
    label = lape.labels[0]
    rows = search_all(client, "label", label)
    given = [(r["layer"], r["index"]) for r in rows if r["set"] == "lape"]
    own = [(r["layer"], r["index"]) for r in rows if r["set"] == VIEWER_LAPE]
    assert len(given) + len(own) == len(rows)
    assert rows[: len(given)] == [r for r in rows if r["set"] == "lape"]  # the sets given come first
    # Best first: LAPE's score is an entropy, lower is more specific.
    assert [n for n in given] == [(n.layer, n.index) for n in sorted(lape.for_label(label).neurons,
                                                                   key=lambda n: (n.score, n.layer, n.index))]
    assert sorted(own) == sorted((n.layer, n.index) for n in viewer_lape.neurons if n.label == label)
    by_method = search_all(client, "method", "lape")
    assert len(by_method) == len(lape) + len(viewer_lape)
    reply = client.get("/api/search", params={"by": "explanation", "q": "cyrillic pieces"}).json()
    last = files["explained"][1]
    assert [(r["layer"], r["index"]) for r in reply["results"]] == [(last.layer, last.index)]
    assert client.get("/api/search", params={"by": "explanation", "q": "no-such-word"}).json()["total"] == 0


def test_search_pages(client, files, viewer_lape):
    total = len(files["lape"]) + len(viewer_lape)
    first = client.get("/api/search", params={"by": "method", "q": "lape"}).json()
    assert first["pages"] == -(-total // 50) and len(first["results"]) == min(total, 50)
    if first["pages"] > 1:
        second = client.get("/api/search", params={"by": "method", "q": "lape", "page": 2}).json()
        rows = [{(r["set"], r["layer"], r["index"], r["label"]) for r in reply["results"]} for reply in (first, second)]
        assert not rows[0] & rows[1]
    page = client.get("/search", params={"by": "method", "q": "lape"}).text
    assert f"{total:,} neurons found" in page


def test_search_by_promoted_token(client, model):
    reply = client.get("/api/search", params={"by": "promotes", "q": "the"}).json()
    assert reply["total"] > 0
    best = reply["results"][0]
    projection = vocab_projection(model[0], best["layer"], best["index"], top=20, tokenizer=model[1])
    assert best["token_id"] in [row["id"] for row in projection["promoted"]]


# ---- live text ----------------------------------------------------------------------------------


def test_live_text_matches_the_model(client, model):
    text = "Das Haus ist groß und der Hund schläft."
    reply = client.post("/api/live", json={"text": text, "layer": 2, "index": 9})
    assert reply.status_code == 200
    body = reply.json()
    ids = model[1](text)["input_ids"]
    assert body["token_ids"] == ids and len(body["tokens"]) == len(ids)
    z = z_on(model[0], ids)
    assert body["neuron"]["activations"] == pytest.approx(z[2][:, 9].tolist(), abs=1e-4)
    peaks = [item["max"] for item in body["top"]]
    assert peaks == sorted(peaks, reverse=True)
    best = max(float(layer_z.max()) for layer_z in z.values())
    assert peaks[0] == pytest.approx(best, rel=1e-4)


def test_live_text_is_bounded_and_checked(client, viewer):
    long_text = "word " * 2000
    assert client.post("/api/live", json={"text": long_text[:2001]}).status_code == 413
    reply = client.post("/api/live", json={"text": long_text[:1999]}).json()
    assert len(reply["tokens"]) == viewer.model.max_tokens and reply["truncated"]
    assert client.post("/api/live", json={"text": ""}).status_code == 400
    assert client.post("/api/live", json={"text": "hi", "layer": 99, "index": 0}).status_code == 400


# ---- security ---------------------------------------------------------------------------------


def test_corpus_text_and_explanations_are_escaped(client, files):
    for fragment in ("<script", "<img src=x"):
        layer, index, window = hostile_neuron(files["atlas"], fragment)
        page = client.get(f"/neuron/{layer}/{index}").text
        assert window in html.unescape(re.sub(r"<[^>]+>", "", page))  # the text a person sees
        assert page.count("<script") == 1 and "<img" not in page  # the only script is the viewer's own
    first = files["explained"][0]
    page = client.get(f"/neuron/{first.layer}/{first.index}").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(" in page
    reply = client.get("/search", params={"by": "explanation", "q": 'onerror "><img'})
    assert "<img" not in reply.text and "&#34;&gt;&lt;img" in reply.text
    assert "default-src 'self'" in reply.headers["content-security-policy"]


def test_no_request_parameter_reaches_the_filesystem(client):
    assert client.get("/static/viewer.css").status_code == 200
    for name in ("..%2Fatlas.json", "atlas.json", "..%2F..%2F..%2Fetc%2Fpasswd", "search-index.js"):
        assert client.get(f"/static/{name}").status_code == 404, name
    assert client.get("/static/../atlas.json").status_code == 404
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_loopback_server_refuses_other_host_names(viewer):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer.app import create_app
    from neuronatlas.viewer.server import allowed_hosts

    app = create_app(viewer.data, viewer.model, allowed_hosts=allowed_hosts("127.0.0.1"))
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/summary").status_code == 200
    assert TestClient(app, base_url="http://localhost:8000").get("/api/summary").status_code == 200
    assert TestClient(app, base_url="http://attacker.example").get("/api/summary").status_code == 400
    assert allowed_hosts("0.0.0.0") is None


# ---- readable text: byte tokens joined, no U+FFFD --------------------------------------------------


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


def test_cyrillic_exemplars_read_as_text(files, tmp_path_factory, tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app
    from neuronatlas.viewer.report import ReportNeurons, write_report

    viewer = open_viewer(readable_copy(files, tmp_path_factory))
    client = TestClient(create_app(viewer.data, viewer.model))
    chosen = cyrillic_neurons(viewer.data)
    assert chosen
    for layer, index in chosen:
        page, reply = client.get(f"/neuron/{layer}/{index}").text, client.get(f"/api/neuron/{layer}/{index}")
        assert "\ufffd" not in page and "&#65533;" not in page and "\ufffd" not in reply.text
        body, shown = reply.json(), html.unescape(re.sub(r"<[^>]+>", "", page))  # the page's text
        assert {"exemplars", "label_probability", "top_tokens"} <= set(body)
        for item in body["exemplars"]:
            assert len(item["tokens"]) == len(item["token_ids"]) and item["text"].strip() in shown
        assert "max: " in page  # a span of several tokens lists each in its tooltip
        promoted = [row["id"] for row in body["top_tokens"]]
        assert promoted and not set(promoted) & {row["id"] for row in body["bottom_tokens"]}
    written = write_report(viewer, tmp_path / "report", ReportNeurons(chosen, sum(viewer.data.widths), "test"), quiet=True)
    for file in [*written.rglob("*.html"), *written.rglob("*.js")]:
        text = file.read_text(encoding="utf-8")
        assert "\ufffd" not in text and "\\ufffd" not in text, file
    live = client.post("/api/live", json={"text": "Привет, Пётр! 🎉", "layer": 1, "index": 2}).json()
    assert "".join(span["text"] for span in live["spans"]) == live["text"] and live["text"].endswith("Привет, Пётр! 🎉")
    assert sorted(i for span in live["spans"] for i in span["tokens"]) == list(range(len(live["token_ids"])))
    assert "\ufffd" not in "".join(live["tokens"])


# ---- atlases and models the viewer has to cope with ---------------------------------------------


def test_atlas_without_activation_windows(files, tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    old = tmp_path / "old-atlas"
    old.mkdir()
    for item in files["atlas"].iterdir():
        (old / item.name).write_bytes(item.read_bytes())
    table = pq.read_table(old / "exemplars.parquet")
    pq.write_table(table.drop_columns(["window_start", "window_activations"]), old / "exemplars.parquet")
    viewer = open_viewer(old)
    body = TestClient(create_app(viewer.data, viewer.model)).get("/api/neuron/0/3").json()
    for item in body["exemplars"]:
        assert len(item["tokens"]) == len(item["activations"]) > 1
        known = [i for i, value in enumerate(item["activations"]) if value is not None]
        assert known == [item["peak"]] and item["activations"][item["peak"]] == pytest.approx(item["activation"])


def test_model_that_cannot_be_loaded_is_reported_not_fatal(files, tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    viewer = open_viewer(files["atlas"], model=str(tmp_path / "no-such-model"))
    client = TestClient(create_app(viewer.data, viewer.model))
    body = client.get("/api/neuron/0/1").json()
    assert body["top_tokens"] == [] and "could not be loaded" in body["vocab_projection_error"]
    assert body["exemplars"]
    page = client.get("/neuron/0/1")
    assert page.status_code == 200 and "could not be loaded" in page.text
    reply = client.post("/api/live", json={"text": "hello"})
    assert reply.status_code == 503 and "no-such-model" in reply.json()["error"]


def test_another_model_is_refused_for_projection(files, tiny_llama):
    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.live import ModelUnavailable

    viewer = open_viewer(files["atlas"], model=str(tiny_llama))
    with pytest.raises(ModelUnavailable, match="not the atlas's model"):
        viewer.model.projection(0, 0)


# ---- report ---------------------------------------------------------------------------------


def test_report_writes_linked_static_pages(files, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(files["atlas"]), "-o", str(out), "--sets", str(files["sets"]),
                 "--neurons", str(files["sets"]), "--explanations", str(files["explanations"]), "--quiet"]) == 0
    chosen = sorted({(n.layer, n.index) for n in files["lape"].neurons})
    pages = sorted(out.glob("neuron/*/*.html"))
    assert len(pages) == len(chosen)
    layer, index = chosen[0]
    page = (out / "neuron" / str(layer) / f"{index}.html").read_text()
    for link in re.findall(r'(?:href|src)="([^"#?]+)"', page):
        assert (out / "neuron" / str(layer) / link).resolve().exists(), link
    assert "Live text" not in page
    index_script = (out / "static" / "search-index.js").read_text()
    assert index_script.startswith("window.NEURONATLAS_SEARCH = ")
    entries = json.loads(index_script[len("window.NEURONATLAS_SEARCH = "):].rstrip().rstrip(";"))["neurons"]
    assert [(e["layer"], e["index"]) for e in entries] == chosen
    assert (out / "index.html").exists() and (out / "search.html").exists()


def written_pages(out: Path) -> list[tuple[int, int]]:
    return sorted((int(path.parent.name), int(path.stem)) for path in out.glob("neuron/*/*.html"))


def pages_script(out: Path) -> dict:
    text = (out / "static" / "pages.js").read_text()
    return json.loads(text[len("window.NEURONATLAS_PAGES = "):].rstrip().rstrip(";"))


def test_report_of_a_large_atlas_writes_a_chosen_subset(capsys, files, viewer_lape, tmp_path):
    out, max_pages = tmp_path / "report", 60
    atlas = load_atlas(files["atlas"])
    total = sum(atlas.widths)
    assert total > max_pages
    assert main(["report", str(files["atlas"]), "-o", str(out), "--max-pages", str(max_pages), "--quiet"]) == 0
    written = written_pages(out)
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert f"{len(written)} of {total:,} neurons have a page" in line and "--neurons SET.json" in line and "--all" in line
    lape = {(n.layer, n.index) for n in viewer_lape.neurons}
    per_layer = (max_pages - len(lape)) // len(atlas.widths)
    assert len(written) == len(lape) + per_layer * len(atlas.widths) <= max_pages
    assert lape <= set(written)
    for layer in range(len(atlas.widths)):  # the rest: the neurons of highest max activation, per layer
        others = [i for l, i in written if l == layer and (l, i) not in lape]
        peak = atlas.overall("max", layer)
        assert len(others) == per_layer
        assert float(peak[others].min()) >= max(float(peak[i]) for i in range(atlas.widths[layer])
                                                if i not in others and (layer, i) not in lape)
    script = pages_script(out)
    assert [(l, i) for l, row in enumerate(script["layers"]) for i in row] == written
    assert (script["written"], script["total"]) == (len(written), total)
    overview = (out / "index.html").read_text()
    assert f"{len(written)} of {total:,} neurons have a page" in overview and 'id="lape-heatmap"' in overview
    for link in re.findall(r'href="(neuron/[^"]+)"', overview):
        assert (out / link).exists(), link
    layer, index = written[0]
    page = (out / "neuron" / str(layer) / f"{index}.html").read_text()
    for link in re.findall(r'(?:href|src)="([^"#?]+)"', page):
        assert (out / "neuron" / str(layer) / link).resolve().exists(), link


def test_report_all_writes_every_page(capsys, files, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(files["atlas"]), "-o", str(out), "--all", "--max-pages", "5", "--quiet"]) == 0
    widths = load_atlas(files["atlas"]).widths
    assert len(written_pages(out)) == sum(widths)
    assert f"all {sum(widths):,} neurons have a page" in capsys.readouterr().out
    assert pages_script(out)["layers"] is None


# ---- the command line -----------------------------------------------------------------------------


def test_serve_refuses_a_folder_that_is_not_an_atlas(capsys, tmp_path):
    cli_fails(capsys, ["serve", str(tmp_path), "--port", "0"], str(tmp_path), "not an atlas")
    cli_fails(capsys, ["report", str(tmp_path), "-o", str(tmp_path / "r")], "not an atlas")


def test_report_refuses_too_many_pages_and_a_full_folder(capsys, files, tmp_path):
    atlas = str(files["atlas"])
    cli_fails(capsys, ["report", atlas, "-o", str(tmp_path / "r"), "--neurons", str(files["sets"]), "--max-pages", "10"],
              "--max-pages 10", f"{len({(n.layer, n.index) for n in files['lape'].neurons})} neurons")
    cli_fails(capsys, ["report", atlas, "-o", str(tmp_path / "r"), "--max-pages", "0"], "--max-pages must be at least 1")
    assert not (tmp_path / "r").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cli_fails(capsys, ["report", atlas, "-o", str(tmp_path / "full"), "--neurons", str(files["sets"])], "not empty", "--overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    cli_fails(capsys, ["report", atlas, "-o", atlas, "--overwrite", "--neurons", str(files["sets"])], "holds an atlas")


def test_serve_refuses_a_port_in_use(capsys, files):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cli_fails(capsys, ["serve", str(files["atlas"]), "--port", str(port)], f"port {port}", "in use", "--port")


def test_serve_refuses_bad_side_files(capsys, files, tmp_path):
    atlas = str(files["atlas"])
    cli_fails(capsys, ["serve", atlas, "--sets", str(tmp_path / "none.json")], "neuron set not found")
    other = json.loads(files["explanations"].read_text())
    other["model"]["fingerprint"] = "0123456789abcdef"
    (tmp_path / "other.json").write_text(json.dumps(other))
    cli_fails(capsys, ["serve", atlas, "--explanations", str(tmp_path / "other.json")], "another model")
    (tmp_path / "garbage.json").write_text("{not json")
    cli_fails(capsys, ["serve", atlas, "--eval", str(tmp_path / "garbage.json")], "not an evaluation file")
    cli_fails(capsys, ["serve", atlas, "--explanations", str(tmp_path / "garbage.json")], "not an explanations file")
