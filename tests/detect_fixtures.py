"""Shared by the tests split out of test_detect.py: a profiled tiny-Llama atlas with position
statistics and a small document sample, and a brute-force recomputation of its activations."""

from __future__ import annotations


import pytest
import torch

from neuronatlas.atlas import load_atlas
from neuronatlas.corpus import iter_windows, read_corpus
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, profile


MAX_LENGTH = 24
CAP = 4  # documents per label in the sample of the main atlas
# the sample's values (float16, both pools), checked against a brute-force pooling; the default rank
# codes are checked against these values' ranks (test_atlas_positions)
SAMPLE_AS_VALUES = {"doc_sample": CAP, "doc_pools": ["mean", "max"], "doc_format": "float16"}


def options(**changes) -> ProfileOptions:
    return ProfileOptions(**{"max_length": MAX_LENGTH, "top_k": 5, "batch_size": 4, **SAMPLE_AS_VALUES, **changes})


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
