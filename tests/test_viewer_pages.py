"""The viewer's pages: overview, LAPE without sets, readable text, and atlases and models it copes with."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

import pytest
from viewer_files import (  # noqa: F401 (fixtures)
    TINY_LLAMA, bare_client, client, cyrillic_neurons, files, heatmap_counts, readable_copy, viewer, viewer_lape,
)

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.viewer.data import VIEWER_LAPE


# ---- overview and LAPE ----------------------------------------------------------------------------


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


# ---- readable text: byte tokens joined, no U+FFFD --------------------------------------------------


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
        for item in body["exemplars"]:  # near-duplicates are merged into the exemplar shown
            assert len(item["tokens"]) == len(item["token_ids"])
            assert item["text"].strip() in shown or item["merged_into"] is not None
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
    shutil.copytree(files["atlas"], old)  # with any samples/ cache another test made
    table = pq.read_table(old / "exemplars.parquet")
    pq.write_table(table.drop_columns(["window_start", "window_scale", "window_codes"]), old / "exemplars.parquet")
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



# ---- exemplars that teach: duplicates merged, the negative end, samples, the label chart's signal ------


def test_near_duplicate_exemplars_are_merged_and_counted():
    from neuronatlas.viewer.exemplars import merge_near_duplicates

    def exemplar(rank, text, ids):
        return {"rank": rank, "text": text, "token_ids": ids}

    items = [exemplar(0, "The cat sat.", [1, 2, 3, 4]), exemplar(1, "the  cat SAT.", [9, 8]),
             exemplar(2, "A dog ran off", [5, 6, 7, 10, 11]), exemplar(3, "a dog ran", [5, 6, 7, 10]),
             exemplar(4, "other", [20, 21]), exemplar(5, "", []), exemplar(6, "", [])]
    merge_near_duplicates(items)
    assert [(i["repeats"], i["merged_into"]) for i in items] == [
        (2, None), (0, 0), (2, None), (0, 2), (1, None), (1, None), (1, None)]


def copy_atlas(files: dict, folder) -> Path:
    import shutil

    shutil.copytree(files["atlas"], folder)
    return folder


def test_bottom_exemplars_show_when_recorded(files, tmp_path):
    from fastapi.testclient import TestClient
    from safetensors.torch import load_file, save_file

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    client = TestClient(create_app(open_viewer(files["atlas"]).data, None))  # profiled with the default bottom-k
    bottom = client.get("/api/neuron/2/5").json()["bottom_exemplars"]
    values = [item["activation"] for item in bottom]
    assert bottom and values == sorted(values) and all(value < 0 for value in values)
    assert all(item["text"] and len(item["tokens"]) == len(item["activations"]) for item in bottom)
    page = client.get("/neuron/2/5").text
    assert 'id="bottom-exemplars"' in page and 'id="bottom-none"' not in page

    atlas = copy_atlas(files, tmp_path / "atlas")  # as profiled with --bottom-k 0
    (atlas / "bottom_exemplars.parquet").unlink()
    tensors = {key: value for key, value in load_file(atlas / "stats.safetensors").items() if ".bottom_" not in key}
    save_file(tensors, atlas / "stats.safetensors")
    meta = json.loads((atlas / "atlas.json").read_text())
    meta["options"]["bottom_k"] = 0
    (atlas / "atlas.json").write_text(json.dumps(meta))
    client = TestClient(create_app(open_viewer(atlas).data, None))
    assert 'id="bottom-none"' in client.get("/neuron/2/5").text
    assert client.get("/api/neuron/2/5").json()["bottom_exemplars"] is None


def test_relu_model_with_no_negative_activation_has_an_empty_bottom_list(corpus_path, tmp_path):
    """OPT's ReLU never goes below zero: its bottom list is empty yet has the top list's columns, and
    the report and the viewer read it (they failed on the missing doc column); a file written without
    those columns (before the fix) reads too."""
    import torch
    from conftest import make_tokenizer
    from fastapi.testclient import TestClient
    from transformers import OPTConfig, OPTForCausalLM

    from neuronatlas.cli import main
    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    torch.manual_seed(0)
    model = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=41, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0)).save_pretrained(model)
    make_tokenizer(model)
    atlas = tmp_path / "atlas"
    assert main(["profile", "--model", str(model), "--corpus", str(corpus_path), "--label-field", "lang",
                 "--device", "cpu", "--quiet", "--out", str(atlas)]) == 0
    top, bottom = (pq.read_table(atlas / name) for name in ("exemplars.parquet", "bottom_exemplars.parquet"))
    assert top.num_rows > 0 and bottom.num_rows == 0
    assert {"doc", "label"} <= set(bottom.column_names)
    for written in ("now", "before"):
        if written == "before":
            pq.write_table(bottom.drop_columns(["doc", "label"]), atlas / "bottom_exemplars.parquet")
        report = tmp_path / f"report-{written}"
        assert main(["report", str(atlas), "--quiet", "-o", str(report)]) == 0
        assert len(list(report.rglob("*.html"))) > 41  # a page per neuron and the overview
        neuron = TestClient(create_app(open_viewer(atlas).data, None)).get("/api/neuron/1/3").json()
        assert neuron["exemplars"] and neuron["bottom_exemplars"] == []


def test_label_chart_uses_the_signal_of_the_neurons_set(files, tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    found = json.loads(files["sets"].read_text())
    found["signal"] = "gate"
    (tmp_path / "gated.json").write_text(json.dumps(found))
    neuron = found["neurons"][0]
    client = TestClient(create_app(open_viewer(files["atlas"], sets=[tmp_path / "gated.json"]).data, None))
    body = client.get(f"/api/neuron/{neuron['layer']}/{neuron['index']}").json()
    assert body["label_signal"] == {"signal": "gate", "set": "gated"}
    page = html.unescape(client.get(f"/neuron/{neuron['layer']}/{neuron['index']}").text)
    assert "probability per label, gate signal (gated found this neuron on it)" in page
    assert f"{100 * max(body['gate_label_probability'].values()):.2f}%" in page


def test_samples_are_drawn_once_and_shown_under_the_exemplars(files, tmp_path):
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    viewer = open_viewer(copy_atlas(files, tmp_path / "atlas"))
    client = TestClient(create_app(viewer.data, viewer.model))
    page = client.get("/neuron/1/7").text
    assert 'data-samples="/neuron/1/7/samples"' in page and 'id="sample-bands"' not in page
    body = client.get("/api/neuron/1/7/samples").json()
    assert len(body["edges"]) == 11 and body["contexts"] > 0 and len(body["non_activating"]) == 5
    assert sum(len(items) for items in body["bands"].values()) > 0
    assert list((tmp_path / "atlas" / "samples").rglob("7.json"))  # cached next to the atlas
    section = client.get("/neuron/1/7/samples").text
    page = client.get("/neuron/1/7").text
    assert 'id="sample-bands"' in section and 'id="sample-bands"' in page and "data-samples" not in page
    assert client.get("/api/neuron/1/7").json()["samples"] == body
    first = next(item for items in body["bands"].values() for item in items)
    assert first["text"] in html.unescape(page)


def test_overview_writes_repeated_widths_once():
    from neuronatlas.viewer.pages import layer_widths

    assert layer_widths([1536] * 30) == "30 layers × 1,536 = 46,080"
    assert layer_widths([14336] * 32 + [4096]) == "32 layers × 14,336 + 1 layer × 4,096 = 462,848"
