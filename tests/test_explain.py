"""Explain, simulate, score and clusters on the bundled tiny-llama (explainer, simulator and subject)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli_fails, window_close
from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.cli import main
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.explain import ExplainOptions, LocalModel, correlation, load_subject, score
from neuronatlas.explain.clusters import cluster_exemplars
from neuronatlas.explain.exemplars import (
    Exemplar, TokenStrings, contexts_of, discretise, exemplar_rows, random_spans, top_exemplars,
)
from neuronatlas.explain.explain import clean_explanation, explain
from neuronatlas.explain.neuron import explain_neuron, material_of, split_exemplars
from neuronatlas.explain.run import atlas_corpus
from neuronatlas.neuronset import Neuron, NeuronSet, model_info

TINY_LLAMA = bundled.model_path("tiny-llama")
DOCS_PER_LANGUAGE = 4
TOP_KEYS = {"format", "version", "model", "explainer", "simulator", "neurons"}
NEURON_KEYS = {"layer", "index", "explanation", "score", "score_top", "score_random", "clusters", "scores", "candidates",
               "threshold", "baseline_from", "contexts"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The bundled tiny-llama profiled on a few training documents per language, a set of its most
    active neurons, the subject model and the local explainer."""
    from neuronatlas.profile import ProfileOptions, profile

    root = tmp_path_factory.mktemp("explain")
    rows, per_label = [], {}
    for line in bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if per_label.get(row["lang"], 0) < DOCS_PER_LANGUAGE:
            per_label[row["lang"]] = per_label.get(row["lang"], 0) + 1
            rows.append(row)
    corpus = root / "train.jsonl"
    corpus.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    atlas = profile(str(TINY_LLAMA), corpus, root / "atlas", label_field="lang", device="cpu", quiet=True,
                    options=ProfileOptions(max_length=48, top_k=12, batch_size=16, doc_sample=0, positions=False))
    atlas = load_atlas(root / "atlas")
    neurons = []
    for layer in range(atlas.num_layers):  # the two neurons with the largest top activation per layer
        best = atlas.stat("top_values", layer)[:, 0].topk(2).indices.tolist()
        neurons += [Neuron(layer, index, 1.0, None) for index in best]
    NeuronSet("hand", model_info(atlas.meta), neurons).save(root / "set.json")
    subject = load_subject(atlas)
    return {"root": root, "atlas": atlas, "dir": root / "atlas", "corpus": corpus, "set": root / "set.json",
            "neurons": [(n.layer, n.index) for n in neurons], "subject": subject,
            "explainer": LocalModel(str(TINY_LLAMA), max_new_tokens=16)}


def exemplars_of(run, layer, index, stored=True):
    rows = exemplar_rows(run["dir"], [(layer, index)])[(layer, index)]
    strings = TokenStrings(run["atlas"].vocab, run["subject"].tokenizer)
    return rows, top_exemplars(rows, layer, index, contexts_of(run["atlas"]), strings, 16, run["subject"], stored)


def randoms_of(run, count=4):
    spans = random_spans(run["subject"], atlas_corpus(run["atlas"]), run["atlas"].meta["options"]["max_length"],
                         run["atlas"].meta["windows"], count, run["neurons"], 16, seed=0)
    strings = TokenStrings(run["atlas"].vocab, run["subject"].tokenizer)
    return {n: [span.exemplar(*n, strings) for span in spans] for n in run["neurons"]}


# ---- exemplars -------------------------------------------------------------------------------------


def test_exemplar_activations_match_the_atlas(run):
    """Per-token activations recomputed with the model equal the atlas's exemplar values (and its
    recorded windows, when the atlas has them); spans never overlap."""
    layer, index = run["neurons"][3]
    rows, computed = exemplars_of(run, layer, index, stored=False)
    _, read = exemplars_of(run, layer, index, stored=True)
    by_position = {(row["seq"], row["pos"]): row["activation"] for row in rows}
    checked = 0
    for exemplar in computed:
        for offset, value in enumerate(exemplar.activations):
            if (exemplar.seq, exemplar.start + offset) in by_position:
                assert value == pytest.approx(by_position[(exemplar.seq, exemplar.start + offset)], rel=1e-4, abs=1e-4)
                checked += 1
        assert len(exemplar.tokens) == len(exemplar.token_ids) == len(exemplar.activations) <= 33
    assert checked >= len(computed)  # at least each kept exemplar's own token
    assert computed[0].activations.max() == pytest.approx(rows[0]["activation"], rel=1e-4)
    for a, b in zip(read, computed):
        assert (a.seq, a.start) == (b.seq, b.start)
        assert window_close(a.activations, b.activations)  # windows are stored in 6-bit codes
    spans = sorted((e.seq, e.start, e.start + len(e.tokens)) for e in computed)
    assert all(s1 != s2 or end1 <= start2 for (s1, _, end1), (s2, start2, _) in zip(spans, spans[1:]))


def test_random_exemplars_are_real_model_activations(run):
    """Each random span holds the z of every neuron of the set, as a plain forward over its window gives."""
    from neuronatlas.corpus import iter_windows

    spans = random_spans(run["subject"], atlas_corpus(run["atlas"]), run["atlas"].meta["options"]["max_length"],
                         run["atlas"].meta["windows"], 3, run["neurons"], 16, seed=1)
    assert len({span.seq for span in spans}) == 3
    windows = {w.seq: w for w in iter_windows(atlas_corpus(run["atlas"]), run["subject"].tokenizer,
                                              run["atlas"].meta["options"]["max_length"])}
    model = run["subject"].model
    for span in spans:
        ids = list(windows[span.seq].input_ids)
        assert ids[span.start:span.start + len(span.token_ids)] == span.token_ids
        captured = {}
        hooks = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(layer, args[0][0])) for layer in range(len(model.model.layers))]
        try:
            with torch.inference_mode():
                model(torch.tensor([ids]))
        finally:
            for hook in hooks:
                hook.remove()
        for layer, index in run["neurons"]:
            expected = captured[layer][span.start:span.start + len(span.token_ids), index].numpy()
            np.testing.assert_allclose(span.activations[(layer, index)], expected, rtol=1e-4, atol=1e-5)


def test_discretise_as_in_the_paper():
    assert discretise(np.array([-1.0, 0.0, 0.26, 1.0, 2.0]), 2.0) == [0, 0, 1, 5, 10]
    assert discretise(np.array([0.5, 1.0]), 0.0) == [0, 0]


def test_split_keeps_holdout_apart_and_spread():
    fake = [Exemplar([i], [str(i)], np.ones(1, np.float32), i, 0, "top") for i in range(12)]
    shown, held = split_exemplars(fake, top=4, holdout=4)
    assert [e.seq for e in held] == [0, 4, 7, 11]
    assert [e.seq for e in shown] == [1, 2, 3, 5]
    shown, held = split_exemplars(fake[:1], top=4, holdout=4)
    assert len(shown) == 1 and held == []


# ---- local explainer and simulator ------------------------------------------------------------------


def test_local_explainer_writes_a_phrase(run):
    _, exemplars = exemplars_of(run, *run["neurons"][0])
    scale = max(float(e.activations.max()) for e in exemplars)
    reply = run["explainer"].explain([(e.tokens, discretise(e.activations, scale)) for e in exemplars])
    assert clean_explanation(reply)
    assert "\n" not in clean_explanation(reply)


def test_local_simulator_one_prediction_per_token_causally_consistent(run):
    """Each token gets an expected level in [0, 9] (the tiny tokenizer writes "10" as two tokens); a
    long excerpt is split into chunks that fit the 256-position context, and a slot's prediction only
    depends on the lines before it."""
    explainer = run["explainer"]
    _, exemplars = exemplars_of(run, *run["neurons"][2])
    tokens = exemplars[0].tokens
    values = explainer.simulate("Debian packages", tokens)
    assert values.shape == (len(tokens),)
    assert values.min() >= 0 and values.max() <= 9
    assert np.ptp(values) > 0  # the model's distribution over digits changes from token to token
    np.testing.assert_allclose(explainer.simulate("Debian packages", tokens[:5]), values[:5], rtol=1e-5, atol=1e-5)
    long = tokens * 4  # more lines than the context holds: several forward passes
    assert len(explainer._chunks([0] * 40, [[1, 2, 3]] * len(long))) > 1
    assert explainer.simulate("Debian packages", long).shape == (len(long),)


def test_explainer_context_too_small_is_a_clear_error(run):
    explainer = LocalModel(str(TINY_LLAMA), max_new_tokens=250)
    with pytest.raises(NeuronAtlasError, match="context of 256 tokens"):
        explainer.explain([(["a"] * 30, [5] * 30)])


# ---- scoring ---------------------------------------------------------------------------------------


def test_score_equals_a_recomputed_correlation(run):
    layer, index = run["neurons"][1]
    _, tops = exemplars_of(run, layer, index)
    randoms = randoms_of(run)[(layer, index)]
    options = ExplainOptions(top=6, holdout=3, random=4, scorers=("simulation",))
    record = explain_neuron(layer, index, material_of(tops, randoms, options), run["explainer"], run["explainer"], options)
    assert record["explanation"]
    _, held = split_exemplars(tops, 6, 3)
    sim_top = np.concatenate([run["explainer"].simulate(record["explanation"], e.tokens) for e in held])
    sim_random = np.concatenate([run["explainer"].simulate(record["explanation"], e.tokens) for e in randoms])
    real_top = np.concatenate([e.activations for e in held])
    real_random = np.concatenate([e.activations for e in randoms])
    # The run simulates excerpts in padded batches, here one by one: equal up to float rounding.
    assert record["score_top"] == pytest.approx(np.corrcoef(sim_top, real_top)[0, 1], abs=1e-5)
    assert record["score_random"] == pytest.approx(np.corrcoef(sim_random, real_random)[0, 1], abs=1e-5)
    both = np.corrcoef(np.concatenate([sim_top, sim_random]), np.concatenate([real_top, real_random]))[0, 1]
    assert record["score"] == pytest.approx(both, abs=1e-5)
    print(f"\nneuron {layer}/{index}: {record['explanation']!r} score {record['score']:+.3f} "
          f"top {record['score_top']:+.3f} random {record['score_random']:+.3f}")


def test_constant_simulation_scores_null():
    real = np.array([0.0, 1.0, 3.0, 0.5])
    assert correlation(np.full(4, 5.0), real) is None
    assert correlation(real, np.zeros(4)) is None
    assert score([(np.full(4, 2.0), real)], []).all is None
    assert correlation(real * 2 + 1, real) == pytest.approx(1.0)


class TableSimulator:
    """Simulates by looking up given activations per excerpt: a test double of the backend interface."""

    name = "table"

    def __init__(self, table: dict[tuple[str, ...], np.ndarray]):
        self.table = table

    def explain(self, excerpts):
        return "a fixed phrase"

    def simulate(self, explanation, tokens):
        return self.table[tuple(tokens)]


def test_explainer_and_simulator_read_byte_tokens_as_whole_characters():
    """A byte-level BPE writes an Arabic letter as two tokens, each alone <0xD8>: the explainer's
    excerpt and the simulator's tokens are whole characters, each with the max of its tokens' values."""
    text = "سلام ok"
    data = text.encode()
    pieces = [data[i:i + 1] for i in range(8)] + [data[8:]]  # every Arabic byte a token of its own
    values = np.arange(len(pieces), dtype=np.float32)
    exemplar = Exemplar(list(range(len(pieces))), ["<0x%02X>" % b[0] if b[0] > 0x7F else b.decode() for b in pieces],
                        values, seq=0, start=0, kind="top", pieces=pieces)
    texts, shown = exemplar.readable()
    assert texts == ["س", "ل", "ا", "م", " ok"] and shown.tolist() == [1, 3, 5, 7, 8]

    class Recorder:
        name = "recorder"
        excerpts: list = []

        def explain(self, excerpts):
            self.excerpts.extend(excerpts)
            return "Arabic letters"

    recorder = Recorder()
    assert explain(recorder, [exemplar], scale=8.0) == "Arabic letters"
    assert recorder.excerpts == [(texts, [1, 4, 6, 9, 10])]
    cut = Exemplar(exemplar.token_ids[1:-2], [], values[1:-2], seq=0, start=1, kind="top", pieces=pieces[1:-2])
    assert cut.readable()[0] == ["ل", "ا"] and cut.readable()[1].tolist() == [3, 5]  # the edges' lone bytes left out
    plain = Exemplar([1, 2], ["a", "b"], np.array([0.0, 2.0], np.float32), seq=0, start=0, kind="top")
    assert plain.readable()[0] == ["a", "b"]  # no bytes known: the tokens as they are


def test_perfect_simulator_scores_one_shuffled_scores_zero(run):
    options = ExplainOptions(top=5, holdout=4, random=4, scorers=("simulation",))
    randoms = randoms_of(run, 4)
    perfect, shuffled = [], []
    rng = np.random.default_rng(0)
    for layer, index in run["neurons"]:
        _, tops = exemplars_of(run, layer, index)
        readable = [e.readable() for e in tops + randoms[(layer, index)]]  # what the simulator reads
        truth = {tuple(texts): values for texts, values in readable}
        pooled = rng.permutation(np.concatenate([values for _, values in readable]))
        cuts = np.cumsum([len(values) for _, values in readable])[:-1]
        mixed = {tuple(texts): part for (texts, _), part in zip(readable, np.split(pooled, cuts))}
        material = material_of(tops, randoms[(layer, index)], options)
        perfect.append(explain_neuron(layer, index, material, TableSimulator(truth), TableSimulator(truth), options))
        shuffled.append(explain_neuron(layer, index, material, TableSimulator(mixed), TableSimulator(mixed), options))
    assert all(r["score"] == pytest.approx(1.0) and r["score_top"] == pytest.approx(1.0) for r in perfect)
    assert abs(np.mean([r["score"] for r in shuffled])) < 0.1
    assert max(abs(r["score"]) for r in shuffled) < 0.35


# ---- detection and fuzzing on the neuron's samples ---------------------------------------------------


def test_local_judge_log_odds_batched_as_alone_and_its_answers_are_their_sign(run):
    """The tiny model is no judge (its log-odds carry no meaning), so only the mechanics are checked:
    left-padded batches of prompts of different lengths give each prompt's log-odds as run alone,
    the log-odds differ between texts, and the yes/no answer is their sign."""
    judge = run["explainer"]
    texts = ["the package", "a much longer text about the configuration of a system", "x", "apt-get install the package"]
    batched = judge.judge_log_odds("packages", texts, "detection")
    alone = np.array([judge.judge_log_odds("packages", [t], "detection")[0] for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    assert np.ptp(batched) > 0
    assert judge.judge("packages", texts, "detection") == (batched > 0).tolist()


def test_scoring_contexts_are_the_neurons_samples(run):
    """With the default --scoring-contexts samples, a neuron is scored on its quantile-band samples
    (active: peak above --active x its top activation) and non-activating samples (peak at most that)
    drawn by neuronatlas.samples, those that repeat a shown exemplar's peak left out; the detection
    and fuzzing scores count exactly these."""
    from neuronatlas.explain.contexts import PEAK_RADIUS, draw_samples
    from neuronatlas.explain.neuron import material_from_samples

    options = ExplainOptions(top=4, bands=5, per_band=2, non_activating=6, sample_docs=32, scorers=("detection", "fuzzing"))
    neurons = run["neurons"][:2]
    scales = {n: float(exemplars_of(run, *n)[0][0]["activation"]) for n in neurons}  # each neuron's top activation
    thresholds = {n: options.active * scales[n] for n in neurons}
    drawn = draw_samples(run["subject"], atlas_corpus(run["atlas"]), thresholds, options)
    strings = TokenStrings(run["atlas"].vocab, run["subject"].tokenizer)
    for layer, index in neurons:
        samples, threshold = drawn[(layer, index)], thresholds[(layer, index)]
        _, tops = exemplars_of(run, layer, index)
        material = material_from_samples(tops, samples, strings, options, threshold)
        band_ids = [[i for i, v in zip(c["token_ids"], c["activations"]) if v is not None]
                    for band in samples.bands.values() for c in band]
        quiet_ids = [[i for i, v in zip(c["token_ids"], c["activations"]) if v is not None] for c in samples.non_activating]
        assert material.held and material.randoms
        assert all(e.token_ids in band_ids and e.activations.max() > threshold for e in material.held)
        assert all(e.token_ids in quiet_ids for e in material.randoms)
        assert samples.non_activating_max <= threshold  # silent contexts, not merely the weakest
        assert all(e.activations.max() <= threshold for e in material.randoms)
        assert len(material.held) + len(material.randoms) + material.dropped == len(band_ids) + len(quiet_ids)
        for shown in material.shown:  # no scoring context repeats a shown exemplar's peak
            peak = int(np.argmax(shown.activations))
            part = shown.token_ids[max(peak - PEAK_RADIUS, 0):peak + PEAK_RADIUS + 1]
            for e in material.held + material.randoms:
                assert all(e.token_ids[i:i + len(part)] != part for i in range(len(e.token_ids)))
        record = explain_neuron(layer, index, material, run["explainer"], run["explainer"], options)
        print(f"\n{layer}/{index}: {record['contexts']}")
        assert record["contexts"]["source"] == "samples"
        for name in ("detection", "fuzzing"):
            result = record["scores"][name]
            assert (result["n_activating"], result["n_non_activating"]) == (len(material.held), len(material.randoms))
            assert result["judged_by"] == "log-odds" and 0 <= result["auc"] <= 1


# ---- clusters --------------------------------------------------------------------------------------


def test_clusters_separate_exemplars_by_their_words():
    first = [Exemplar([1, 2, 3, i], list("abcd"), np.ones(4, np.float32), i, 0, "top") for i in range(10, 14)]
    second = [Exemplar([5, 6, 7, i], list("efgh"), np.ones(4, np.float32), i, 0, "top") for i in range(20, 25)]
    groups = cluster_exemplars(first + second, k=2)
    assert sorted(map(sorted, groups.members)) == [list(range(4)), list(range(4, 9))]
    held = [Exemplar([5, 6, 99], list("efg"), np.ones(3, np.float32), 0, 0, "top")]
    assert groups.assign(held)[0] == groups.kmeans.labels_[4]
    assert cluster_exemplars(first[:1], k=3) is None


# ---- the command line ------------------------------------------------------------------------------


def test_cli_end_to_end_writes_the_contract(run, capsys, tmp_path):
    out = tmp_path / "expl.json"
    argv = ["explain", "--atlas", str(run["dir"]), "--neurons", str(run["set"]), "--explainer", str(TINY_LLAMA),
            "--out", str(out), "--max-neurons", "2", "--top", "6", "--holdout", "3", "--random", "3",
            "--clusters", "2", "--max-new-tokens", "12", "--quiet"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result) == TOP_KEYS
    assert result["format"] == "neuronatlas.explanations" and result["version"] == 1
    assert result["model"] == {k: run["atlas"].meta["model"][k] for k in ("name_or_path", "fingerprint")}
    assert result["explainer"] == result["simulator"] == str(TINY_LLAMA)
    assert [(n["layer"], n["index"]) for n in result["neurons"]] == run["neurons"][:2]
    for record in result["neurons"]:
        assert set(record) == NEURON_KEYS
        assert record["explanation"] and isinstance(record["layer"], int)
        assert all(v is None or -1 <= v <= 1 for v in (record["score"], record["score_top"], record["score_random"]))
        assert 1 <= len(record["clusters"]) <= 2
        assert 2 <= sum(c["size"] for c in record["clusters"]) <= 6  # the shown exemplars, each in one cluster
        assert all(set(c) == {"explanation", "size", "score"} and c["explanation"] for c in record["clusters"])
        contexts = record["contexts"]  # scored on the neuron's samples by default: active and inactive ones
        assert contexts["source"] == "samples" and contexts["n_activating"] >= 1 and contexts["n_non_activating"] >= 1
        for name in ("detection", "fuzzing"):
            values = record["scores"][name]
            assert values["judged_by"] == "log-odds" and 0 <= values["auc"] <= 1 and 0 <= values["baseline_auc"] <= 1
            assert (values["n_activating"], values["n_non_activating"]) == (contexts["n_activating"], contexts["n_non_activating"])
    assert not (tmp_path / "expl.json.partial.jsonl").exists()


def test_cli_bad_inputs(run, capsys, tmp_path):
    base = ["--neurons", str(run["set"]), "--explainer", str(TINY_LLAMA), "--out", str(tmp_path / "x.json")]
    cli_fails(capsys, ["explain", "--atlas", str(tmp_path), *base], "is not an atlas")
    other = NeuronSet("hand", {"name_or_path": "other", "fingerprint": "0" * 16, "widths": run["atlas"].widths},
                      [Neuron(0, 1)])
    other.save(tmp_path / "other.json")
    cli_fails(capsys, ["explain", "--atlas", str(run["dir"]), "--neurons", str(tmp_path / "other.json"),
                       "--explainer", str(TINY_LLAMA), "--out", str(tmp_path / "x.json")], "another model")
    cli_fails(capsys, ["explain", "--atlas", str(run["dir"]), *base, "--top", "0"], "--top")
    cli_fails(capsys, ["explain", "--atlas", str(run["dir"]), *base, "--max-neurons", "0"], "--max-neurons")
    NeuronSet("hand", model_info(run["atlas"].meta), []).save(tmp_path / "empty.json")
    cli_fails(capsys, ["explain", "--atlas", str(run["dir"]), "--neurons", str(tmp_path / "empty.json"),
                       "--explainer", str(TINY_LLAMA), "--out", str(tmp_path / "x.json")], "holds no neurons")
    cli_fails(capsys, ["explain", "--atlas", str(run["dir"]), "--neurons", str(run["set"]),
                       "--explainer", str(tmp_path / "missing-model"), "--out", str(tmp_path / "x.json")], "model path not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "other.json"]  # no output, partial file or folder


def save_bert(directory):
    """A tiny random BERT with its masked-LM head: it loads as a language model but attends both ways."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37)).save_pretrained(directory)


def save_distilbert(directory):
    """A tiny random DistilBERT: transformers has no causal LM class for its family."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                           hidden_dim=37)).save_pretrained(directory)


@pytest.mark.parametrize("save", [save_bert, save_distilbert])
def test_explainer_that_is_not_a_causal_lm_is_a_clear_error(run, capsys, tmp_path, save):
    encoder = tmp_path / "encoder"
    save(encoder)
    capsys.readouterr()  # the saving's progress bar
    out = tmp_path / "expl.json"
    cli_fails(capsys, ["explain", "--atlas", str(run["dir"]), "--neurons", str(run["set"]), "--explainer", str(encoder),
                       "--out", str(out), "--random", "0", "--quiet"],
              f"{encoder} is not a causal language model", "endpoint URL")
    assert [p.name for p in tmp_path.iterdir()] == ["encoder"]  # no output, partial file or folder


# ---- a real chat model (SmolLM2-135M-Instruct) as explainer and scorer --------------------------------


@pytest.mark.real
def test_smollm2_explains_and_scores_a_constructed_neuron():
    """A "neuron" that fires on the word cat, read by a real instruction-tuned model: one explanation
    of two sampled, detection, fuzzing and simulation on ten contexts. A 135M model is a weak
    scorer: the scores only have to be well-formed (balanced accuracy in [0, 1])."""
    from neuronatlas.real_models import real_model_path

    path = real_model_path("smollm2-135m")
    if path is None:
        pytest.skip("SmolLM2-135M is not fetched (make real-models)")
    model = LocalModel(str(path), max_new_tokens=10, batch_size=8, quiet=True)
    assert model.tokenizer.chat_template  # judged as a chat turn

    def exemplar(text, word, kind, seq):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        strings = TokenStrings(None, model.tokenizer)
        tokens = strings(ids)
        values = np.array([5.0 if word and word in token else 0.0 for token in tokens], np.float32)
        return Exemplar(ids, tokens, values, seq, 0, kind, strings.pieces(ids))

    cats = ["The cat sat on the mat.", "My cat likes fish.", "A black cat crossed the road.", "Feed the cat now.",
            "The cat is asleep."]
    others = ["Прочитайте эту книгу сегодня.", "The train leaves at noon.", "Rain fell all day.", "He paid the bill."]
    tops = [exemplar(text, "cat", "top", i) for i, text in enumerate(cats)]
    randoms = [exemplar(text, None, "random", 10 + i) for i, text in enumerate(others)]
    options = ExplainOptions(top=2, holdout=3, samples=2, temperature=0.8)
    options.check()
    record = explain_neuron(0, 0, material_of(tops, randoms, options), model, model, options)
    assert len(record["candidates"]) == 2 and record["explanation"]
    assert record["explanation"] in [c["explanation"] for c in record["candidates"]]
    for name in ("detection", "fuzzing"):
        result = record["scores"][name]
        assert result["n_activating"] == 3 and result["n_non_activating"] == 4
        assert result["score"] is None or 0 <= result["score"] <= 1
    assert record["scores"]["simulation"]["n_contexts"] == 7
    print(f"\nSmolLM2: {record['explanation']!r} " + ", ".join(f"{k} {v['score']}" for k, v in record["scores"].items()))
