"""The viewer over HTTP (FastAPI's TestClient): the neuron API against the model, search, live text, security."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import torch
from conftest import window_close
from viewer_files import (  # noqa: F401 (fixtures)
    bare_client, client, files, hostile_neuron, model, search_all, viewer, viewer_lape, z_on,
)

from neuronatlas.atlas import load_atlas
from neuronatlas.methods import vocab_projection
from neuronatlas.viewer.data import VIEWER_LAPE


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
        # Windows are kept in float16: within 2e-3 of the float32 exemplar value.
        assert item["activations"][item["peak"]] == pytest.approx(expected["activation"], rel=2e-3)
        window = contexts[item["seq"]]
        assert item["token_ids"] == window[item["start"] : item["start"] + len(item["tokens"])]
        # Every value shown is the neuron's z on that token, recomputed on the window.
        z = z_on(model[0], window)[layer][:, index]
        shown = torch.tensor(item["activations"])
        assert window_close(shown, z[item["start"] : item["start"] + len(shown)])  # µ-law coded windows
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


# ---- search -----------------------------------------------------------------------------------------


def test_search_by_token_finds_neurons_that_peak_on_it(client, files):
    reply = client.get("/api/search", params={"by": "token", "q": "the"}).json()
    assert reply["total"] > 0
    for row in reply["results"][:5]:
        exemplars = client.get(f"/api/neuron/{row['layer']}/{row['index']}").json()["exemplars"]
        peaks = [item["tokens"][item["peak"]].strip().casefold() for item in exemplars]
        assert peaks.count("the") == row["exemplars"]


def test_search_by_token_says_why_it_found_nothing(client, files):
    import pyarrow.parquet as pq

    reply = client.get("/api/search", params={"by": "token", "q": "zzqqxx"}).json()
    assert reply["total"] == 0 and "No token of the atlas's exemplar windows reads 'zzqqxx'" in reply["note"]
    atlas = Path(files["atlas"])
    windows = dict(zip(*pq.read_table(atlas / "contexts.parquet", columns=["seq", "token_ids"]).to_pydict().values()))
    exemplars = pq.read_table(atlas / "exemplars.parquet", columns=["seq", "pos"]).to_pydict()
    peaks = {windows[seq][pos] for seq, pos in zip(exemplars["seq"], exemplars["pos"])}
    vocab = pq.read_table(atlas / "vocab.parquet").to_pydict()
    texts = [token.strip().casefold() for token in vocab["token"]]
    peak_texts = {text for i, text in zip(vocab["id"], texts) if i in peaks}
    never = next(text for text in texts if text and text not in peak_texts)  # in a window, never a peak
    reply = client.get("/api/search", params={"by": "token", "q": never}).json()
    assert reply["total"] == 0 and "but no exemplar peaks on them" in reply["note"]


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

