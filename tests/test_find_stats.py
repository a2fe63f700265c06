"""Sparse probing, universal neurons and confidence-regulation neurons.

Each method is checked against a brute-force or library recomputation, on a case planted by
construction, and on the bundled models (skipped while they are missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_fails, make_tokenizer, write_corpus

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.cli import main
from neuronatlas.corpus import iter_batches, iter_windows, read_corpus
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.loading import load_model
from neuronatlas.methods.confidence import (
    effective_unembedding, entropy_statistics, find_entropy, find_frequency, mean_ablation_effects, null_space,
    unigram_direction,
)
from neuronatlas.methods.probe import (
    ProbeData, collect_samples, find_probe, from_atlas, rank_neurons, sparse_probe,
)
from neuronatlas.methods.universal import PairCorrelation, find_universal, universality
from neuronatlas.models import locate_neurons
from neuronatlas.neuronset import load_neuron_set
from neuronatlas.profile import ProfileOptions, profile

MODELS = bundled.ROOT / "models"
TINY_GPT2 = Path(os.environ.get("NEURONATLAS_TEST_TINY_GPT2", str(MODELS / "tiny-gpt2")))
SEED1 = Path(os.environ.get("NEURONATLAS_TEST_TINY_GPT2_SEED1", str(MODELS / "tiny-gpt2-seed1")))
needs_gpt2 = pytest.mark.skipif(not (TINY_GPT2 / "config.json").exists(), reason=f"no bundled model at {TINY_GPT2}")
needs_seeds = pytest.mark.skipif(not (SEED1 / "config.json").exists(), reason=f"no second seed at {SEED1}")
DOCS_PER_LABEL = 40


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """The bundled tiny-gpt2 profiled on the first 40 training documents per language (all sampled)."""
    root = tmp_path_factory.mktemp("stats")
    train = bundled.first_per_label(bundled.CORPUS_TRAIN, root / "train.jsonl", DOCS_PER_LABEL)
    profile(str(TINY_GPT2), train, root / "atlas", label_field="lang", device="cpu", quiet=True, overwrite=True,
            options=ProfileOptions(max_length=128, top_k=0, batch_size=16, doc_sample=DOCS_PER_LABEL))
    model, tokenizer = load_model(str(TINY_GPT2), device="cpu", quiet=True)
    return {"root": root, "train": train, "atlas": load_atlas(root / "atlas"), "model": model, "tokenizer": tokenizer}


# ---- probe: ranking and probes --------------------------------------------------------------------


def test_rankings_match_their_definitions():
    from sklearn.feature_selection import f_classif

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = np.arange(200) % 3 == 0
    x[y, 7] += 1.5  # the planted feature
    x[y, 2] += 0.6
    scores, order = rank_neurons(x, y, "mean_diff")
    np.testing.assert_allclose(scores, np.abs(x[y].mean(0, dtype=np.float64) - x[~y].mean(0, dtype=np.float64)), rtol=1e-9)
    assert order[:2].tolist() == [7, 2]
    scores, order = rank_neurons(x, y, "f_stat")
    np.testing.assert_allclose(scores, f_classif(x, y)[0], rtol=1e-6)
    assert order[0] == 7
    scores, order = rank_neurons(x, y, "l1", l1_c=0.05)
    assert order[0] == 7 and (scores == 0).sum() >= 6  # L1 keeps few neurons; the rest follow by mean difference


def test_probe_finds_the_planted_neuron_and_keeps_documents_on_one_side():
    rng = np.random.default_rng(1)
    docs = 60
    labels = [("a", "b", "c")[d % 3] for d in range(docs) for _ in range(3)]  # 3 token rows per document
    groups = np.repeat(np.arange(docs), 3)
    x = rng.normal(size=(len(labels), 9)).astype(np.float32)
    x[np.asarray(labels) == "b", 4] += 4.0
    data = ProbeData(labels, groups, [x, rng.normal(size=x.shape).astype(np.float32)], "synthetic")
    found = sparse_probe(data, {"widths": [9, 9]}, ["b"], ks=[1, 2, 4, 16], top_k=1)
    report = found.params["report"]["b"]
    assert report["best_layer"] == 0 and [(n.layer, n.index, n.label) for n in found.neurons] == [(0, 4, "b")]
    curve = report["layers"][0]["curve"]
    assert [p["k"] for p in curve] == [1, 2, 4]  # k beyond the width is skipped
    assert curve[0]["f1"] > 0.95 and curve[0]["auroc"] > 0.99
    assert report["layers"][1]["curve"][0]["auroc"] < 0.8  # noise layer
    assert report["train"] + report["test"] == len(labels) and report["test"] % 3 == 0  # whole documents
    against = sparse_probe(data, {"widths": [9, 9]}, ["b"], against="a", ks=[1])
    assert against.params["report"]["b"]["positives"] + against.params["report"]["b"]["negatives"] == 2 * 60


def test_probe_bad_input():
    data = ProbeData(["a", "b"] * 3, np.arange(6), [np.zeros((6, 3), np.float32)], "synthetic")
    with pytest.raises(NeuronAtlasError, match="at least 4"):
        sparse_probe(data, {}, ["a"], ks=[1])
    with pytest.raises(NeuronAtlasError, match="unknown label 'x'"):
        sparse_probe(data, {}, ["x"])
    with pytest.raises(NeuronAtlasError, match="ranking"):
        sparse_probe(data, {}, ["a"], ranking="mi")
    with pytest.raises(NeuronAtlasError, match="test size"):
        sparse_probe(data, {}, ["a"], test_size=1.0)


def test_collected_documents_match_the_atlas_sample(tiny_llama, corpus_path, tmp_path):
    """collect_samples pools z per document exactly as the profiler's document sample does."""
    atlas = profile(str(tiny_llama), corpus_path, tmp_path / "atlas", label_field="lang", device="cpu", quiet=True,
                    options=ProfileOptions(max_length=24, top_k=0, batch_size=4, doc_sample=5,
                                           doc_pools=["mean", "max"], doc_format="float16"))
    model, tokenizer = load_model(str(tiny_llama), device="cpu", quiet=True)
    corpus = read_corpus(corpus_path, label_field="lang")
    for pool in ("mean", "max"):
        collected = collect_samples(model, tokenizer, corpus, pool=pool, max_per_label=5, max_length=24, batch_size=3)
        stored = from_atlas(atlas, pool)
        assert collected.labels == stored.labels and collected.groups.tolist() == stored.groups.tolist()
        for mine, theirs in zip(collected.layers, stored.layers):
            np.testing.assert_allclose(mine, theirs, rtol=2e-3, atol=2e-3)  # the atlas stores float16
    tokens = collect_samples(model, tokenizer, corpus, unit="token", max_per_label=7, tokens_per_window=2, max_length=24)
    assert {label: tokens.labels.count(label) for label in set(tokens.labels)} == {"de": 7, "en": 7, "ru": 7}


@needs_gpt2
def test_single_neuron_probe_identifies_languages(gpt2_run):
    """A k = 1 probe tells a script-distinct language (ru, ar) from the rest with F1 >= 0.9 in some layer."""
    found = find_probe(gpt2_run["atlas"], ks=[1, 2, 4], top_k=2)
    report = found.params["report"]
    best_f1 = {label: max(layer["curve"][0]["f1"] for layer in info["layers"]) for label, info in report.items()}
    print("\nk=1 probe, best F1 over layers:", {label: round(f1, 3) for label, f1 in best_f1.items()})
    assert set(best_f1) == {"ar", "de", "en", "es", "ru"}
    assert best_f1["ru"] >= 0.9 and best_f1["ar"] >= 0.9
    assert len(found.for_label("ru")) == 2 and {n.layer for n in found.for_label("ru").neurons} == {report["ru"]["best_layer"]}
    shuffled = from_atlas(gpt2_run["atlas"])
    shuffled.labels = list(np.random.default_rng(0).permutation(shuffled.labels))
    control = sparse_probe(shuffled, {}, ["ru"], ks=[1])  # labels no longer follow the text: near chance
    assert max(layer["curve"][0]["f1"] for layer in control.params["report"]["ru"]["layers"]) < 0.6


# ---- universal ------------------------------------------------------------------------------------


def test_streamed_correlations_match_numpy():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 7)) + rng.normal(size=7) * 5
    b = np.concatenate([a[:, :3] * 2 + rng.normal(size=(300, 3)) * 0.3, rng.normal(size=(300, 4))], 1)
    b[:, 5] = 1.0  # a constant neuron has no correlation
    stats = PairCorrelation([4, 3], [2, 5])
    for start in range(0, 300, 64):
        stats.update(torch.from_numpy(a[start : start + 64]), torch.from_numpy(b[start : start + 64]))
    with np.errstate(invalid="ignore"):
        expected = np.corrcoef(a.T, b.T)[:7, 7:]
    corr = stats.correlation().numpy()
    assert np.isnan(corr[:, 5]).all()
    keep = [0, 1, 2, 3, 4, 6]
    np.testing.assert_allclose(corr[:, keep], expected[:, keep], atol=1e-10)
    # the rotated baseline equals correlating with explicitly rotated activations
    generator = torch.Generator().manual_seed(3)
    rotated = stats.rotated_correlation("b", generator).numpy()
    generator = torch.Generator().manual_seed(3)
    from neuronatlas.methods.universal import _haar

    r1, r2 = _haar(2, generator).numpy(), _haar(5, generator).numpy()
    b_rotated = np.concatenate([b[:, :2] @ r1, b[:, 2:] @ r2], 1)
    np.testing.assert_allclose(rotated, np.corrcoef(a.T, b_rotated.T)[:7, 7:], atol=1e-9)
    result = universality(stats, threshold=0.5)
    assert result["a"]["match"][:3].tolist() == [0, 1, 2]


def planted_pair(directory):
    """Two tiny GPT-2s sharing embeddings and attention, with different FFNs but for one neuron.

    Model B's layer-0 neuron 17 copies model A's neuron 5 (same input weights, same input), so the
    pair correlates perfectly; every other FFN weight of B is drawn afresh.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer(directory)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    model_a = GPT2LMHeadModel(config).eval()
    model_b = GPT2LMHeadModel(config).eval()
    model_b.load_state_dict(model_a.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model_b.transformer.h:
            for weight in block.mlp.parameters():
                weight.normal_(0, 0.2)
        mlp_a, mlp_b = model_a.transformer.h[0].mlp, model_b.transformer.h[0].mlp
        mlp_b.c_fc.weight[:, 17] = mlp_a.c_fc.weight[:, 5]  # Conv1D: (in, out) columns are neurons
        mlp_b.c_fc.bias[17] = mlp_a.c_fc.bias[5]
        for model in (model_a, model_b):
            for block in model.transformer.h:
                block.mlp.c_fc.weight.mul_(10)  # inputs of a few units: GELU far from linear
    return model_a, model_b, tokenizer


def test_universal_recovers_a_planted_pair(tmp_path):
    model_a, model_b, tokenizer = planted_pair(tmp_path)
    write_corpus(tmp_path / "corpus.jsonl", documents=60)
    found = find_universal(model_a, model_b, tokenizer, read_corpus(tmp_path / "corpus.jsonl"), max_tokens=3000,
                           max_length=24)
    assert [(n.layer, n.index) for n in found.neurons] == [(0, 5)]
    detail = found.params["details"]["0:5"]
    assert detail["match"] == "0:17" and detail["correlation"] > 0.999 and detail["baseline"] < 0.5
    assert found.params["share"]["b"]["count"] <= 1 and found.params["tokens"] == 3000
    assert set(found.params["statistics"]) >= {"w_out_norm", "vocab_kurtosis", "activation_frequency"}


@needs_gpt2
@needs_seeds
def test_few_neurons_are_universal_across_seeds():
    """Two seeds of tiny-gpt2: a small share of universal neurons; print how they differ."""
    model_a, tokenizer = load_model(str(TINY_GPT2), device="cpu", quiet=True)
    model_b, _ = load_model(str(SEED1), device="cpu", quiet=True)
    corpus = read_corpus(bundled.CORPUS_HELDOUT, label_field="lang")
    found = find_universal(model_a, model_b, tokenizer, corpus, max_tokens=4000)
    share = found.params["share"]
    print(f"\nuniversal share A {share['a']['all']:.4f} B {share['b']['all']:.4f}; per layer {share['a']['per_layer']}")
    print(json.dumps(found.params["statistics"], indent=1))
    assert share["a"]["all"] < 0.2 and share["b"]["all"] < 0.2  # the paper: 1-5% in GPT-2 and Pythia
    for side in ("a", "b"):  # yet the seeds' neurons align better than after a rotation
        assert found.params["mean_best"][side] > found.params["mean_baseline"][side]
    # as in the paper, the sparser a neuron fires the more universal it is
    assert found.params["statistics"]["activation_frequency"]["spearman_excess"] < -0.2


# ---- confidence: entropy and frequency ------------------------------------------------------------


def frozen_norm_loss(model, tokenizer, corpus, layer, index, value, max_docs):
    """Mean NLL with neuron (layer, index) set to ``value`` while the final norm keeps its clean scale (one batch)."""
    from neuronatlas.intervene import Intervention, intervene

    site = locate_neurons(model)
    windows = [w for w in iter_windows(list(corpus)[:max_docs], tokenizer, 24) if len(w.input_ids) >= 2]
    batch = next(iter_batches(windows, len(windows), 0))
    norm, scales = site.final_norm, {}

    def scale_of(x):
        centred = x - x.mean(-1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else x
        return (centred.pow(2).mean(-1, keepdim=True) + (getattr(norm, "eps", None) or norm.variance_epsilon)).sqrt()

    def frozen(module, args, output):
        x = args[0]
        centred = x - x.mean(-1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else x
        out = centred / scales["clean"] * norm.weight
        return out + norm.bias if getattr(norm, "bias", None) is not None else out

    losses = []
    with torch.no_grad():
        hook = norm.register_forward_pre_hook(lambda module, args: scales.__setitem__("clean", scale_of(args[0])))
        clean = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        hook.remove()
        hook = norm.register_forward_hook(frozen)
        with intervene(model, [Intervention({layer: torch.tensor([index])}, "constant", value=value)]):
            ablated = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        hook.remove()
    real = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()
    for logits in (clean, ablated):
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][real].double(), batch.input_ids[:, 1:][real])
        losses.append(float(nll))
    return losses[1] - losses[0], len(windows)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_direct_effect_is_the_ablation_with_the_norm_scale_frozen(family, tiny_gpt2, tiny_llama, corpus_path):
    """For a last-layer neuron the direct effect equals a real ablated run whose final norm keeps its clean scale."""
    model, tokenizer = load_model(str(tiny_gpt2 if family == "gpt2" else tiny_llama), device="cpu", quiet=True)
    corpus = read_corpus(corpus_path)
    last = locate_neurons(model).num_layers - 1
    result = mean_ablation_effects(model, tokenizer, corpus, [(last, 3)], max_docs=6, max_length=24, batch_size=64)
    info = result["neurons"][f"{last}:3"]
    expected, _ = frozen_norm_loss(model, tokenizer, corpus, last, 3, info["mean_activation"], 6)
    assert info["loss_direct"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert info["loss_total"] != pytest.approx(info["loss_direct"], rel=1e-3)  # the norm's scale does move


def test_planted_entropy_neuron(tiny_gpt2, corpus_path):
    """A large w_out in the unembedding's null space: found first, and it acts on entropy through the norm."""
    model, tokenizer = load_model(str(tiny_gpt2), device="cpu", quiet=True)
    site = locate_neurons(model)
    last = site.num_layers - 1
    null = null_space(effective_unembedding(model), 1)[:, 0].float()  # (d,)
    with torch.no_grad():
        w_out = site.layers[last].w_out()  # (d, D) view of c_proj's (D, d) weight
        w_out[:, 7] = null * 30 * w_out.norm(dim=0).median()
    found = find_entropy(model, top_k=3)
    assert (found.neurons[0].layer, found.neurons[0].index) == (last, 7) and found.neurons[0].score > 0.99
    stats = entropy_statistics(model)[last]
    assert float(stats["logit_var"][7]) < float(stats["logit_var"].median())
    info = mean_ablation_effects(model, tokenizer, read_corpus(corpus_path), [(last, 7)], max_docs=8, max_length=24)
    info = info["neurons"][f"{last}:7"]
    assert info["entropy_abs_total"] > 5 * info["entropy_abs_direct"] and info["entropy_direct_share"] < 0.2


def test_frequency_direction_and_planted_neuron(tiny_gpt2, corpus_path):
    model, tokenizer = load_model(str(tiny_gpt2), device="cpu", quiet=True)
    corpus = read_corpus(corpus_path)
    vocab = model.get_output_embeddings().weight.shape[0]
    direction = unigram_direction(tokenizer, corpus, vocab)
    counts = np.zeros(vocab)
    for doc in corpus:
        np.add.at(counts, tokenizer(doc.text, add_special_tokens=False)["input_ids"], 1)
    expected = np.log((counts + 1) / (counts + 1).sum())
    np.testing.assert_allclose(direction.numpy(), expected - expected.mean(), atol=1e-10)
    site = locate_neurons(model)
    unembed = effective_unembedding(model)
    # plant: w_out whose logits are the (centred) log-unigram vector, via least squares in d-space
    target = torch.linalg.lstsq(unembed.weight, direction[:, None]).solution[:, 0].float()
    with torch.no_grad():
        site.layers[1].w_out()[:, 11] = target * 5
    found = find_frequency(model, direction, layers=[0, 1], top_k=2)
    assert (found.neurons[0].layer, found.neurons[0].index) == (1, 11) and found.neurons[0].score > 0.5
    check = mean_ablation_effects(model, tokenizer, corpus, [(1, 11)], direction, max_docs=8, max_length=24)
    info = check["neurons"]["1:11"]
    assert info["projection_slope"] > 0  # more activation: output closer to the unigram distribution
    assert abs(info["loss_frequency_frozen"]) < abs(info["loss_total"])


@needs_gpt2
def test_confidence_checks_on_the_bundled_model(gpt2_run):
    """Entropy and frequency neurons of tiny-gpt2 with their mean-ablation checks (numbers printed)."""
    model, tokenizer = gpt2_run["model"], gpt2_run["tokenizer"]
    corpus = read_corpus(bundled.CORPUS_HELDOUT, label_field="lang")
    entropy = find_entropy(model, top_k=2)
    direction = unigram_direction(tokenizer, read_corpus(gpt2_run["train"]), model.get_output_embeddings().weight.shape[0])
    frequency = find_frequency(model, direction, top_k=2)
    neurons = [(n.layer, n.index) for n in entropy.neurons + frequency.neurons]
    check = mean_ablation_effects(model, tokenizer, corpus, neurons, direction, max_docs=10)
    print("\n" + json.dumps({"entropy": [(n.index, round(n.score, 3)) for n in entropy.neurons],
                             "frequency": [(n.index, round(n.score, 3)) for n in frequency.neurons],
                             "check": check}, indent=1))
    for key, info in check["neurons"].items():
        assert all(np.isfinite(v) for v in info.values() if v is not None), key
    # the frequency neurons move the output along the unigram direction the way their cosine says
    for neuron in frequency.neurons:
        assert np.sign(check["neurons"][f"{neuron.layer}:{neuron.index}"]["projection_slope"]) == np.sign(neuron.score)


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_probe_writes_set_report_and_plot(tiny_llama, corpus_path, tmp_path, capsys):
    out, report, plot = tmp_path / "probe.json", tmp_path / "report.json", tmp_path / "curves.png"
    argv = ["find", "probe", "--model", str(tiny_llama), "--corpus", str(corpus_path), "--label-field", "lang",
            "--max-length", "24", "--ks", "1,2", "--top-k", "2", "--out", str(out), "--report", str(report),
            "--plot", str(plot), "--no-null"]
    assert main(argv) == 0
    found = load_neuron_set(out)
    assert found.method == "probe" and found.labels == ["de", "en", "ru"] and len(found) == 6
    assert set(json.loads(report.read_text())["labels"]) == {"de", "en", "ru"}
    assert plot.stat().st_size > 1000
    assert "neuron set written" in capsys.readouterr().out


def test_cli_entropy_frequency_universal(tiny_gpt2, corpus_path, tmp_path, capsys):
    base = ["--model", str(tiny_gpt2), "--corpus", str(corpus_path), "--max-length", "24", "--check-docs", "4",
            "--top-k", "2"]
    assert main(["find", "entropy", *base, "--out", str(tmp_path / "entropy.json")]) == 0
    entropy = load_neuron_set(tmp_path / "entropy.json")
    assert len(entropy) == 2 and "entropy_direct_share" in next(iter(entropy.params["details"].values()))
    assert main(["find", "frequency", *base, "--layers", "0,1", "--out", str(tmp_path / "frequency.json")]) == 0
    assert "projection_slope" in next(iter(load_neuron_set(tmp_path / "frequency.json").params["details"].values()))
    assert main(["find", "universal", "--model", str(tiny_gpt2), "--other", str(tiny_gpt2), "--corpus",
                 str(corpus_path), "--max-length", "24", "--max-tokens", "500", "--out", str(tmp_path / "u.json"),
                 "--report", str(tmp_path / "u-report.json"), "--no-null"]) == 0
    same = load_neuron_set(tmp_path / "u.json")
    assert all(same.params["details"][f"{n.layer}:{n.index}"]["match"] == f"{n.layer}:{n.index}" for n in same.neurons)
    capsys.readouterr()


def test_cli_bad_input(tiny_gpt2, corpus_path, tmp_path, capsys):
    model = str(tiny_gpt2)
    cli_fails(capsys, ["find", "probe", "--model", model, "--corpus", str(corpus_path), "--out", str(tmp_path / "p.json")],
              "--label-field")
    cli_fails(capsys, ["find", "probe", "--out", str(tmp_path / "p.json")], "either --atlas")
    cli_fails(capsys, ["find", "probe", "--model", model, "--corpus", str(corpus_path), "--label-field", "lang",
                       "--ks", "1,two", "--out", str(tmp_path / "p.json")], "--ks '1,two'")
    cli_fails(capsys, ["find", "entropy", "--model", model, "--layers", "9", "--out", str(tmp_path / "e.json")],
              "layer 9 is out of range")
    cli_fails(capsys, ["find", "entropy", "--model", model, "--norm-quantile", "1.5", "--out", str(tmp_path / "e.json")],
              "norm quantile")
    cli_fails(capsys, ["find", "frequency", "--model", model, "--corpus", str(tmp_path / "missing.jsonl"),
                       "--out", str(tmp_path / "f.json")], "corpus file not found")
    cli_fails(capsys, ["find", "universal", "--model", model, "--other", model, "--corpus", str(corpus_path),
                       "--threshold", "0", "--out", str(tmp_path / "u.json")], "threshold")
    cli_fails(capsys, ["find", "entropy", "--model", model, "--out", str(tmp_path)], "is a folder")
