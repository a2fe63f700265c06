"""Quantile-band and non-activating samples (neuronatlas.samples) against the model, and their cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuronatlas import bundled
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons
from neuronatlas.samples import NeuronSamples, cached_samples, read_cached, sample_contexts

TINY_LLAMA = bundled.model_path("tiny-llama")
NEURONS = [(1, 7), (2, 5), (3, 100)]
OPTIONS = {"max_docs": 10, "context_length": 24, "batch_size": 8}


@pytest.fixture(scope="module")
def model():
    if not (TINY_LLAMA / "config.json").exists():
        pytest.skip(f"the bundled tiny-llama is not there ({TINY_LLAMA})")
    return load_model(str(TINY_LLAMA), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lines = bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:8] + lines[2000:2004]]  # English first, then others
    path = tmp_path_factory.mktemp("samples") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def drawn(model, corpus):
    return sample_contexts(*model, corpus, NEURONS, bands=4, per_band=2, non_activating=3, seed=1, **OPTIONS)


def z_of(model, token_ids: list[int], layer: int, index: int) -> list[float]:
    neurons, out = locate_neurons(model), {}
    with torch.no_grad(), capture(neurons, on_activation=lambda l, z: out.__setitem__(l, z.reshape(-1, z.shape[-1]))):
        model(input_ids=torch.tensor([token_ids]))
    return out[layer][:, index].tolist()


def test_bands_hold_contexts_whose_peak_lies_in_them(drawn, model):
    assert set(drawn) == set(NEURONS)
    for (layer, index), found in drawn.items():
        assert len(found.edges) == 5 and found.edges[0] == 0.0 and found.contexts > 0
        assert found.active_contexts <= found.contexts
        assert sum(len(items) for items in found.bands.values()) > 0
        for band, items in found.bands.items():
            assert len(items) <= 2
            for item in items:
                assert found.edges[band] < item["activation"] <= found.edges[band + 1] + 1e-6
                assert item["activation"] == max(v for v in item["activations"] if v is not None)
                assert item["activations"][item["peak"]] == item["activation"]
                # Each value is the neuron's z on that token (kept in float16), <s> none.
                expected = z_of(model[0], item["token_ids"], layer, index)
                for value, z, token in zip(item["activations"], expected, item["token_ids"]):
                    if token in model[1].all_special_ids:
                        assert value is None
                    else:
                        assert value == pytest.approx(z, rel=2e-3, abs=2e-3)
                assert "".join(span["text"] for span in item["spans"]) == item["text"]
                assert len(item["tokens"]) == len(item["token_ids"]) == len(item["activations"])


def test_non_activating_contexts_stay_at_or_below_the_threshold(drawn):
    for found in drawn.values():
        assert len(found.non_activating) == 3
        peaks = [item["activation"] for item in found.non_activating]
        assert found.non_activating_max == pytest.approx(max(peaks))
        if found.contexts - found.active_contexts >= 3:  # enough quiet contexts: none fires
            assert max(peaks) <= 0.0


def test_the_draw_is_seeded_per_neuron(drawn, model, corpus):
    alone = sample_contexts(*model, corpus, [NEURONS[1]], bands=4, per_band=2, non_activating=3, seed=1, **OPTIONS)
    assert alone[NEURONS[1]].to_json() == drawn[NEURONS[1]].to_json()
    other = sample_contexts(*model, corpus, [NEURONS[1]], bands=4, per_band=2, non_activating=3, seed=2, **OPTIONS)
    picked = lambda found: [item["text"] for items in found.bands.values() for item in items]  # noqa: E731
    assert picked(other[NEURONS[1]]) != picked(drawn[NEURONS[1]]) or other[NEURONS[1]].active_contexts < 3


def test_a_threshold_per_neuron_moves_its_bands_alone(drawn, model, corpus):
    first, second = NEURONS[0], NEURONS[1]
    middle = float(np.median([item["activation"] for band in drawn[first].bands.values() for item in band]))
    own = sample_contexts(*model, corpus, NEURONS, bands=4, per_band=2, non_activating=3, seed=1,
                          threshold={first: middle, second: 0.0}, **OPTIONS)
    assert own[first].edges[0] == pytest.approx(middle)  # its range starts at its own threshold
    assert all(item["activation"] <= middle for item in own[first].non_activating)
    assert own[second].to_json() == drawn[second].to_json()  # the other neuron drew as with one threshold of 0


def test_cache_next_to_the_atlas(drawn, tmp_path):
    meta = {"model": {"fingerprint": "f" * 16}, "corpus": {"fingerprint": "c" * 64}, "options": {"threshold": 0.0}}
    calls = []

    def draw(missing, **options):
        calls.append(list(missing))
        return {neuron: drawn[neuron] for neuron in missing}

    first = cached_samples(tmp_path, meta, NEURONS[:2], draw, bands=4)
    again = cached_samples(tmp_path, meta, NEURONS, draw, bands=4)
    assert calls == [NEURONS[:2], [NEURONS[2]]]  # each neuron drawn once
    assert again[NEURONS[0]].to_json() == first[NEURONS[0]].to_json() == drawn[NEURONS[0]].to_json()
    assert isinstance(read_cached(tmp_path, meta, NEURONS[2], bands=4), NeuronSamples)
    assert read_cached(tmp_path, meta, NEURONS[2], bands=5) is None  # other options, another cache
    assert len(list((tmp_path / "samples").rglob("*.json"))) == 3


def test_bad_counts_are_refused(model, corpus):
    from neuronatlas.errors import NeuronAtlasError

    with pytest.raises(NeuronAtlasError, match="bands must be at least 1"):
        sample_contexts(*model, corpus, NEURONS, bands=0)


def test_a_cached_sample_file_is_never_read_half_written(tmp_path):
    """The viewer draws a neuron's samples on one server thread and reads the cache (read_cached) on
    another: a file written in place was read half-written there (a JSON error, an HTTP 500). Written
    whole, a reader polling during 40 rewrites of a 1.5 MB file never sees part of one (written in
    place, it saw a partial file hundreds of times in the same loop)."""
    import threading

    from neuronatlas.files import write_text_whole

    path = tmp_path / "samples.json"
    write_text_whole(path, json.dumps({"values": list(range(200_000))}))
    stop, errors = threading.Event(), []

    def read_while_written():
        while not stop.is_set():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                errors.append(error)

    reader = threading.Thread(target=read_while_written)
    reader.start()
    for step in range(40):
        write_text_whole(path, json.dumps({"values": list(range(200_000 + step))}))
    stop.set()
    reader.join()
    assert not errors
    assert [item.name for item in tmp_path.iterdir()] == ["samples.json"]  # no temporary file left behind
