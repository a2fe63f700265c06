"""Gradient methods: attribution, integrated gradients (knowledge neurons), attribution patching, CETT.

First the mechanics on tiny random models (gradients against finite differences, IG completeness,
GradDrop on the last layer, CETT by hand), the CLI and bad input; then the issue's checks on the
bundled tiny-llama (skipped until it exists): knowledge neurons are fact-specific, AtP ranks like
real patching, attribution sets hurt their own language most, CETT neurons separate a language
pair and scaling them to 0 hurts that language's text.
"""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import cli_fails
from neuronatlas import bundled
from neuronatlas.cli import main
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.evaluate import evaluate, format_matrix
from neuronatlas.loading import load_model
from neuronatlas.methods.atp import EncodedPair, atp_pair, find_atp, pair_metric, patch_effects
from neuronatlas.methods.attribution import find_attribution
from neuronatlas.methods.cett import cett, cett_features, find_cett
from neuronatlas.methods.gradients import track_neurons
from neuronatlas.methods.ig import find_knowledge_neurons, integrated_gradients, knowledge_check
from neuronatlas.models import locate_neurons
from neuronatlas.neuronset import Neuron, NeuronSet, load_neuron_set


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return load_model(str(tiny_gpt2), device="cpu", quiet=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


TINY_FACTS = [
    {"fact": "cat", "prompt": "the cat sat on", "answer": "the"},
    {"fact": "cat", "prompt": "a dog ran and the cat sat on", "answer": "the"},
    {"fact": "house", "prompt": "the dog ran to the", "answer": "house"},
    {"fact": "house", "prompt": "birds sang and the dog ran to the", "answer": "house"},
]
TINY_PAIRS = [
    {"clean": "the cat sat on a", "corrupt": "the dog sat on a", "target": "mat", "foil": "house"},
    {"clean": "der hund lief zum", "corrupt": "die katze lief zum", "target": "haus", "foil": "matte"},
]


# ---- mechanics on tiny random models ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_site_gradients_match_finite_differences(family, llama, gpt2):
    """track_neurons leaves the logits unchanged and its gradient is the total derivative wrt z."""
    model, tokenizer = llama if family == "llama" else gpt2
    model = copy.deepcopy(model).double()  # float64: finite differences need the precision
    neurons = locate_neurons(model)
    ids = torch.tensor([tokenizer("the cat sat on a mat")["input_ids"]])
    pair = EncodedPair(ids[0].tolist(), ids[0].tolist(), target=5, foil=None)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    with torch.enable_grad(), track_neurons(neurons) as record:
        logits = model(input_ids=ids).logits
        grads = record.gradients(pair_metric(logits, pair).sum())
    assert torch.equal(logits.detach(), plain)
    layer, position, index, eps = 0, 2, 7, 1e-3  # layer 0: the change also flows through layer 1

    def shifted(sign):
        def hook(module, args):
            z = args[0].clone()
            z.view(1, ids.shape[1], -1)[0, position, index] += sign * eps
            return (z,)

        handle = neurons.layers[layer].down.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return float(pair_metric(model(input_ids=ids).logits, pair))
        finally:
            handle.remove()

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = float(grads[layer].reshape(1, ids.shape[1], -1)[0, position, index])
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_integrated_gradients_complete(llama):
    """IG sums (nearly) to P(answer) at the real activations minus P at the zero baseline of that position."""
    model, tokenizer = llama
    prompt, answer = tokenizer("the cat sat on")["input_ids"], tokenizer("the", add_special_tokens=False)["input_ids"]
    neurons = locate_neurons(model)
    ig = integrated_gradients(model, prompt, answer, layer=1, steps=64)

    def probability(scale):
        def hook(module, args):
            z = args[0].clone()
            z[:, len(prompt) - 1] *= scale
            return (z,)

        handle = neurons.layers[1].down.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer[:-1]])).logits
            return float(logits[0, -1].softmax(-1)[answer[0]])
        finally:
            handle.remove()

    difference = probability(1.0) - probability(0.0)
    assert float(ig.sum()) == pytest.approx(difference, rel=0.05, abs=1e-5)


def test_graddrop_equals_atp_on_the_last_layer(llama):
    """Only the last block's own GradDrop pass touches its neurons: sum_l |c_l| / (L-1) = |c| there."""
    model, tokenizer = llama
    ids = tokenizer("the cat sat on a")["input_ids"], tokenizer("the dog sat on a")["input_ids"]
    pair = EncodedPair(ids[0], ids[1], tokenizer("mat", add_special_tokens=False)["input_ids"][0], None)
    estimate, dropped = atp_pair(model, pair, graddrop=True)
    widths = locate_neurons(model).widths
    last = slice(sum(widths[:-1]), None)
    assert torch.allclose(dropped[last], estimate[last].abs(), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(dropped[: widths[0]], estimate[: widths[0]].abs(), rtol=1e-3)


def test_patch_effects_match_one_at_a_time(llama):
    """Batched per-row patching equals patching each neuron alone."""
    model, tokenizer = llama
    ids = tokenizer("the cat sat on a")["input_ids"], tokenizer("the dog sat on a")["input_ids"]
    pair = EncodedPair(ids[0], ids[1], tokenizer("mat", add_special_tokens=False)["input_ids"][0], None)
    chosen = [(0, 3), (1, 5), (0, 30), (1, 36)]
    batched = patch_effects(model, pair, chosen)
    alone = torch.cat([patch_effects(model, pair, [item]) for item in chosen])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert batched.abs().max() > 0


def test_cett_by_hand(gpt2):
    """CETT of a GPT-2 (Conv1D W_out): |z_j| ||W_out[:, j]|| / ||W_out z||, mean over the text's tokens."""
    model, tokenizer = gpt2
    layer = locate_neurons(model).layers[1]
    z = torch.randn(3, 41)
    w_out = layer.w_out().detach()
    expected = z[1, 4].abs() * w_out[:, 4].norm() / (w_out @ z[1]).norm()
    assert cett(z, w_out)[1, 4] == pytest.approx(float(expected), rel=1e-5)
    record = {"text": "the cat sat on a mat", "label": "x"}
    features = cett_features(model, tokenizer, [record])
    assert features.shape == (1, sum(locate_neurons(model).widths))
    assert (features >= 0).all() and features.max() > 0


def test_every_method_runs_on_gpt2(gpt2, tmp_path, corpus_path):
    model, tokenizer = gpt2
    found = find_atp(model, tokenizer, TINY_PAIRS, top_k=5, verify=2)
    assert len(found) == 5 and len(found.params["verify"]["neurons"]) == 4
    ig = find_knowledge_neurons(model, tokenizer, TINY_FACTS, steps=4, layers=[1])
    assert set(ig.labels) <= {"cat", "house"}
    attribution = find_attribution(model, tokenizer, corpus_path, label_field="lang", max_length=16,
                                   max_docs_per_label=3, top_rate=0.05)
    assert attribution.labels == ["de", "en", "ru"]


def test_next_token_methods_refuse_an_encoder(gpt2, corpus_path):
    """attribution, ig, atp and the confidence neurons' check read next-token probabilities: a masked LM's
    outputs are not those (and a sentence-transformers checkpoint's MLM head is not even trained)."""
    from test_models import tiny

    from neuronatlas.methods.confidence import mean_ablation_effects

    bert, _ = tiny("bert")
    _, tokenizer = gpt2
    for verb, call in (("find attribution", lambda: find_attribution(bert, tokenizer, corpus_path, label_field="lang")),
                       ("find ig", lambda: find_knowledge_neurons(bert, tokenizer, TINY_FACTS, steps=2)),
                       ("find atp", lambda: find_atp(bert, tokenizer, TINY_PAIRS, top_k=2)),
                       ("the mean-ablation check", lambda: mean_ablation_effects(bert, tokenizer, corpus_path, [(0, 0)]))):
        with pytest.raises(NeuronAtlasError, match=f"{verb} needs .* bert is an encoder"):
            call()


# ---- CLI and bad input --------------------------------------------------------------------------------


def test_cli_writes_each_method(tiny_llama, tmp_path, corpus_path, capsys):
    model = str(tiny_llama)
    facts = write_jsonl(tmp_path / "facts.jsonl", TINY_FACTS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", TINY_PAIRS)
    rows = [json.loads(line) for line in corpus_path.read_text(encoding="utf-8").splitlines()]
    data = write_jsonl(tmp_path / "data.jsonl", [r for r in rows if r["lang"] in ("en", "de")])
    runs = {
        "attribution": ["--corpus", str(corpus_path), "--label-field", "lang", "--max-length", "16",
                        "--max-docs-per-label", "3", "--top-rate", "0.05"],
        "ig": ["--facts", str(facts), "--steps", "4", "--layers", "1", "--check"],
        "atp": ["--pairs", str(pairs), "--top-k", "7", "--verify", "3", "--graddrop"],
        "cett": ["--data", str(data), "--label-field", "lang", "--positive", "de", "--C", "1.0"],
    }
    for method, extra in runs.items():
        out = tmp_path / f"{method}.json"
        no_null = ["--no-null"] if method in ("attribution", "cett") else []
        assert main(["find", method, "--model", model, "--out", str(out), "--quiet", *extra, *no_null]) == 0, method
        found = load_neuron_set(out)
        assert found.method == method and found.model["widths"] == locate_neurons(load_model(model, device="cpu")[0]).widths
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "held-out accuracy" in printed and "neuron set written" in printed
    assert load_neuron_set(tmp_path / "atp.json").params["graddrop"] is True


def test_bad_input(tiny_llama, llama, tmp_path, corpus_path, capsys):
    model = str(tiny_llama)
    out = str(tmp_path / "set.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cli_fails(capsys, ["find", "atp", "--model", model, "--pairs", str(empty), "--out", out], "holds no pair records")
    uneven = write_jsonl(tmp_path / "uneven.jsonl", [{"clean": "the cat sat", "corrupt": "the cat", "target": "on"}])
    cli_fails(capsys, ["find", "atp", "--model", model, "--pairs", str(uneven), "--out", out], "same token length")
    no_foil = write_jsonl(tmp_path / "nofoil.jsonl", [{"clean": "the cat", "corrupt": "the dog", "target": "sat"}])
    cli_fails(capsys, ["find", "atp", "--model", model, "--pairs", str(no_foil), "--out", out, "--metric", "logit_diff"],
              "has no 'foil'")
    lonely = write_jsonl(tmp_path / "lonely.jsonl", TINY_FACTS[:3])
    cli_fails(capsys, ["find", "ig", "--model", model, "--facts", str(lonely), "--out", out], "'house' (1)", "paraphrases")
    cli_fails(capsys, ["find", "ig", "--model", model, "--facts", str(lonely), "--out", out, "--min-paraphrases", "1",
                       "--layers", "9"], "out of range")
    common = ["find", "attribution", "--model", model, "--corpus", str(corpus_path), "--label-field", "lang", "--out", out]
    cli_fails(capsys, [*common, "--labels", "fr"], "unknown label(s) 'fr'", "de, en, ru")
    foreign = NeuronSet("lape", {"name_or_path": "other", "fingerprint": "0" * 16, "widths": [37, 37]}, [Neuron(0, 1)])
    foreign.save(tmp_path / "foreign.json")
    cli_fails(capsys, [*common, "--exclude", str(tmp_path / "foreign.json")], "made for another model")
    cli_fails(capsys, [*common, "--top-rate", "0"], "top rate")
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "the cat", "lang": "en"}] * 3 + [{"text": "der hund", "lang": "de"}] * 3)
    cli_fails(capsys, ["find", "cett", "--model", model, "--data", str(data), "--label-field", "lang",
                       "--positive", "fr", "--out", out], "unknown positive label 'fr'")
    cli_fails(capsys, ["find", "cett", "--model", model, "--data", str(data), "--positive", "en", "--out", out],
              "no label field 'label'")
    cli_fails(capsys, ["find", "cett", "--model", model, "--data", str(data), "--label-field", "lang", "--positive", "en",
                       "--out", str(tmp_path)], "is a folder")
    with pytest.raises(NeuronAtlasError, match="no facts"):
        find_knowledge_neurons(*llama, [])
    with pytest.raises(NeuronAtlasError, match="no examples"):
        find_cett(*llama, [], "de")


# ---- the checks on the bundled tiny-llama -----------------------------------------------------

TINY_LLAMA = Path(os.environ.get("NEURONATLAS_TEST_TINY_LLAMA", str(bundled.ROOT / "models" / "tiny-llama")))
needs_bundled = pytest.mark.skipif(not (TINY_LLAMA / "config.json").exists(),
                                   reason=f"the bundled tiny-llama is not there yet ({TINY_LLAMA})")


def first_per_label(path, count: int, labels=None) -> list[dict]:
    taken, rows = defaultdict(int), []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if (labels is None or row["lang"] in labels) and taken[row["lang"]] < count:
            taken[row["lang"]] += 1
            rows.append(row)
    return rows


def corpus_facts(model, tokenizer, documents=150, context=12, min_probability=0.6, per_fact=3, facts=8) -> list[dict]:
    """Facts the model knows: a (previous token, token) -> next token it predicts with P >= 0.6 in at
    least ``per_fact`` different contexts of English handbook text; each context is a paraphrase."""
    found = defaultdict(list)
    with torch.inference_mode():
        for row in first_per_label(bundled.CORPUS_TRAIN, documents, {"en"}):
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:127]
            full = tokenizer(row["text"])["input_ids"][: len(ids) + 1]
            offset = len(full) - len(ids)  # the bos token
            probabilities = model(input_ids=torch.tensor([full])).logits[0].softmax(-1)
            for t in range(context, len(ids) - 1):
                answer = ids[t + 1]
                if float(probabilities[t + offset, answer]) < min_probability:
                    continue
                prompt, text = tokenizer.decode(ids[t - context + 1 : t + 1]), tokenizer.decode([answer])
                if tokenizer(text, add_special_tokens=False)["input_ids"] != [answer]:
                    continue  # the answer must come back as the same single token
                key = tokenizer.decode(ids[t - 1 : t + 2])
                if all(record["prompt"] != prompt for record in found[key]):
                    found[key].append({"fact": key, "prompt": prompt, "answer": text, "last": ids[t]})
    best = sorted((key for key in found if len(found[key]) >= per_fact), key=lambda key: (-len(found[key]), key))
    return [record for key in best[:facts] for record in found[key][:per_fact]]


def minimal_pairs(tokenizer, facts: list[dict]) -> list[dict]:
    """Clean = a fact's prompt; corrupted = the same prompt ending in the next fact's last token."""
    by_fact = defaultdict(list)
    for record in facts:
        by_fact[record["fact"]].append(record)
    names, pairs = sorted(by_fact), []
    for number, name in enumerate(names):
        other = by_fact[names[(number + 1) % len(names)]][0]
        for record in by_fact[name][:2]:
            ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            corrupt = tokenizer.decode(ids[:-1] + [other["last"]])
            if len(tokenizer(corrupt)["input_ids"]) == len(tokenizer(record["prompt"])["input_ids"]):
                pairs.append({"clean": record["prompt"], "corrupt": corrupt, "target": record["answer"],
                              "foil": other["answer"]})
    return pairs


@pytest.fixture(scope="module")
def bundled_llama():
    return load_model(str(TINY_LLAMA), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def facts(bundled_llama):
    return corpus_facts(*bundled_llama)


@needs_bundled
def test_knowledge_neurons_are_fact_specific(bundled_llama, facts):
    model, tokenizer = bundled_llama
    assert len({record["fact"] for record in facts}) >= 5
    last = locate_neurons(model).num_layers - 1
    found = find_knowledge_neurons(model, tokenizer, facts, layers=[last])
    check = knowledge_check(model, tokenizer, facts, found)
    print(f"\nIG facts {len(found.labels)}, neurons {len(found)}: own drop {check['own']:.3f}, "
          f"others {check['others']:.3f}, ratio {check['ratio']}")
    assert len(found.labels) >= 5
    assert check["own"] > 0.1
    assert check["own"] > 3 * max(check["others"], 0.01)
    beaten = sum(row["own"] > 2 * max(row["others"], 0.005) for row in check["per_fact"].values())
    assert beaten >= 0.75 * len(check["per_fact"])


@needs_bundled
def test_atp_ranks_like_real_patching(bundled_llama, facts):
    model, tokenizer = bundled_llama
    pairs = minimal_pairs(tokenizer, facts)
    assert len(pairs) >= 8
    found = find_atp(model, tokenizer, pairs, top_k=50, verify=15)
    check = found.params["verify"]
    print(f"\nAtP over {len(pairs)} pairs: Spearman {check['spearman']:.3f} on {len(check['neurons'])} neurons")
    assert check["spearman"] >= 0.6
    top = max(range(len(check["estimate"])), key=lambda i: abs(check["estimate"][i]))
    assert check["actual"][top] * check["estimate"][top] > 0  # the strongest estimate has the right sign


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("grad-heldout") / "heldout.jsonl"
    return write_jsonl(path, first_per_label(bundled.CORPUS_HELDOUT, 8))


@needs_bundled
def test_attribution_sets_hurt_their_own_language(bundled_llama, heldout, tmp_path):
    model, tokenizer = bundled_llama
    train = write_jsonl(tmp_path / "train.jsonl", first_per_label(bundled.CORPUS_TRAIN, 20))
    found = find_attribution(model, tokenizer, train, label_field="lang", max_length=64, top_rate=0.01)
    result = evaluate(model, tokenizer, found, heldout, label_field="lang", controls=0, max_length=64)
    print("\n" + format_matrix(result))
    assert found.labels == ["ar", "de", "en", "es", "ru"]
    assert sum(result["specific"].values()) >= 4
    assert result["ratio"] is not None and result["ratio"] > 2


@needs_bundled
def test_cett_separates_a_language_pair_and_scaling_hurts_it(bundled_llama, heldout):
    model, tokenizer = bundled_llama
    records = first_per_label(bundled.CORPUS_TRAIN, 40, {"de", "en"})
    found = find_cett(model, tokenizer, records, "de", label_field="lang", max_length=64)
    params = found.params
    print(f"\nCETT de vs en: {len(found)} neurons, held-out accuracy {params['test_accuracy']:.3f} "
          f"(chance {params['chance']:.3f}), AUROC {params['test_auroc']:.3f}, C {params['C']}")
    assert len(found) >= 1 and all(neuron.score > 0 for neuron in found.neurons)
    assert params["test_accuracy"] >= params["chance"] + 0.2
    result = evaluate(model, tokenizer, found, heldout, label_field="lang", controls=5, op="scale", value=0.0,
                      max_length=64)
    print(format_matrix(result))
    row = result["delta"]["de"]
    assert row["de"] > 0 and row["de"] > 2 * max(row["en"], 0.0)
    assert row["de"] > result["control"]["de"]["high"]
