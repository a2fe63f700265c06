"""neuronatlas.methods.nulls and every method's permutation null: shuffled labels yield (almost)
nothing, real labels still yield their neurons, on tiny Llama and GPT-2 models."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.methods.nulls import (NullOptions, benjamini_hochberg, check_support, pooled_p, q_values,
                                       shuffled_labels, supported_labels)

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cli_fails, write_corpus  # noqa: E402

NULL = NullOptions()


# ---- the machinery ------------------------------------------------------------------------------


def test_benjamini_hochberg_matches_the_definition():
    p = torch.tensor([0.01, 0.04, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    assert torch.allclose(benjamini_hochberg(p), torch.tensor([0.04, 0.0533333, 0.0533333, 0.2], dtype=torch.float64))
    q = q_values({"a": torch.tensor([0.001, 0.5]), "b": torch.tensor([0.002])})
    assert torch.allclose(q["a"], torch.tensor([0.003, 0.5], dtype=torch.float64)) and q["b"].shape == (1,)


def test_pooled_p_is_uniform_under_the_null_and_small_for_real_effects():
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(2000, generator=generator) * 10  # neurons of very different scales
    null = torch.randn(20, 2000, generator=generator) * scale
    real = torch.randn(2000, generator=generator) * scale
    p = pooled_p(real, null)
    assert abs(float((p < 0.05).double().mean()) - 0.05) < 0.02
    assert int((q_values({"x": p})["x"] < 0.05).sum()) <= 5
    real[:50] += 10 * scale[:50]
    p = pooled_p(real, null)
    assert int((q_values({"x": p})["x"][:50] < 0.05).sum()) == 50
    constant = pooled_p(torch.ones(3), torch.ones(4, 3))
    assert constant.tolist() == [1.0, 1.0, 1.0]


def test_shuffles_move_whole_documents_and_support_is_checked():
    labels = ["a", "a", "b", "b", "b", "c"]
    groups = np.array([0, 0, 1, 1, 1, 2])
    for seed in range(5):
        moved = shuffled_labels(labels, groups, np.random.default_rng(seed))
        assert moved[0] == moved[1] and moved[2] == moved[3] == moved[4]
        assert sorted({moved[0], moved[2], moved[5]}) == ["a", "b", "c"]
    with pytest.raises(NeuronAtlasError, match="label 'b' has 3 documents, fewer than --min-docs 20"):
        check_support({"a": 30, "b": 3}, 20)
    assert supported_labels({"a": 30, "b": 3, "c": 25}, 20, total=58) == (["a", "c"], {"b": 3})
    with pytest.raises(NeuronAtlasError, match="label 'b' has 3 documents"):
        supported_labels({"a": 30, "b": 3, "c": 25}, 20, asked=["b"])  # named by the user: refused
    with pytest.raises(NeuronAtlasError, match="label 'a' has 3 documents"):
        supported_labels({"a": 3, "b": 4}, 20)  # nothing left
    with pytest.raises(NeuronAtlasError, match="label 'a' has 30 of the 33 documents: the other labels have 3"):
        supported_labels({"a": 30, "b": 3}, 20, total=33)  # nothing to test 'a' against
    with pytest.raises(NeuronAtlasError, match="permutations"):
        NullOptions(permutations=0)


# ---- every method: real labels against shuffled ones ---------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """30 documents per language, and the same documents with the languages shuffled."""
    folder = tmp_path_factory.mktemp("nulls")
    rows = write_corpus(folder / "real.jsonl", documents=90, seed=1)
    shuffled = [row["lang"] for row in rows]
    random.Random(5).shuffle(shuffled)
    (folder / "shuffled.jsonl").write_text("".join(json.dumps(dict(row, lang=lang), ensure_ascii=False) + "\n"
                                                   for row, lang in zip(rows, shuffled)), encoding="utf-8")
    return {"real": folder / "real.jsonl", "shuffled": folder / "shuffled.jsonl"}


@pytest.fixture(scope="module")
def atlases(tiny_llama, tiny_gpt2, corpora, tmp_path_factory):
    from neuronatlas.profile import ProfileOptions, profile

    folder = tmp_path_factory.mktemp("null-atlases")
    out = {}
    for name, model in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        for kind, corpus in corpora.items():
            out[name, kind] = profile(str(model), corpus, folder / f"{name}-{kind}", label_field="lang", device="cpu",
                                      quiet=True, options=ProfileOptions(max_length=48, top_k=10, batch_size=8))
    return out


def pairs(found) -> int:
    return len(found.neurons)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_selectivity_on_shuffled_labels_keeps_at_most_5_percent(atlases, model):
    from neuronatlas.methods.selectivity import find_selective

    real = find_selective(atlases[model, "real"], top_k=None, threshold=0.0, null=NULL)
    shuffled = find_selective(atlases[model, "shuffled"], top_k=None, threshold=0.0, null=NULL)
    print(model, "selectivity real", pairs(real), "shuffled", pairs(shuffled))
    assert pairs(real) >= 30 and pairs(shuffled) <= 0.05 * pairs(real)
    assert all(n.q < 0.05 for n in real.neurons)
    assert real.null["permutations"] == 20 and real.null["null_best"] < real.null["best"]
    unfiltered = find_selective(atlases[model, "shuffled"], top_k=None, threshold=0.0)
    assert pairs(unfiltered) > 100  # without the null, shuffled labels "find" neurons


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_lape_and_probe_on_shuffled_labels_keep_nothing(atlases, model):
    from neuronatlas.methods.lape import find_lape
    from neuronatlas.methods.probe import find_probe

    for kind, expect_some in (("real", True), ("shuffled", False)):
        lape = find_lape(atlases[model, kind], top_rate=0.05, null=NULL)
        probe = find_probe(atlases[model, kind], top_k=4, ks=[1, 2, 4], null=NULL)
        print(model, kind, "lape", pairs(lape), "probe", pairs(probe))
        assert (pairs(lape) > 0) == expect_some and (pairs(probe) > 0) == expect_some
        assert lape.signal == ("gate" if model == "llama" else "z")


def test_positional_null_refuses_noise_and_keeps_real_position_neurons():
    from test_positional import hand_made_atlas

    from neuronatlas.methods.positional import find_positional

    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(40, 60, generator=generator) for _ in range(4)]
    noise[0][:, 0] += 100.0  # neuron 0 is positional; the others are noise
    atlas = hand_made_atlas(noise, [0, 1, 2, 4])
    found = find_positional(atlas, min_variance_explained=0.0, null=NULL)
    kept = [n.index for n in found.neurons]
    assert kept[0] == 0 and found.neurons[0].q < 0.05 and len(kept) <= 3  # <= 5% of the 59 noise neurons
    assert len(find_positional(atlas, min_variance_explained=0.0)) == 60


def test_token_detectors_on_shuffled_exemplar_tokens_keep_almost_nothing(atlases, monkeypatch):
    from neuronatlas.methods import detectors

    atlas = atlases["llama", "real"]
    real = detectors.find_token_detectors(atlas, null=NULL)
    original = detectors.exemplar_triggers

    def shuffled(*args, **kwargs):  # every exemplar's token drawn from its layer's exemplars
        tables = original(*args, **kwargs)
        rng = np.random.default_rng(1)
        for table in tables.values():
            seen = table["keys"] >= 0
            table["keys"][seen] = rng.permutation(table["keys"][seen])
        return tables

    monkeypatch.setattr(detectors, "exemplar_triggers", shuffled)
    fake = detectors.find_token_detectors(atlas, null=NullOptions(seed=3))
    print("tokens real", len(real), "shuffled", len(fake))
    assert len(real) >= 10 and len(fake) <= 0.05 * len(real)


def test_attribution_and_cett_on_shuffled_labels_keep_nothing(tiny_llama, corpora):
    from neuronatlas.loading import load_model
    from neuronatlas.methods.attribution import find_attribution
    from neuronatlas.methods.cett import find_cett

    model, tokenizer = load_model(str(tiny_llama), device="cpu")
    counts = {}
    for kind, corpus in corpora.items():
        found = find_attribution(model, tokenizer, corpus, label_field="lang", top_rate=0.1, max_length=32, null=NULL)
        records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
        cett = find_cett(model, tokenizer, records, "de", label_field="lang", c=1.0, max_length=32, null=NULL)
        counts[kind] = (pairs(found), len(cett))
    print("attribution, cett real", counts["real"], "shuffled", counts["shuffled"])
    assert counts["real"][0] > 0 and counts["real"][1] > 0 and counts["shuffled"] == (0, 0)


def test_universal_null_on_misaligned_tokens_keeps_nothing():
    from neuronatlas.methods.universal import PairCorrelation, universality

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 48, generator=generator)
    b = a[:, torch.randperm(48, generator=generator)] + 0.1 * torch.randn(3000, 48, generator=generator)
    counts = {}
    for kind, rows in (("real", torch.arange(3000)), ("shuffled", torch.randperm(3000, generator=generator))):
        stats = PairCorrelation([24, 24], [24, 24])
        stats.update(a, b[rows])
        counts[kind] = int(universality(stats, threshold=0.5, null=NULL)["a"]["universal"].sum())
        assert counts[kind] <= int(universality(stats, threshold=0.5)["a"]["universal"].sum())
    assert counts["real"] >= 40 and counts["shuffled"] == 0


# ---- the set JSON and the CLI -------------------------------------------------------------------


def test_set_json_records_null_q_signal_and_zero_labels(atlases, tmp_path, capsys):
    from neuronatlas.cli import main
    from neuronatlas.neuronset import load_neuron_set

    atlas = atlases["gpt2", "shuffled"]
    atlas.save(tmp_path / "atlas")
    out = tmp_path / "set.json"
    assert main(["find", "selectivity", "--atlas", str(tmp_path / "atlas"), "--label-field", "lang",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per label (neurons): de 0, en 0, ru 0" in printed and "best null" in printed and "chance" in printed
    data = json.loads(out.read_text())
    assert data["signal"] == "z" and data["per_label"] == {"de": 0, "en": 0, "ru": 0}
    assert data["null"]["permutations"] == 20 and data["null"]["chance"] == pytest.approx(1 / 3)  # balanced labels
    assert set(data["null"]["per_label"]["de"]) == {"best", "null_best", "chance"}
    assert load_neuron_set(out).signal == "z"
    old = {"method": "lape", "params": {}, "neurons": [{"layer": 0, "index": 1, "score": 0.5, "label": "de"}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_neuron_set(tmp_path / "old.json").signal == "z"
    real = atlases["llama", "real"]
    real.save(tmp_path / "real")
    assert main(["find", "lape", "--atlas", str(tmp_path / "real"), "--out", str(out), "--top-rate", "0.05", "--overwrite"]) == 0
    data = json.loads(out.read_text())
    assert data["signal"] == "gate" and data["params"]["top_rate"] == 0.05
    assert all("q" in n for n in data["neurons"]) and data["unique_neurons"] <= data["count"]
    cli_fails(capsys, ["find", "selectivity", "--atlas", str(tmp_path / "atlas"), "--label-field", "topic",
                       "--out", str(out), "--overwrite"], "--label-field topic", "(lang)")
    cli_fails(capsys, ["find", "lape", "--atlas", str(tmp_path / "atlas"), "--out", str(out), "--min-docs", "31", "--overwrite"],
              "label 'de' has 30 documents", "--min-docs 31")


def test_a_label_with_too_few_documents_is_left_out_and_named(corpora, tiny_llama, tmp_path, capsys):
    """Eight of the Russian documents relabelled "xx": selectivity and LAPE test de, en and ru, leave xx
    out with its count (JSON and summary), and refuse it when it is asked for by name."""
    from neuronatlas.cli import main
    from neuronatlas.profile import ProfileOptions, profile

    rows = [json.loads(line) for line in corpora["real"].read_text(encoding="utf-8").splitlines()]
    russian = [index for index, row in enumerate(rows) if row["lang"] == "ru"][:8]
    for index in russian:
        rows[index]["lang"] = "xx"
    (tmp_path / "rare.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    profile(str(tiny_llama), tmp_path / "rare.jsonl", tmp_path / "atlas", label_field="lang", device="cpu", quiet=True,
            options=ProfileOptions(max_length=48, top_k=10, batch_size=8))
    for method in ("selectivity", "lape"):
        out = tmp_path / f"{method}.json"
        argv = ["find", method, "--atlas", str(tmp_path / "atlas"), "--out", str(out)]
        assert main(argv + (["--label-field", "lang"] if method == "selectivity" else ["--top-rate", "0.05"])) == 0
        printed = capsys.readouterr().out
        assert "left out, fewer than --min-docs 20 documents: 'xx' (8)" in printed
        data = json.loads(out.read_text())
        assert data["null"]["refused_labels"] == {"xx": 8} and data["null"]["min_docs"] == 20
        assert set(data["per_label"]) == {"de", "en", "ru"} and set(data["null"]["per_label"]) == {"de", "en", "ru"}
        assert data["count"] > 0 and all(neuron["label"] != "xx" for neuron in data["neurons"])
    cli_fails(capsys, ["find", "selectivity", "--atlas", str(tmp_path / "atlas"), "--label-field", "lang", "--label", "xx",
                       "--out", str(tmp_path / "xx.json")], "label 'xx' has 8 documents", "--min-docs 20")
