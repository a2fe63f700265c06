"""neuronatlas.methods.detectors (token and bigram detectors, on a neuron planted in a tiny model)
and the CLI of cli/find/detectors.py (find selectivity, positional, tokens)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from neuronatlas.corpus import iter_windows, read_corpus
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons

sys.path.insert(0, str(Path(__file__).parent))
from detect_fixtures import MAX_LENGTH, atlas, run_profile  # noqa: E402,F401  (a fixture and helpers)


# ---- token detectors ----------------------------------------------------------------------------

TRIGGER = "cat"
DIM, LAYER, NEURON = 5, 0, 7


@pytest.fixture(scope="module")
def planted(tiny_llama, corpus_path, tmp_path_factory):
    """The tiny Llama with neuron (0, 7) turned into a perfect detector of "cat" that suppresses it.

    Residual dimension 5 carries the token: zero in every embedding but "cat"'s, and attention in
    layer 0 neither reads nor writes it. The neuron's gate and up rows read only that dimension,
    so z = silu(10 x5) x5 is exactly 0 on every other token; its value vector is −W_U["cat"].
    """
    folder = tmp_path_factory.mktemp("planted")
    model, tokenizer = load_model(str(tiny_llama), device="cpu")
    trigger = tokenizer.convert_tokens_to_ids(TRIGGER)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, DIM] = 0
        embed[trigger, DIM] = 3.0
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[:, DIM] = 0
        attention.o_proj.weight[DIM, :] = 0
        mlp = model.model.layers[LAYER].mlp
        for projection, value in ((mlp.gate_proj, 10.0), (mlp.up_proj, 1.0)):
            projection.weight[NEURON] = 0
            projection.weight[NEURON, DIM] = value
        unembed = model.lm_head.weight[trigger]
        mlp.down_proj.weight[:, NEURON] = -unembed / unembed.norm()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    atlas = run_profile(folder / "model", corpus_path, folder / "atlas", doc_sample=0, positions=False)
    model, tokenizer = load_model(str(folder / "model"), device="cpu")
    return atlas, model, tokenizer, trigger


def test_planted_token_detector_is_found_with_vr_near_one(planted, corpus_path):
    from neuronatlas.methods.detectors import find_token_detectors

    atlas, model, tokenizer, trigger = planted
    found = find_token_detectors(atlas, model, tokenizer, corpus_path, label_field="lang")
    top = found.neurons[0]
    assert (top.layer, top.index) == (LAYER, NEURON)
    assert top.score > 0.999999
    assert all(n.score < 0.999 for n in found.neurons[1:])  # the random neurons explain less
    info = found.params["details"][f"{LAYER}:{NEURON}"]
    assert info["triggers"][0]["ids"] == [trigger] and [t.strip() for t in info["triggers"][0]["text"]] == [TRIGGER]  # the token's own leading space is kept
    assert info["coverage"] == 1.0 and info["mean_elsewhere"] == 0.0 and info["mean_on_triggers"] > 0
    assert info["suppresses_trigger"] is True and info["trigger_logit_quantile"][0] == 0.0
    assert info["vr_triggers"] > 0.999999  # "is the token cat" explains it as well as the token does
    by_trigger = find_token_detectors(atlas, model, tokenizer, corpus_path, feature="triggers")
    assert (by_trigger.neurons[0].layer, by_trigger.neurons[0].index) == (LAYER, NEURON)
    assert len(by_trigger) < len(found)  # the binary feature is the stricter test
    with pytest.raises(NeuronAtlasError, match="unknown feature"):
        find_token_detectors(atlas, feature="bigram")
    assert sum(1 for d in found.params["details"].values() if d["suppresses_trigger"]) < len(found) / 2
    json.dumps(found.to_json())  # the details are plain JSON
    # without the model: the same candidate, scored by coverage
    coverage_only = find_token_detectors(atlas)
    assert (LAYER, NEURON) in {(n.layer, n.index) for n in coverage_only.neurons}
    assert "suppresses_trigger" not in coverage_only.params["details"][f"{LAYER}:{NEURON}"]
    # several passes over the tokens when the sums would not fit at once give the same values
    split = find_token_detectors(atlas, model, tokenizer, corpus_path, max_elements=5000, max_tokens=500)
    whole = find_token_detectors(atlas, model, tokenizer, corpus_path, max_tokens=500)
    assert [(n.layer, n.index) for n in split.neurons] == [(n.layer, n.index) for n in whole.neurons]
    assert [n.score for n in split.neurons] == pytest.approx([n.score for n in whole.neurons], abs=1e-12)


def test_bigram_detectors_and_vr_against_brute_force(planted, corpus_path):
    from neuronatlas.methods.detectors import find_token_detectors, variance_explained

    atlas, model, tokenizer, trigger = planted
    bigram = find_token_detectors(atlas, model, tokenizer, corpus_path, ngram=2, coverage=0.6, max_triggers=3,
                                  min_variance_explained=0.0)
    for info in bigram.params["details"].values():
        assert all(len(t["ids"]) in (1, 2) for t in info["triggers"])
    # VR by hand for two neurons on the first windows of the corpus
    neurons = locate_neurons(model)
    windows = []
    total = 0
    for window in iter_windows(read_corpus(corpus_path), tokenizer, MAX_LENGTH):
        windows.append(window)
        total += len(window.input_ids)
        if total >= 300:
            break
    values, keys = {0: [], 1: []}, []
    for window in windows:
        with torch.no_grad(), capture(neurons, lambda l, z: values[l].append(z[0].double())):
            model(input_ids=torch.tensor([window.input_ids]))
        keys += list(window.input_ids)
    keys = torch.tensor(keys)
    measured = variance_explained(atlas, model, tokenizer, corpus_path, [(0, 3), (1, 20)], max_tokens=300)
    for layer, index in ((0, 3), (1, 20)):
        a = torch.cat(values[layer])[:, index]
        within = sum(((a[keys == v] - a[keys == v].mean()) ** 2).sum() for v in keys.unique())
        expected = 1 - within / ((a - a.mean()) ** 2).sum()
        assert abs(measured[(layer, index)]["vr"] - float(expected)) < 1e-5
        assert measured[(layer, index)]["tokens"] == len(keys)


def test_detector_bad_inputs(planted, atlas, tiny_gpt2, corpus_path):
    from neuronatlas.methods.detectors import find_token_detectors

    planted_atlas, model, tokenizer, _ = planted
    with pytest.raises(NeuronAtlasError, match="ngram"):
        find_token_detectors(planted_atlas, ngram=3)
    with pytest.raises(NeuronAtlasError, match="coverage"):
        find_token_detectors(planted_atlas, coverage=0)
    with pytest.raises(NeuronAtlasError, match="tokenizer"):
        find_token_detectors(planted_atlas, corpus=corpus_path)
    with pytest.raises(NeuronAtlasError, match="another model"):
        find_token_detectors(atlas, model, tokenizer, corpus_path)  # the unplanted atlas
    no_exemplars = dataclasses.replace(planted_atlas, meta={**planted_atlas.meta, "options": {
        **planted_atlas.meta["options"], "top_k": 0}})
    with pytest.raises(NeuronAtlasError, match="--top-k"):
        find_token_detectors(no_exemplars)
    with pytest.raises(NeuronAtlasError, match="contexts"):
        find_token_detectors(dataclasses.replace(planted_atlas, contexts=None))


# ---- the command line ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from neuronatlas.cli.find import add_methods as add_find_commands

    top = argparse.ArgumentParser(prog="neuronatlas")
    commands = top.add_subparsers(dest="command")
    find = commands.add_parser("find")
    add_find_commands(find.add_subparsers(dest="method"))
    return top


def run_cli(argv):
    args = parser().parse_args(argv)
    return args.handler(args)


def test_cli_commands_write_neuron_sets(planted, atlas, corpus_path, tmp_path, capsys):
    atlas.save(tmp_path / "atlas")
    planted[0].save(tmp_path / "planted")
    model_dir = Path(planted[1].name_or_path)
    assert run_cli(["find", "selectivity", "--atlas", str(tmp_path / "atlas"), "--out", str(tmp_path / "sel.json"),
                    "--top-k", "4", "--no-null"]) == 0
    data = json.loads((tmp_path / "sel.json").read_text())
    assert data["method"] == "selectivity-ap" and data["count"] == 12 and data["labels"] == ["de", "en", "ru"]
    assert run_cli(["find", "positional", "--atlas", str(tmp_path / "atlas"), "--out", str(tmp_path / "pos.json"),
                    "--min-vr", "0", "--no-null"]) == 0
    assert json.loads((tmp_path / "pos.json").read_text())["count"] == sum(atlas.widths)
    assert run_cli(["find", "positional", "--atlas", str(tmp_path / "atlas"), "--out", str(tmp_path / "pos5.json"),
                    "--no-null"]) == 0
    only_first = json.loads((tmp_path / "pos5.json").read_text())["params"]["first_token_only"]
    assert (f"{only_first:,} of them only through position 0" in capsys.readouterr().out) == (only_first > 0)
    assert run_cli(["find", "tokens", "--atlas", str(tmp_path / "planted"), "--out", str(tmp_path / "tok.json"),
                    "--model", str(model_dir), "--corpus", str(corpus_path), "--max-tokens", "400", "--no-null"]) == 0
    data = json.loads((tmp_path / "tok.json").read_text())
    assert data["neurons"][0]["layer"] == LAYER and data["neurons"][0]["index"] == NEURON
    assert data["params"]["details"][f"{LAYER}:{NEURON}"]["suppresses_trigger"] is True
    out = capsys.readouterr().out
    assert "neuron set written to" in out and "suppress their trigger" in out
    with pytest.raises(NeuronAtlasError, match="--corpus needs --model"):
        run_cli(["find", "tokens", "--atlas", str(tmp_path / "planted"), "--out", str(tmp_path / "x.json"),
                 "--corpus", str(corpus_path)])
    with pytest.raises(NeuronAtlasError, match="is a folder"):
        run_cli(["find", "positional", "--atlas", str(tmp_path / "atlas"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        run_cli(["find", "selectivity", "--atlas", str(tmp_path / "atlas"), "--out", "x.json", "--metric", "f1"])
