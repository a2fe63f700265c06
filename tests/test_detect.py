"""Position statistics, per-document pooling, and the selectivity / token-detector / positional methods.

Profile results are checked against a brute-force recomputation from activations captured window
by window; the methods against sklearn, hand-made atlases and a neuron planted in a tiny model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronatlas.atlas import Atlas, default_position_edges, load_atlas
from neuronatlas.atlas_merge import merge_atlases
from neuronatlas.corpus import iter_windows, read_corpus
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, ProfileRun, profile
from neuronatlas.stats import SignalStats

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_errors import StopsAfter  # noqa: E402

MAX_LENGTH = 24
CAP = 4  # documents per label in the sample of the main atlas


def options(**changes) -> ProfileOptions:
    return ProfileOptions(**{"max_length": MAX_LENGTH, "top_k": 5, "batch_size": 4, "doc_sample": CAP, **changes})


def run_profile(model_dir, corpus, out, **changes):
    return profile(str(model_dir), corpus, out, label_field="lang", options=options(**changes), device="cpu",
                   overwrite=True, quiet=True)


def brute_force(model_dir, corpus_path):
    """Per window, z of every layer (T, D) with the window's doc, label and seq."""
    model, tokenizer = load_model(str(model_dir), device="cpu")
    neurons = locate_neurons(model)
    corpus = read_corpus(corpus_path, label_field="lang")
    windows = []
    for window in iter_windows(corpus, tokenizer, MAX_LENGTH):
        found = {}
        with torch.no_grad(), capture(neurons, lambda l, z: found.__setitem__(l, z[0].clone())):
            model(input_ids=torch.tensor([window.input_ids]))
        windows.append({"doc": window.doc, "label": window.label, "seq": window.seq, "z": found})
    return windows


def doc_pools(windows, layers: int, docs: list[int]):
    """(len(docs), total neurons) float64 mean and max of z over each document's tokens."""
    means, maxes = [], []
    for doc in docs:
        values = torch.cat([torch.cat([w["z"][l] for l in range(layers)], 1) for w in windows if w["doc"] == doc])
        means.append(values.double().mean(0))
        maxes.append(values.double().amax(0))
    return torch.stack(means).numpy(), torch.stack(maxes).numpy()


@pytest.fixture(scope="module")
def reference(tiny_llama, corpus_path):
    return brute_force(tiny_llama, corpus_path)


@pytest.fixture(scope="module")
def atlas(tiny_llama, corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "atlas"
    run_profile(tiny_llama, corpus_path, out)
    return load_atlas(out)  # through the disk: what the methods will read


# ---- position statistics ------------------------------------------------------------------------


def test_default_position_edges():
    assert default_position_edges(24) == [0, 1, 2, 3, 4, 8, 16]
    assert default_position_edges(512)[-3:] == [64, 128, 256]
    assert default_position_edges(2) == [0, 1]


def check_positions(atlas, reference):
    edges = torch.tensor(atlas.position_edges)
    assert atlas.position_buckets() == ["0", "1", "2", "3", "4-7", "8-15", "16-23"]
    for layer in range(atlas.num_layers):
        values = torch.cat([w["z"][layer] for w in reference]).double()  # (N, D)
        positions = torch.cat([torch.arange(len(w["z"][layer])) for w in reference])
        buckets = torch.bucketize(positions, edges, right=True) - 1
        for b in range(len(edges)):
            mine = values[buckets == b]
            assert int(atlas.position_tokens[b]) == len(mine)
            assert torch.equal(atlas.position_stat("active", layer)[b], (mine > 0).sum(0))
            torch.testing.assert_close(atlas.position_stat("sum", layer)[b], mine.sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.position_stat("sumsq", layer)[b], (mine ** 2).sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.position_stat("max", layer)[b].double(), mine.amax(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.position_stat("min", layer)[b].double(), mine.amin(0), rtol=1e-5, atol=1e-5)


def test_position_statistics_equal_brute_force(atlas, reference):
    check_positions(atlas, reference)
    assert atlas.meta["options"]["position_edges"] == [0, 1, 2, 3, 4, 8, 16]
    assert int(atlas.position_tokens.sum()) == int(atlas.tokens_per_label.sum())


# ---- the document sample ------------------------------------------------------------------------


def sampled_docs(reference, cap):
    """The first ``cap`` documents of each label, in corpus order."""
    taken, docs, seen = {}, [], set()
    for window in reference:
        if window["doc"] in seen:
            continue
        seen.add(window["doc"])
        if taken.get(window["label"], 0) < cap:
            taken[window["label"]] = taken.get(window["label"], 0) + 1
            docs.append(window["doc"])
    return docs


def check_docpool(pool, reference, docs, layers):
    assert pool.docs.tolist() == docs
    labels = {w["doc"]: w["label"] for w in reference}
    assert pool.labels == [labels[d] for d in docs]
    tokens = {d: sum(len(w["z"][0]) for w in reference if w["doc"] == d) for d in docs}
    assert pool.tokens.tolist() == [tokens[d] for d in docs]
    mean, peak = doc_pools(reference, layers, docs)
    np.testing.assert_allclose(pool.matrix("mean"), mean, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(pool.matrix("max"), peak, rtol=2e-3, atol=1e-6)


def test_doc_pooled_mean_and_max_equal_brute_force(atlas, reference):
    docs = sampled_docs(reference, CAP)
    assert len(docs) == 3 * CAP
    # the sample must hold documents of several windows, and windows cut across batches of 4
    windows_of = {d: [w["seq"] for w in reference if w["doc"] == d] for d in docs}
    assert any(len(seqs) > 1 for seqs in windows_of.values())
    assert any(seqs[0] // 4 != seqs[-1] // 4 for seqs in windows_of.values())
    check_docpool(atlas.docpool, reference, docs, atlas.num_layers)
    assert atlas.docpool.matrix("mean", 1).shape == (3 * CAP, atlas.widths[1])
    assert np.load(Path(atlas.docpool.parts[0]["mean"].filename), mmap_mode="r").dtype == np.float16


def test_resume_gives_the_uninterrupted_atlas(tiny_llama, corpus_path, atlas, tmp_path, monkeypatch):
    """Interrupted several batches after its last checkpoint (rows written past it), then resumed."""
    out = tmp_path / "resumed"
    original = ProfileRun.checkpoint
    calls = []

    def only_early_checkpoints(self, path):
        calls.append(path)
        if len(calls) <= 3:  # later batches run on, writing rows the checkpoint does not count
            original(self, path)

    monkeypatch.setattr(ProfileRun, "checkpoint", only_early_checkpoints)
    corpus = StopsAfter(read_corpus(corpus_path, label_field="lang"), limit=10)
    with pytest.raises(KeyboardInterrupt):
        profile(str(tiny_llama), corpus, out, options=options(), device="cpu", quiet=True, checkpoint_every=0)
    assert len(calls) > 3 and (out / "checkpoint.safetensors").exists()
    monkeypatch.setattr(ProfileRun, "checkpoint", original)
    resumed = profile(str(tiny_llama), corpus_path, out, label_field="lang", options=options(), device="cpu",
                      quiet=True, resume=True)
    assert not (out / "checkpoint.safetensors").exists() and not (out / "docpool.partial").exists()
    resumed = load_atlas(out)
    for pool in ("mean", "max"):
        assert np.array_equal(resumed.docpool.matrix(pool), atlas.docpool.matrix(pool))
    assert resumed.docpool.docs.tolist() == atlas.docpool.docs.tolist()
    assert resumed.docpool.tokens.tolist() == atlas.docpool.tokens.tolist()
    for key, tensor in atlas.tensors().items():
        assert torch.equal(resumed.tensors()[key], tensor), key


def test_halves_merge_positions_and_concatenate_doc_samples(tiny_llama, corpus_rows_and_path, atlas, reference, tmp_path):
    rows, _ = corpus_rows_and_path
    halves = []
    for name, part in (("first", rows[:13]), ("second", rows[13:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        halves.append(run_profile(tiny_llama, path, tmp_path / name, doc_sample=256))
    merged = merge_atlases(*halves)
    assert torch.equal(merged.position_tokens, atlas.position_tokens)
    for layer in range(atlas.num_layers):
        assert torch.equal(merged.position_stat("active", layer), atlas.position_stat("active", layer))
        for name in ("sum", "sumsq", "min", "max"):
            torch.testing.assert_close(merged.position_stat(name, layer), atlas.position_stat(name, layer))
    merged.save(tmp_path / "merged")
    reloaded = load_atlas(tmp_path / "merged")
    check_positions(reloaded, reference)
    check_docpool(reloaded.docpool, reference, list(range(len(rows))), atlas.num_layers)  # every document
    assert reloaded.meta["options"]["position_edges"] == atlas.meta["options"]["position_edges"]


def test_merge_keeps_positions_of_compatible_max_lengths_and_drops_others():
    def fake(max_length, edges):
        meta = {"options": {"positions": edges is not None, "position_edges": edges, "max_length": max_length,
                            "threshold": 0.0}, "model": {"widths": [2]}}
        part = Atlas(meta, {}, torch.zeros(1, dtype=torch.int64))
        if edges is not None:
            part.positions = SignalStats([2], len(edges))
            part.positions.update(0, torch.ones(len(edges), 2), torch.arange(len(edges)), torch.arange(len(edges)))
            part.position_tokens = torch.ones(len(edges), dtype=torch.int64)
        return part

    from neuronatlas.atlas_merge import merge_positions

    merged = fake(64, [0])
    merge_positions(fake(24, default_position_edges(24)), fake(64, default_position_edges(64)), merged)
    assert merged.meta["options"]["position_edges"] == default_position_edges(64)
    assert merged.position_tokens.tolist() == [2, 2, 2, 2, 2, 2, 2, 1]
    assert merged.position_stat("sum", 0)[-1].tolist() == [1, 1]
    merged = fake(64, [0])
    merge_positions(fake(24, [0, 5]), fake(64, default_position_edges(64)), merged)
    assert merged.positions is None and merged.meta["options"]["positions"] is False
    merged = fake(64, [0])
    merge_positions(fake(24, None), fake(64, default_position_edges(64)), merged)
    assert merged.positions is None


def test_no_positions_and_no_doc_sample(tiny_llama, corpus_path, tmp_path):
    bare = run_profile(tiny_llama, corpus_path, tmp_path / "bare", positions=False, doc_sample=0)
    assert bare.positions is None and bare.docpool is None
    assert not any(key.startswith("position") for key in bare.tensors())
    loaded = load_atlas(tmp_path / "bare")
    assert loaded.positions is None and loaded.docpool is None
    assert not (tmp_path / "bare" / "docpool_mean.npy").exists()
    from neuronatlas.methods.positional import find_positional
    from neuronatlas.methods.selectivity import find_selective

    with pytest.raises(NeuronAtlasError, match="--no-positions"):
        find_positional(loaded)
    with pytest.raises(NeuronAtlasError, match="--doc-sample"):
        find_selective(loaded, metric="ap")
    assert len(find_selective(loaded, metric="prob_diff", top_k=2)) == 6  # needs no sample


# ---- selectivity --------------------------------------------------------------------------------


def test_ap_and_auroc_equal_sklearn(atlas):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from neuronatlas.methods.selectivity import selectivity_scores

    pool = atlas.docpool
    for label in ("de", "ru"):
        y = np.array([x == label for x in pool.labels])
        for metric, reference in (("ap", average_precision_score), ("auroc", roc_auc_score)):
            for pooling in ("mean", "max"):
                scores = selectivity_scores(atlas, label, metric, pooling)
                for layer in range(atlas.num_layers):
                    matrix = pool.matrix(pooling, layer)
                    for neuron in (0, 3, 17, 36):
                        expected = reference(y, matrix[:, neuron])
                        assert abs(float(scores[layer][neuron]) - expected) < 1e-12, (label, metric, layer, neuron)


def test_ties_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from neuronatlas.methods.selectivity import auroc, average_precision

    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (40, 6), generator=generator).float()  # many ties
    y = torch.arange(40) % 3 == 0
    ap, area = average_precision(scores, y), auroc(scores, y)
    for column in range(6):
        assert abs(float(ap[column]) - average_precision_score(y.numpy(), scores[:, column].numpy())) < 1e-12
        assert abs(float(area[column]) - roc_auc_score(y.numpy(), scores[:, column].numpy())) < 1e-12


def test_find_selective_keeps_the_top_scores_per_label(atlas):
    from neuronatlas.methods.selectivity import find_selective, selectivity_scores

    found = find_selective(atlas, metric="ap", top_k=5)
    assert found.labels == ["de", "en", "ru"] and len(found) == 15
    de = [n for n in found.neurons if n.label == "de"]
    flat = torch.cat(selectivity_scores(atlas, "de", "ap", "mean"))
    assert [n.score for n in de] == sorted(flat.tolist(), reverse=True)[:5]
    only = find_selective(atlas, label="ru", metric="auroc", pool="max", threshold=0.9)
    assert only.labels in (["ru"], []) and all(n.score >= 0.9 for n in only.neurons)
    # prob_diff from the token-level counts
    diff = find_selective(atlas, label="en", metric="prob_diff", top_k=3)
    k = atlas.label_index("en")
    n = diff.neurons[0]
    active = atlas.stat("active", n.layer).double()
    tokens = atlas.tokens_per_label.double()
    expected = active[k, n.index] / tokens[k] - (active[:, n.index].sum() - active[k, n.index]) / (tokens.sum() - tokens[k])
    assert abs(n.score - float(expected)) < 1e-12


def test_selectivity_bad_inputs(atlas):
    from neuronatlas.methods.selectivity import find_selective

    with pytest.raises(NeuronAtlasError, match="unknown label 'fr'"):
        find_selective(atlas, label="fr")
    with pytest.raises(NeuronAtlasError, match="unknown metric"):
        find_selective(atlas, metric="f1")
    with pytest.raises(NeuronAtlasError, match="unknown pool"):
        find_selective(atlas, pool="median")
    with pytest.raises(NeuronAtlasError, match="top-k"):
        find_selective(atlas, top_k=0)
    unlabelled = dataclasses.replace(atlas, meta={**atlas.meta, "labels": ["all"]})
    with pytest.raises(NeuronAtlasError, match="--label-field"):
        find_selective(unlabelled)
    without = dataclasses.replace(atlas, docpool=None)
    with pytest.raises(NeuronAtlasError, match="--doc-sample"):
        find_selective(without, metric="auroc")


# ---- positional ---------------------------------------------------------------------------------


def hand_made_atlas(values_per_bucket: list[torch.Tensor], edges: list[int], max_length: int = 24) -> Atlas:
    """An atlas whose only statistics are the position buckets' moments of the given (n_b, D) values."""
    width = values_per_bucket[0].shape[1]
    meta = {"model": {"widths": [width], "name_or_path": "hand", "fingerprint": "0", "gated": False},
            "options": {"positions": True, "position_edges": edges, "max_length": max_length, "threshold": 0.0},
            "labels": ["all"]}
    atlas = Atlas(meta, {}, torch.zeros(1, dtype=torch.int64))
    atlas.positions = SignalStats([width], len(edges))
    for bucket, values in enumerate(values_per_bucket):
        atlas.positions.update(0, values, torch.full((len(values),), bucket), torch.arange(len(values)))
    atlas.position_tokens = torch.tensor([len(v) for v in values_per_bucket])
    return atlas


def test_positional_variance_reduction_on_a_hand_made_atlas():
    from neuronatlas.methods.positional import find_positional, position_variance_reduction

    generator = torch.Generator().manual_seed(0)
    sizes = [5, 5, 5, 5, 20, 40, 30]
    buckets = []
    for b, n in enumerate(sizes):
        constant = torch.full((n,), float(b))  # neuron 0: constant within each bucket -> VR 1
        flat = torch.randn(n, generator=generator) * 0 + 2.0  # neuron 1: the same everywhere -> VR 0
        noisy = b * 0.5 + torch.randn(n, generator=generator)  # neuron 2: somewhere in between
        peaked = torch.full((n,), 5.0 if b == 2 else 0.0)  # neuron 3: only at position 2
        buckets.append(torch.stack([constant, flat, noisy, peaked], 1))
    atlas = hand_made_atlas(buckets, [0, 1, 2, 3, 4, 8, 16])
    everything = torch.cat(buckets).double()
    labels = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    within = sum(((everything[labels == b] - everything[labels == b].mean(0)) ** 2).sum(0) for b in range(len(sizes)))
    total = ((everything - everything.mean(0)) ** 2).sum(0)
    result = position_variance_reduction(atlas, 0)
    torch.testing.assert_close(result["vr"][[0, 2, 3]], (1 - within / total)[[0, 2, 3]], rtol=1e-9, atol=1e-9)
    assert float(result["vr"][1]) == 0.0
    found = find_positional(atlas, min_variance_explained=0.5)
    assert [(n.layer, n.index) for n in found.neurons][:2] in ([(0, 0), (0, 3)], [(0, 3), (0, 0)])
    assert (0, 1) not in {(n.layer, n.index) for n in found.neurons}
    assert found.params["details"]["0:3"]["peak_bucket"] == "2"
    assert found.params["details"]["0:0"]["peak_bucket"] == "16-23"
    assert found.params["details"]["0:3"]["peak_mean"] == 5.0
    # leaving out positions below 4 leaves neuron 3 constant (0) everywhere: not positional
    later = find_positional(atlas, min_variance_explained=0.5, min_position=4)
    assert (0, 3) not in {(n.layer, n.index) for n in later.neurons}


def test_find_positional_on_a_profiled_atlas(atlas, reference):
    from neuronatlas.methods.positional import find_positional

    found = find_positional(atlas, min_variance_explained=0.0)
    assert len(found) == sum(atlas.widths)
    best = found.neurons[0]
    values = torch.cat([w["z"][best.layer][:, best.index] for w in reference]).double()
    positions = torch.cat([torch.arange(len(w["z"][0])) for w in reference])
    buckets = torch.bucketize(positions, torch.tensor(atlas.position_edges), right=True) - 1
    within = sum(((values[buckets == b] - values[buckets == b].mean()) ** 2).sum() for b in buckets.unique())
    assert abs(best.score - float(1 - within / ((values - values.mean()) ** 2).sum())) < 1e-6
    with pytest.raises(NeuronAtlasError, match="between 0 and 1"):
        find_positional(atlas, min_variance_explained=2)


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
    assert info["triggers"][0]["ids"] == [trigger] and info["triggers"][0]["text"] == [TRIGGER]
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
                    "--top-k", "4"]) == 0
    data = json.loads((tmp_path / "sel.json").read_text())
    assert data["method"] == "selectivity-ap" and data["count"] == 12 and data["labels"] == ["de", "en", "ru"]
    assert run_cli(["find", "positional", "--atlas", str(tmp_path / "atlas"), "--out", str(tmp_path / "pos.json"),
                    "--min-vr", "0"]) == 0
    assert json.loads((tmp_path / "pos.json").read_text())["count"] == sum(atlas.widths)
    assert run_cli(["find", "tokens", "--atlas", str(tmp_path / "planted"), "--out", str(tmp_path / "tok.json"),
                    "--model", str(model_dir), "--corpus", str(corpus_path), "--max-tokens", "400"]) == 0
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


def test_profile_cli_flags_and_bad_options(tiny_llama, corpus_path, tmp_path, capsys):
    from neuronatlas.cli import main

    argv = ["profile", "--model", str(tiny_llama), "--corpus", str(corpus_path), "--label-field", "lang",
            "--device", "cpu", "--quiet", "--max-length", "24", "--top-k", "2"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--doc-sample", "1", "--no-positions"]) == 0
    made = load_atlas(tmp_path / "a")
    assert made.positions is None and made.docpool.labels == ["en", "de", "ru"]
    assert made.meta["options"]["doc_sample"] == 1 and made.meta["options"]["positions"] is False
    assert main(argv + ["--out", str(tmp_path / "b"), "--doc-sample", "-1"]) == 2
    assert "doc sample" in capsys.readouterr().err
    with pytest.raises(NeuronAtlasError, match="position edges"):
        profile(str(tiny_llama), corpus_path, tmp_path / "c", options=options(position_edges=[1, 4]), device="cpu",
                quiet=True)


# ---- the bundled model --------------------------------------------------------------------------


def test_bundled_tiny_llama_has_language_selective_neurons(tmp_path):
    from neuronatlas import bundled
    from neuronatlas.methods.selectivity import find_selective

    model_dir = bundled.model_path("tiny-llama")
    if not (model_dir / "config.json").exists() or not any(model_dir.glob("*.safetensors")):
        pytest.skip(f"the bundled tiny-llama is not in {model_dir} yet (scripts/train_bundled.py makes it)")
    rows = [json.loads(line) for line in bundled.CORPUS_HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    per_label: dict[str, int] = {}
    chosen = []
    for row in rows:  # 24 documents per language keep this test short
        if per_label.get(row["lang"], 0) < 24:
            per_label[row["lang"]] = per_label.get(row["lang"], 0) + 1
            chosen.append(row)
    corpus = tmp_path / "heldout-sample.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    atlas = profile(str(model_dir), corpus, tmp_path / "atlas", label_field="lang", device="cpu", quiet=True,
                    options=ProfileOptions(max_length=64, batch_size=16, top_k=0, gate=False))
    found = find_selective(atlas, metric="ap", top_k=1)
    best = {n.label: n.score for n in found.neurons}
    print("bundled tiny-llama best AP per language:", {k: round(v, 3) for k, v in sorted(best.items())})
    assert set(best) == set(per_label)
    assert all(score > 0.9 for score in best.values()), best
