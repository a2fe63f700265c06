"""Identification methods against hand-made cases and brute-force recomputations, and their CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import cli_fails
import torch

from neuronatlas.atlas import Atlas, new_signals
from neuronatlas.cli import main
from neuronatlas.corpus import iter_windows, read_corpus
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.methods import (
    CLASSES, find_dead, find_lape, find_vocab, find_weight_class, vocab_projection, vocab_statistics,
    weight_classes,
)
from neuronatlas.models import locate_neurons
from neuronatlas.neuronset import load_neuron_set
from neuronatlas.profile import ProfileOptions, profile

MAX_LENGTH = 24


# ---- helpers ------------------------------------------------------------------------------------


def hand_atlas(counts, tokens, labels=("de", "en", "ru"), gated=True, z_counts=None) -> Atlas:
    """An atlas whose gate (and z) activation counts are ``counts``: one (K, D) array per layer."""
    widths = [int(np.asarray(c).shape[1]) for c in counts]
    meta = {
        "format_version": 1, "package_version": "test",
        "model": {"name_or_path": "hand-made", "model_type": "llama" if gated else "gpt2", "fingerprint": "f" * 16,
                  "num_layers": len(widths), "widths": widths, "gated": gated},
        "tokenizer": {"name_or_path": "hand-made", "vocab_size": 10},
        "corpus": {"path": "hand-made"}, "labels": list(labels), "documents": 1, "windows": 1,
        "tokens": int(sum(tokens)), "options": {"threshold": 0.0, "top_k": 0, "hist_edges": [0.0], "gate": True},
    }
    signals = new_signals(meta)
    for layer, c in enumerate(counts):
        for name, stats in signals.items():
            source = z_counts[layer] if (name == "z" and z_counts is not None) else c
            stats.tensors[f"active.{layer}"] = torch.tensor(np.asarray(source), dtype=torch.int64)
    return Atlas(meta, signals, torch.as_tensor(list(tokens), dtype=torch.int64))


def triples(found) -> list[tuple[int, int, str | None]]:
    return [(n.layer, n.index, n.label) for n in found.neurons]


fails = cli_fails


# Counts out of 100 tokens per label (de, en, ru); see test_lape_hand_made for the expected sets.
HAND = [
    np.array([[90, 0, 50, 0, 10],
              [0, 90, 50, 0, 0],
              [0, 0, 50, 0, 0]]),
    np.array([[80, 85, 20, 0, 60],
              [80, 0, 20, 0, 60],
              [0, 5, 20, 95, 60]]),
]


# ---- LAPE ---------------------------------------------------------------------------------------


def test_lape_hand_made():
    atlas = hand_atlas(HAND, [100, 100, 100])
    # 30 values sorted: 13 zeros, .05, .1, .2 x3, .5 x3 (ranks 19-21) ...; percentile 0.7 -> k = 21 -> tau = .5.
    # Excluded: (0,2) max .5 <= tau, (0,3) dead, (0,4) max .1, (1,2) max .2.
    # Finite H: (0,0) 0, (0,1) 0, (1,3) 0, (1,1) ~0.21, (1,0) log 2, (1,4) log 3.
    found = find_lape(atlas, top_rate=0.3, percentile=0.7)
    assert found.params["tau"] == 0.5 and found.params["signal"] == "gate"
    assert found.params["excluded"] == 4
    assert triples(found) == [(0, 0, "de"), (0, 1, "en"), (1, 3, "ru")]
    assert [n.score for n in found.neurons] == [0.0, 0.0, 0.0]
    # Ties at the cut are broken by (layer, index): (1, 3) has the same H as (0, 0) and (0, 1).
    assert triples(find_lape(atlas, top_rate=0.2, percentile=0.7)) == [(0, 0, "de"), (0, 1, "en")]
    # A neuron above tau for two labels belongs to both.
    assert triples(find_lape(atlas, top_rate=0.5, percentile=0.7)) == [
        (0, 0, "de"), (0, 1, "en"), (1, 0, "de"), (1, 0, "en"), (1, 1, "de"), (1, 3, "ru")]
    scores = {(n.layer, n.index): n.score for n in find_lape(atlas, top_rate=0.5, percentile=0.7).neurons}
    assert scores[(1, 0)] == pytest.approx(math.log(2))
    q = np.array([85, 5]) / 90
    assert scores[(1, 1)] == pytest.approx(-(q * np.log(q)).sum())
    # Asking for all neurons never returns an excluded one.
    everything = find_lape(atlas, top_rate=1.0, percentile=0.7)
    assert {(n.layer, n.index) for n in everything.neurons} == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 3), (1, 4)}
    assert [n.label for n in everything.neurons if (n.layer, n.index) == (1, 4)] == ["de", "en", "ru"]
    # Without the filter (0, 4) has H = 0 (all of its activity is German) and goes to its argmax label;
    # the dead (0, 3) is still never kept.
    unfiltered = find_lape(atlas, top_rate=0.4, percentile=0.7, filter=False)
    assert triples(unfiltered) == [(0, 0, "de"), (0, 1, "en"), (0, 4, "de"), (1, 3, "ru")]
    assert 3 not in [n.index for n in find_lape(atlas, top_rate=1.0, percentile=0.7, filter=False).neurons if n.layer == 0]


def test_lape_reads_the_signal_asked_for():
    z = [np.zeros_like(c) for c in HAND]
    z[1][2, 0] = 50  # in z only (1, 0) is ever active, and only in Russian
    atlas = hand_atlas(HAND, [100, 100, 100], z_counts=z)
    assert triples(find_lape(atlas, top_rate=0.1, percentile=0.7, signal="z")) == [(1, 0, "ru")]
    assert find_lape(atlas, top_rate=0.1, percentile=0.7).params["signal"] == "gate"
    ungated = hand_atlas(HAND, [100, 100, 100], gated=False)
    assert find_lape(ungated, top_rate=0.1, percentile=0.7).params["signal"] == "z"


def brute_lape(counts, tokens, labels, top_rate, percentile, filter, assign_percentile=None):
    """LAPE by loops over plain Python floats."""
    probs = [np.asarray(c, dtype=np.float64) / np.maximum(np.asarray(tokens, dtype=np.float64), 1)[:, None] for c in counts]
    pooled = sorted(float(x) for p in probs for x in p.ravel())

    def kth(share):  # the k-th smallest pooled value, k = round(n * share)
        return pooled[min(max(int(round(len(pooled) * share)), 1), len(pooled)) - 1]

    tau = kth(percentile)
    bar = tau if assign_percentile is None else kth(assign_percentile)
    total = sum(p.shape[1] for p in probs)
    ranked = []
    for layer, p in enumerate(probs):
        for j in range(p.shape[1]):
            column = [float(x) for x in p[:, j]]
            mass = sum(column)
            if mass == 0 or (filter and max(column) <= tau):
                continue
            entropy = -sum(x / mass * math.log(x / mass) for x in column if x > 0)
            ranked.append((round(entropy, 12), layer, j, entropy))
    ranked.sort()
    expected = {}
    for _, layer, j, entropy in ranked[: max(int(round(total * top_rate)), 1)]:
        column = probs[layer][:, j]
        chosen = [k for k in range(len(labels)) if column[k] > bar]
        if not chosen and not filter:
            chosen = [int(np.argmax(column))]
        for k in chosen:
            expected[(layer, j, labels[k])] = entropy
    return expected, tau


@pytest.mark.parametrize("seed", range(6))
def test_lape_equals_brute_force_on_random_counts(seed):
    rng = np.random.default_rng(seed)
    labels = ["ar", "de", "en", "es", "ru"][: 2 + seed % 4]
    tokens = rng.integers(20, 60, size=len(labels))
    counts = []
    for width in (7, 12, 5):
        c = np.stack([rng.integers(0, t + 1, size=width) for t in tokens])
        c[:, rng.random(width) < 0.2] = 0  # dead neurons
        sparse = rng.random(c.shape) < 0.4
        c[sparse] = 0  # many label-specific patterns, and ties
        counts.append(c)
    atlas = hand_atlas(counts, tokens, labels)
    cases = ((0.1, 0.95, True, None), (0.15, 0.9, True, None), (0.25, 0.8, True, None), (0.3, 0.5, False, None),
             (1.0, 0.9, True, None), (0.3, 0.6, True, 0.9), (0.3, 0.9, True, 0.6), (0.3, 0.6, False, 0.9))
    for top_rate, percentile, filter, assign in cases:
        found = find_lape(atlas, top_rate=top_rate, percentile=percentile, filter=filter, assign_percentile=assign)
        expected, tau = brute_lape(counts, tokens, labels, top_rate, percentile, filter, assign)
        assert found.params["tau"] == tau
        got = {(n.layer, n.index, n.label): n.score for n in found.neurons}
        assert got.keys() == expected.keys(), (top_rate, percentile, filter)
        for key, score in expected.items():
            assert got[key] == pytest.approx(score, abs=1e-12)


def test_lape_bad_input():
    atlas = hand_atlas(HAND, [100, 100, 100])
    for kwargs, words in (({"top_rate": 0.0}, "top rate"), ({"top_rate": 1.5}, "top rate"),
                          ({"percentile": 1.0}, "percentile"), ({"percentile": 0.0}, "percentile"),
                          ({"signal": "h"}, "unknown signal"), ({"assign_percentile": 1.0}, "assign percentile")):
        with pytest.raises(NeuronAtlasError, match=words):
            find_lape(atlas, **kwargs)
    with pytest.raises(NeuronAtlasError, match="no 'gate' signal"):
        find_lape(hand_atlas(HAND, [100, 100, 100], gated=False), signal="gate")
    with pytest.raises(NeuronAtlasError, match="labels"):
        find_lape(hand_atlas([c[:1] for c in HAND], [100], labels=["all"]))


# ---- dead ---------------------------------------------------------------------------------------


def test_dead_on_hand_made_counts():
    atlas = hand_atlas(HAND, [100, 100, 100])
    dead = find_dead(atlas, signal="gate")
    assert [(n.layer, n.index) for n in dead.neurons] == [(0, 3)]
    rare = find_dead(atlas, max_rate=10 / 300, signal="gate")
    assert [(n.layer, n.index, n.score) for n in rare.neurons] == [(0, 3, 0.0), (0, 4, 10 / 300)]
    with pytest.raises(NeuronAtlasError, match="max rate"):
        find_dead(atlas, max_rate=1.0)


@pytest.fixture(scope="module")
def killed_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with gate rows zeroed for a few neurons: silu(0) * up = 0, never active."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[[3, 10]] = 0
        model.model.layers[1].mlp.gate_proj.weight[[0]] = 0
    out = tmp_path_factory.mktemp("killed-llama")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama / name).exists():
            (out / name).write_bytes((tiny_llama / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from conftest import write_corpus

    path = tmp_path_factory.mktemp("small-corpus") / "corpus.jsonl"
    write_corpus(path, documents=15, seed=5, max_words=50)
    return path


@pytest.fixture(scope="module")
def killed_atlas(killed_llama, small_corpus, tmp_path_factory):
    options = ProfileOptions(max_length=MAX_LENGTH, top_k=2, batch_size=8)
    return profile(str(killed_llama), small_corpus, tmp_path_factory.mktemp("killed") / "atlas", label_field="lang",
                   options=options, device="cpu", quiet=True)


def recount(model_dir, corpus_path):
    """Per layer and signal, how many tokens each neuron was active on, by one window at a time."""
    model, tokenizer = load_model(str(model_dir), device="cpu")
    neurons = locate_neurons(model)
    active = {signal: [torch.zeros(w, dtype=torch.long) for w in neurons.widths] for signal in ("z", "gate")}
    tokens = 0
    corpus = read_corpus(corpus_path, label_field="lang")
    for window in iter_windows(corpus, tokenizer, MAX_LENGTH):
        def count(signal):
            return lambda layer, values: active[signal][layer].add_((values.reshape(-1, values.shape[-1]) > 0).sum(0))
        with torch.no_grad(), capture(neurons, count("z"), count("gate")):
            model(input_ids=torch.tensor([window.input_ids]))
        tokens += len(window.input_ids)
    return active, tokens


def test_dead_equals_a_recount_of_the_profiled_activations(killed_llama, killed_atlas, small_corpus):
    active, tokens = recount(killed_llama, small_corpus)
    assert tokens == int(killed_atlas.tokens_per_label.sum())
    for signal in ("z", "gate"):
        dead = find_dead(killed_atlas, signal=signal)
        expected = [(layer, j) for layer, a in enumerate(active[signal]) for j in (a == 0).nonzero().flatten().tolist()]
        assert [(n.layer, n.index) for n in dead.neurons] == expected
        assert {(0, 3), (0, 10), (1, 0)} <= set(expected)
        rates = torch.cat(active[signal]).double() / tokens
        cut = float(rates.median())
        rare = find_dead(killed_atlas, max_rate=cut, signal=signal)
        expected = [(layer, j, float(a[j]) / tokens) for layer, a in enumerate(active[signal])
                    for j in range(len(a)) if float(a[j]) / tokens <= cut]
        assert [(n.layer, n.index, n.score) for n in rare.neurons] == expected


# ---- vocabulary ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_vocab_models(tmp_path_factory):
    """A Llama (untied head) and a GPT-2 (tied, Conv1D) with 67 tokens, a random final norm weight,
    and one planted prediction neuron (w_out = W_U[5]) and one suppression neuron (w_out = -W_U[9])."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=67, hidden_size=64, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=67, n_embd=64, n_inner=41, n_layer=2, n_head=4, n_positions=64)).eval()
    with torch.no_grad():
        llama.model.norm.weight.uniform_(0.5, 2.0)
        gpt2.transformer.ln_f.weight.uniform_(0.5, 2.0)
        unembed = llama.lm_head.weight
        llama.model.layers[1].mlp.down_proj.weight[:, 4] = 3 * unembed[5]
        llama.model.layers[1].mlp.down_proj.weight[:, 6] = -3 * unembed[9]
        unembed = gpt2.lm_head.weight
        gpt2.transformer.h[1].mlp.c_proj.weight[4] = 3 * unembed[5]  # Conv1D: (d_ff, d_model)
        gpt2.transformer.h[1].mlp.c_proj.weight[6] = -3 * unembed[9]
    return {"llama": llama, "gpt2": gpt2}


def value_vectors(model, layer):
    if hasattr(model, "transformer"):
        return model.transformer.h[layer].mlp.c_proj.weight.T, model.transformer.ln_f.weight
    return model.model.layers[layer].mlp.down_proj.weight, model.model.norm.weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vocab_projection_equals_brute_force(odd_vocab_models, family):
    model = odd_vocab_models[family]
    unembed = model.lm_head.weight.detach()
    assert unembed.shape[0] == 67
    for layer, index in ((0, 0), (1, 4), (1, 6), (1, 30)):
        w_out, norm = value_vectors(model, layer)
        for through_norm in (False, True):
            value = w_out[:, index] * (norm if through_norm else 1)
            logits = (unembed @ value).detach()
            got = vocab_projection(model, layer, index, top=10, through_norm=through_norm)
            high, low = logits.topk(10), logits.topk(10, largest=False)
            assert [row["id"] for row in got["promoted"]] == high.indices.tolist()
            assert [row["id"] for row in got["suppressed"]] == low.indices.tolist()
            torch.testing.assert_close(torch.tensor([row["logit"] for row in got["promoted"]]), high.values)
            torch.testing.assert_close(torch.tensor([row["logit"] for row in got["suppressed"]]), low.values)
    assert vocab_projection(model, 1, 4, top=1)["promoted"][0]["id"] == 5
    assert vocab_projection(model, 1, 6, top=1)["suppressed"][0]["id"] == 9
    assert len(vocab_projection(model, 0, 0, top=500)["promoted"]) == 67
    with pytest.raises(NeuronAtlasError, match="out of range"):
        vocab_projection(model, 2, 0)
    with pytest.raises(NeuronAtlasError, match="width"):
        vocab_projection(model, 0, 999)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vocab_statistics_and_find_vocab_equal_brute_force(odd_vocab_models, family):
    from scipy.stats import kurtosis, skew

    model = odd_vocab_models[family]
    unembed = model.lm_head.weight.detach().double()
    stats = vocab_statistics(model, max_elements=67 * 5)  # chunks of 5 neurons
    expected_sets = {"prediction": [], "suppression": []}
    for layer in range(2):
        w_out = value_vectors(model, layer)[0].detach().double()
        for j in range(w_out.shape[1]):
            cosines = [float(torch.dot(w_out[:, j], row) / (w_out[:, j].norm() * row.norm())) for row in unembed]
            k, s = kurtosis(cosines, fisher=False), skew(cosines)
            assert float(stats[layer]["kurtosis"][j]) == pytest.approx(k, rel=1e-4)
            assert float(stats[layer]["skew"][j]) == pytest.approx(s, rel=1e-4, abs=1e-6)
            if k > 10:
                expected_sets["prediction" if s > 0 else "suppression"].append((layer, j))
    assert (1, 4) in expected_sets["prediction"] and (1, 6) in expected_sets["suppression"]
    for kind, expected in expected_sets.items():
        found = find_vocab(model, kind=kind)
        assert [(n.layer, n.index) for n in found.neurons] == expected
        assert found.method == f"vocab-{kind}" and found.model["widths"] == locate_neurons(model).widths


# ---- weight classes -----------------------------------------------------------------------------


def brute_cosines(w_gate, w_in, w_out) -> tuple[float, float, float]:
    """(c_gi, c_go, c_io) after negating w_in and w_out when c_gi < 0."""
    if float(w_gate @ w_in) < 0:
        w_in, w_out = -w_in, -w_out

    def cos(a, b):
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    return cos(w_gate, w_in), cos(w_gate, w_out), cos(w_in, w_out)


def brute_class(w_gate, w_in, w_out, threshold=0.5) -> str:
    c_gi, c_go, c_io = brute_cosines(w_gate, w_in, w_out)

    def rounded(c):
        return (1 if c > 0 else -1) if abs(c) >= threshold else 0

    gi, go, io = rounded(c_gi), rounded(c_go), rounded(c_io)
    if gi != io * go:
        return "atypical"
    return {(1, 1): "enrichment", (1, 0): "conditional_enrichment", (-1, 1): "depletion",
            (-1, 0): "conditional_depletion", (0, 1): "proportional_change", (0, 0): "orthogonal_output"}[(io, abs(go))]


@pytest.fixture(scope="module")
def planted_llama(tiny_llama):
    """The tiny Llama with neurons 0-7 of layer 0 built to be one of each class."""
    model, _ = load_model(str(tiny_llama), device="cpu")
    mlp = model.model.layers[0].mlp
    u, v, w = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(0)))[0].T
    noise = torch.Generator().manual_seed(1)

    def jitter(x):
        return x + 0.05 * torch.randn(32, generator=noise)

    plants = [  # (gate, in, out, expected class)
        (u, u, u, "enrichment"), (v, u, u, "conditional_enrichment"), (u, u, -u, "depletion"),
        (v, u, -u, "conditional_depletion"), (u, v, u, "proportional_change"), (u, v, w, "orthogonal_output"),
        (u, u, w, "atypical"), (u, -u, u, "depletion"),  # the last needs the flip: c_gi < 0
    ]
    with torch.no_grad():
        for j, (gate, up, out, _) in enumerate(plants):
            mlp.gate_proj.weight[j], mlp.up_proj.weight[j], mlp.down_proj.weight[:, j] = jitter(gate), jitter(up), jitter(out)
    return model, [cls for *_, cls in plants]


def test_weight_classes_equal_brute_force(planted_llama):
    model, planted = planted_llama
    result = weight_classes(model)
    neurons = locate_neurons(model)
    for layer in neurons.layers:
        expected = [brute_class(layer.w_gate()[j].detach(), layer.w_in()[j].detach(), layer.w_out()[:, j].detach())
                    for j in range(layer.width)]
        assert result["names"][layer.index] == expected
        cosines = result["cosines"][layer.index]
        for j in range(layer.width):
            flipped = brute_cosines(layer.w_gate()[j].detach(), layer.w_in()[j].detach(), layer.w_out()[:, j].detach())
            got = (cosines["gate_in"][j], cosines["gate_out"][j], cosines["in_out"][j])
            assert [float(c) for c in got] == pytest.approx(flipped, abs=1e-5)
        assert result["counts"][layer.index] == {cls: expected.count(cls) for cls in CLASSES}
    assert result["names"][0][: len(planted)] == planted
    assert float(result["cosines"][0]["gate_out"][7]) < -0.9  # flipped: (u, -u, u) reads as (u, u, -u)
    depletion = find_weight_class(model, "depletion")
    assert {(0, 2), (0, 7)} <= {(n.layer, n.index) for n in depletion.neurons}
    assert all(n.label == "depletion" for n in depletion.neurons)
    assert find_weight_class(model, "Conditional-Enrichment").params["class"] == "conditional_enrichment"
    with pytest.raises(NeuronAtlasError, match="unknown weight class"):
        find_weight_class(model, "enriching")


def test_cosines_round_at_the_threshold_inclusive():
    from neuronatlas.methods.weight_classes import round_cosine

    cosines = torch.tensor([0.5, -0.5, 0.4999, -0.4999, 0.0, 1.0, -0.7])
    assert round_cosine(cosines).tolist() == [1, -1, 0, 0, 0, 1, -1]
    assert round_cosine(cosines, 0.8).tolist() == [0, 0, 0, 0, 0, 1, 0]


def test_weight_classes_refuse_a_model_without_gate(odd_vocab_models):
    with pytest.raises(NeuronAtlasError, match="gated"):
        weight_classes(odd_vocab_models["gpt2"])


# ---- CLI ----------------------------------------------------------------------------------------


def check_set_file(path, method):
    data = json.loads(path.read_text())
    assert data["method"] == method and data["count"] == len(data["neurons"])
    assert set(data["model"]) >= {"name_or_path", "fingerprint", "widths"}
    for neuron in data["neurons"]:
        assert set(neuron) == {"layer", "index", "score", "label"}
        assert 0 <= neuron["layer"] < len(data["model"]["widths"])
        assert 0 <= neuron["index"] < data["model"]["widths"][neuron["layer"]]
    return load_neuron_set(path)


def test_cli_find_end_to_end(killed_llama, killed_atlas, tmp_path, capsys):
    atlas_dir = tmp_path / "atlas"
    killed_atlas.save(atlas_dir)
    assert main(["find", "lape", "--atlas", str(atlas_dir), "--out", str(tmp_path / "lape.json"), "--top-rate", "0.1", "--no-null"]) == 0
    out = capsys.readouterr().out
    assert "per label" in out and "per layer" in out
    lape = check_set_file(tmp_path / "lape.json", "lape")
    assert len(lape.per_layer()) and lape.params["top_rate"] == 0.1 and lape.params["signal"] == "gate"
    assert sum(len(v) for v in lape.per_layer().values()) == round(0.1 * sum(killed_atlas.widths))
    assert lape.model["fingerprint"] == killed_atlas.meta["model"]["fingerprint"]
    assert main(["find", "lape", "--atlas", str(atlas_dir), "--out", str(tmp_path / "z.json"), "--signal", "z", "--no-null",
                 "--percentile", "0.9", "--no-filter"]) == 0
    assert load_neuron_set(tmp_path / "z.json").params["filter"] is False
    assert main(["find", "dead", "--atlas", str(atlas_dir), "--out", str(tmp_path / "dead.json")]) == 0
    dead = check_set_file(tmp_path / "dead.json", "dead")
    assert {(0, 3), (0, 10), (1, 0)} <= {(n.layer, n.index) for n in dead.neurons}
    assert main(["find", "dead", "--atlas", str(atlas_dir), "--out", str(tmp_path / "rare.json"), "--max-rate", "0.3"]) == 0
    assert len(load_neuron_set(tmp_path / "rare.json")) >= len(dead)
    assert main(["find", "vocab", "--model", str(killed_llama), "--atlas", str(atlas_dir), "--out",
                 str(tmp_path / "vocab.json"), "--kind", "suppression", "--kurtosis", "3"]) == 0
    vocab = check_set_file(tmp_path / "vocab.json", "vocab-suppression")
    assert vocab.model["fingerprint"] == killed_atlas.meta["model"]["fingerprint"]
    capsys.readouterr()
    assert main(["find", "weights", "--model", str(killed_llama), "--class", "orthogonal-output",
                 "--out", str(tmp_path / "weights.json")]) == 0
    table = capsys.readouterr().out
    assert "atypical" in table and table.count("\n") >= 4
    weights = check_set_file(tmp_path / "weights.json", "weights")
    assert len(weights) == sum(c["orthogonal_output"] for c in weights.params["counts"])
    assert main(["vocab", "--model", str(killed_llama), "--layer", "1", "--index", "2", "--top", "5", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["promoted"]) == 5 and all(isinstance(row["token"], str) for row in shown["promoted"])
    assert main(["vocab", "--model", str(killed_llama), "--layer", "1", "--index", "2", "--top", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_cli_bad_inputs(tiny_gpt2, tmp_path, capsys):
    labelled = tmp_path / "labelled"
    hand_atlas(HAND, [100, 100, 100], gated=False).save(labelled)
    unlabelled = tmp_path / "unlabelled"
    hand_atlas([c[:1] for c in HAND], [100], labels=["all"]).save(unlabelled)
    out = str(tmp_path / "set.json")
    lape = ["find", "lape", "--atlas", str(labelled), "--out", out]
    fails(capsys, ["find", "lape", "--atlas", str(unlabelled), "--out", out], "labels", "'all'")
    fails(capsys, lape + ["--top-rate", "0"], "top rate", "0.0")
    fails(capsys, lape + ["--top-rate", "1.5"], "top rate", "1.5")
    fails(capsys, lape + ["--percentile", "1"], "percentile")
    fails(capsys, lape + ["--assign-percentile", "0"], "assign percentile")
    fails(capsys, lape + ["--signal", "pre"], "unknown signal", "'pre'")
    fails(capsys, lape + ["--signal", "gate"], "no 'gate' signal")
    fails(capsys, ["find", "lape", "--atlas", str(tmp_path / "nowhere"), "--out", out], "not an atlas")
    (tmp_path / "file.txt").write_text("hi")
    fails(capsys, ["find", "dead", "--atlas", str(tmp_path / "file.txt"), "--out", out], "not an atlas")
    fails(capsys, ["find", "dead", "--atlas", str(labelled), "--out", out, "--max-rate", "2"], "max rate")
    fails(capsys, ["find", "lape", "--atlas", str(labelled), "--out", str(tmp_path)], "is a folder")
    fails(capsys, ["find", "weights", "--model", str(tiny_gpt2), "--class", "depletion", "--out", out], "gated", "gpt2")
    fails(capsys, ["find", "weights", "--model", str(tiny_gpt2), "--out", out], "--class")
    fails(capsys, ["find", "vocab", "--model", str(tiny_gpt2), "--out", out, "--kind", "boost"], "unknown kind")
    fails(capsys, ["find", "vocab", "--model", str(tiny_gpt2), "--atlas", str(labelled), "--out", out], "another model")
    fails(capsys, ["vocab", "--model", str(tiny_gpt2), "--layer", "5", "--index", "0"], "layer 5")
    assert not (tmp_path / "set.json").exists()
    assert main(["find"]) == 2


# ---- the bundled model --------------------------------------------------------------------------


def test_lape_on_the_bundled_tiny_llama(tmp_path):
    from neuronatlas.bundled import CORPUS_HELDOUT, model_path

    model_dir = model_path("tiny-llama")
    if not (model_dir / "config.json").exists():
        pytest.skip("the bundled tiny-llama is not there yet")
    rows = [json.loads(line) for line in CORPUS_HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    per_lang = {}
    for row in rows:
        per_lang.setdefault(row["lang"], []).append(row)
    subset = tmp_path / "subset.jsonl"
    chosen = [row for lang in sorted(per_lang) for row in per_lang[lang][:60]]
    subset.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chosen), encoding="utf-8")
    options = ProfileOptions(max_length=128, top_k=0, batch_size=16)
    atlas = profile(str(model_dir), subset, tmp_path / "atlas", label_field="lang", options=options, device="cpu", quiet=True)
    found = find_lape(atlas)
    total = sum(atlas.widths)
    assert found.params["kept"] == round(0.01 * total)
    assert set(found.labels) == set(per_lang), {label: len(found.for_label(label)) for label in per_lang}
