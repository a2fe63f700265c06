"""Per-token activations around each exemplar: recorded at the end of a profile, kept by merge and re-save."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.atlas_merge import merge_atlases
from neuronatlas.exemplar_windows import neuron_exemplars
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, profile

RADIUS = 5


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(str(bundled.model_path("tiny-llama")), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    import json

    rows = [json.loads(line) for line in bundled.CORPUS_HELDOUT.read_text().splitlines()]
    folder = tmp_path_factory.mktemp("windows")
    parts = []
    for name, chunk in (("a", rows[:12]), ("b", rows[12:24]), ("ab", rows[:24])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in chunk))
        parts.append(path)
    return parts


def _profile(model_and_tokenizer, corpus, out, radius=RADIUS):
    model, tokenizer = model_and_tokenizer
    options = ProfileOptions(batch_size=4, max_length=48, top_k=4, exemplar_radius=radius, doc_sample=0)
    return profile(model, corpus, out, tokenizer=tokenizer, label_field="lang", options=options, quiet=True)


@pytest.fixture(scope="module")
def atlas(model_and_tokenizer, corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "atlas"
    _profile(model_and_tokenizer, corpora[2], out)
    return load_atlas(out)


def test_the_exemplar_token_holds_the_exemplar_activation(atlas):
    table = pq.read_table(atlas.path / "exemplars.parquet").to_pylist()
    assert table and all(len(row["window_activations"]) <= 2 * RADIUS + 1 for row in table)
    for row in table:
        at = row["pos"] - row["window_start"]
        assert 0 <= at < len(row["window_activations"])
        assert row["window_activations"][at] == pytest.approx(row["activation"], abs=1e-4)


def test_windows_equal_a_recomputation_on_the_window_alone(atlas, model_and_tokenizer):
    model, _ = model_and_tokenizer
    neurons = locate_neurons(model)
    contexts = dict(zip(atlas.contexts["seq"].to_pylist(), atlas.contexts["token_ids"].to_pylist()))
    checked = 0
    for layer, neuron in ((0, 3), (atlas.num_layers - 1, 7)):
        for example in neuron_exemplars(atlas, layer, neuron):
            ids = torch.tensor([contexts[example["seq"]]])
            seen = {}
            with torch.inference_mode(), capture(neurons, lambda l, z: seen.setdefault(l, z[0, :, neuron].clone())):
                model(input_ids=ids)
            lo = example["pos"] - example["focus"]
            expected = seen[layer][lo:lo + len(example["activations"])]
            # kept in float16 (the exemplar's own value exact): float16's relative precision
            assert torch.allclose(torch.tensor(example["activations"]), expected, rtol=1e-3, atol=1e-4)
            assert len(example["tokens"]) == len(example["activations"])
            assert max(example["activations"]) == pytest.approx(example["activation"], abs=1e-4)
            checked += 1
    assert checked == 8


def test_bottom_windows_equal_a_recomputation_and_are_the_most_negative_first(atlas, model_and_tokenizer):
    model, _ = model_and_tokenizer
    neurons = locate_neurons(model)
    contexts = dict(zip(atlas.contexts["seq"].to_pylist(), atlas.contexts["token_ids"].to_pylist()))
    checked = 0
    for layer, neuron in ((0, 3), (atlas.num_layers - 1, 7)):
        examples = neuron_exemplars(atlas, layer, neuron, end="bottom")
        values = [example["activation"] for example in examples]
        assert values == sorted(values) and all(value < 0 for value in values)
        for example in examples:
            ids = torch.tensor([contexts[example["seq"]]])
            seen = {}
            with torch.inference_mode(), capture(neurons, lambda l, z: seen.setdefault(l, z[0, :, neuron].clone())):
                model(input_ids=ids)
            lo = example["pos"] - example["focus"]
            expected = seen[layer][lo:lo + len(example["activations"])]
            assert torch.allclose(torch.tensor(example["activations"]), expected, rtol=1e-3, atol=1e-4)
            assert min(example["activations"]) == pytest.approx(example["activation"], abs=1e-4)
            checked += 1
    assert checked >= 4


def test_merge_and_resave_keep_the_windows(model_and_tokenizer, corpora, tmp_path, atlas):
    first = _profile(model_and_tokenizer, corpora[0], tmp_path / "a")
    second = _profile(model_and_tokenizer, corpora[1], tmp_path / "b")
    merged = merge_atlases(load_atlas(tmp_path / "a"), load_atlas(tmp_path / "b"))
    merged.save(tmp_path / "merged")
    assert first.windows is not None and second.windows is not None
    whole = {(r["layer"], r["neuron"], r["seq"], r["pos"]): r["window_activations"]
             for r in pq.read_table(atlas.path / "exemplars.parquet").to_pylist()}
    rows = pq.read_table(tmp_path / "merged" / "exemplars.parquet").to_pylist()
    assert all(row["window_activations"] for row in rows)  # second's windows renumbered, none lost
    same = [(row["window_activations"], whole[key]) for row in rows
            if (key := (row["layer"], row["neuron"], row["seq"], row["pos"])) in whole]
    assert len(same) > 0.9 * len(rows)  # batching differs, so near-ties may pick other exemplars
    for merged_values, whole_values in same:
        assert merged_values == pytest.approx(whole_values, rel=2e-3, abs=1e-4)  # float16 windows
    bottom = pq.read_table(tmp_path / "merged" / "bottom_exemplars.parquet").to_pylist()
    assert bottom and all(row["window_activations"] for row in bottom)

def test_radius_zero_records_no_windows(model_and_tokenizer, corpora, tmp_path):
    _profile(model_and_tokenizer, corpora[0], tmp_path / "plain", radius=0)
    for name in ("exemplars.parquet", "bottom_exemplars.parquet"):
        assert "window_activations" not in pq.read_schema(tmp_path / "plain" / name).names
    example = neuron_exemplars(load_atlas(tmp_path / "plain"), 0, 0)[0]
    assert example["activations"] == [pytest.approx(example["activation"])] and len(example["tokens"]) == 1
