"""Interventions: each op's effect on captured activations, scoping, generate(), validation."""

from __future__ import annotations

import pytest
import torch

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.hooks import capture
from neuronatlas.intervene import Intervention, intervene
from neuronatlas.loading import load_model, model_fingerprint
from neuronatlas.models import locate_neurons
from neuronatlas.neuronset import Neuron, NeuronSet
from neuronatlas.profile import ProfileOptions, profile

TEXTS = ["the cat sat on a mat and the dog ran", "der hund lief zum haus", "кот сидел на коврике а собака"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model, tokenizer = load_model(str(tiny_llama), device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return load_model(str(tiny_gpt2), device="cpu")


@pytest.fixture(scope="module")
def atlas(tiny_llama, corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("intervene-atlas")
    return profile(str(tiny_llama), corpus_path, out, label_field="lang", device="cpu", quiet=True,
                   options=ProfileOptions(max_length=24, top_k=0))


def batch(tokenizer, texts=TEXTS, side="right"):
    tokenizer.padding_side = side
    return tokenizer(texts, return_tensors="pt", padding=True)


def run(model, inputs, interventions=(), atlas=None):
    """(logits, {layer: z}, {layer: g}) of one forward, captured after the interventions."""
    neurons = locate_neurons(model)
    zs, gs = {}, {}
    with torch.no_grad(), intervene(model, list(interventions), atlas=atlas), \
            capture(neurons, lambda l, z: zs.__setitem__(l, z.clone()), lambda l, g: gs.__setitem__(l, g.clone())):
        logits = model(**inputs).logits
    return logits, zs, gs


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


IDX = {0: torch.tensor([1, 5, 7]), 1: torch.tensor([0, 36])}


def others(width, index):
    keep = torch.ones(width, dtype=torch.bool)
    keep[index] = False
    return keep


@pytest.mark.parametrize("op,value", [("zero", None), ("constant", 0.75), ("scale", 2.0), ("add", -0.5)])
def test_ops_on_z(llama, op, value):
    model, tokenizer = llama
    inputs = batch(tokenizer)
    # layer 0's edit changes layer 1's input: compare layer l with a run editing the layers before l
    for layer, index in IDX.items():
        _, before, _ = run(model, inputs, [Intervention({l: i for l, i in IDX.items() if l < layer}, op, value)])
        _, after, _ = run(model, inputs, [Intervention(IDX, op, value)])
        want = {"zero": lambda a: torch.zeros_like(a), "constant": lambda a: torch.full_like(a, value),
                "scale": lambda a: a * value, "add": lambda a: a + value}[op](before[layer][..., index])
        torch.testing.assert_close(after[layer][..., index], want)
        rest = others(after[layer].shape[-1], index)
        assert torch.equal(after[layer][..., rest], before[layer][..., rest])
    assert not torch.equal(run(model, inputs, [Intervention(IDX, op, value)])[0], run(model, inputs)[0])


def test_zero_is_exactly_zero_and_the_rest_unchanged(llama):
    model, tokenizer = llama
    inputs = batch(tokenizer)
    _, base, _ = run(model, inputs)
    _, after, _ = run(model, inputs, [Intervention({0: IDX[0]}, "zero")])
    assert torch.all(after[0][..., IDX[0]] == 0)
    assert torch.equal(after[0][..., others(37, IDX[0])], base[0][..., others(37, IDX[0])])


def test_atlas_ops(llama, atlas):
    model, tokenizer = llama
    inputs = batch(tokenizer)
    index = IDX[0]
    _, before, gates = run(model, inputs)
    tokens = atlas.tokens_per_label.sum()
    overall = (atlas.overall("sum", 0) / tokens).float()[index]
    means = atlas.mean(0).float()
    k = atlas.label_index("de")
    _, after, _ = run(model, inputs, [Intervention({0: index}, "mean")], atlas)
    torch.testing.assert_close(after[0][..., index], overall.expand_as(after[0][..., index]))
    _, after, _ = run(model, inputs, [Intervention({0: index}, "replace_label_mean", label="de")], atlas)
    torch.testing.assert_close(after[0][..., index], means[k, index].expand_as(after[0][..., index]))
    _, after, _ = run(model, inputs, [Intervention({0: index}, "add_label_mean", value=2.0, label="de")], atlas)
    torch.testing.assert_close(after[0][..., index], before[0][..., index] + 2 * means[k, index])
    _, after, _ = run(model, inputs, [Intervention({0: index}, "diff_mean", label="de")], atlas)
    rest = torch.cat([means[:k], means[k + 1:]]).mean(0)
    torch.testing.assert_close(after[0][..., index], before[0][..., index] + means[k, index] - rest[index])
    # the gate signal: g is edited, and z = g * up follows
    g_means = atlas.mean(0, "gate").float()
    _, after, g_after = run(model, inputs, [Intervention({0: index}, "replace_label_mean", label="de", signal="gate")], atlas)
    torch.testing.assert_close(g_after[0][..., index], g_means[k, index].expand_as(g_after[0][..., index]))
    up = before[0] / gates[0]
    torch.testing.assert_close(after[0][..., index], (g_means[k, index] * up[..., index]), rtol=1e-4, atol=1e-5)


def test_gate_scale_scales_z(llama):
    model, tokenizer = llama
    inputs = batch(tokenizer)
    _, before, g_before = run(model, inputs)
    _, after, g_after = run(model, inputs, [Intervention({0: IDX[0]}, "scale", value=2.0, signal="gate")])
    torch.testing.assert_close(g_after[0][..., IDX[0]], 2 * g_before[0][..., IDX[0]])
    torch.testing.assert_close(after[0][..., IDX[0]], 2 * before[0][..., IDX[0]])


def test_positions(llama):
    model, tokenizer = llama
    inputs = batch(tokenizer, side="left")
    _, before, _ = run(model, inputs)
    _, last, _ = run(model, inputs, [Intervention({0: IDX[0]}, "scale", value=2.0, positions="last")])
    torch.testing.assert_close(last[0][:, -1, IDX[0]], 2 * before[0][:, -1, IDX[0]])
    assert torch.equal(last[0][:, :-1], before[0][:, :-1])
    _, some, _ = run(model, inputs, [Intervention({0: IDX[0]}, "zero", positions=[0, 2, 99])])
    assert torch.all(some[0][:, [0, 2]][..., IDX[0]] == 0)
    assert torch.equal(some[0][:, 1], before[0][:, 1])
    assert torch.equal(some[0][:, 3:], before[0][:, 3:])


def test_gpt2_z_and_neuron_set(gpt2):
    model, tokenizer = gpt2
    inputs = batch(tokenizer)
    neuron_set = NeuronSet("hand", {}, [Neuron(0, 3, label="en"), Neuron(1, 40, label="de"), Neuron(0, 4, label="en")])
    _, before, _ = run(model, inputs)
    _, after, gates = run(model, inputs, [Intervention(neuron_set.for_label("en"), "scale", value=-1.0)])
    assert gates == {}
    torch.testing.assert_close(after[0][..., [3, 4]], -before[0][..., [3, 4]])
    with pytest.raises(NeuronAtlasError, match="gated"):
        run(model, inputs, [Intervention(neuron_set, "zero", signal="gate")])


def test_empty_set_is_bit_identical(llama):
    model, tokenizer = llama
    inputs = batch(tokenizer)
    plain = model(**inputs).logits
    empty_set = NeuronSet("hand", {}, [])
    empty_dict = {0: torch.tensor([], dtype=torch.long), 1: []}
    with torch.no_grad(), intervene(model, [Intervention(empty_set, "zero"), Intervention(empty_dict, "scale", 3.0)]):
        assert hook_count(model) == 2  # the hooks run, and touch nothing
        edited = model(**inputs).logits
    assert torch.equal(plain, edited)
    assert hook_count(model) == 0
    with pytest.raises(NeuronAtlasError, match="empty"):
        with intervene(model, [Intervention(empty_set, "zero")], allow_empty=False):
            pass


def test_padded_batch_rows_match_single_runs(llama):
    """With right padding, each row's real tokens get the same edited logits as the row alone."""
    model, tokenizer = llama
    inputs = batch(tokenizer)
    edit = [Intervention(IDX, "scale", value=3.0)]
    logits, _, _ = run(model, inputs, edit)
    for row, text in enumerate(TEXTS):
        alone, _, _ = run(model, tokenizer([text], return_tensors="pt"), edit)
        n = alone.shape[1]
        torch.testing.assert_close(logits[row, :n], alone[0], rtol=1e-4, atol=1e-4)


def test_generate_with_kv_cache_changes_output_and_cleans_up(llama):
    model, tokenizer = llama
    inputs = batch(tokenizer, ["the cat", "der hund"], side="left")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    plain = model.generate(**inputs, **kwargs)
    with intervene(model, [Intervention({0: torch.arange(37), 1: torch.arange(37)}, "constant", value=5.0)]):
        steered = model.generate(**inputs, **kwargs)
    assert hook_count(model) == 0
    assert not torch.equal(plain, steered)
    assert torch.equal(plain, model.generate(**inputs, **kwargs))


def test_hooks_removed_after_an_exception(llama):
    model, tokenizer = llama
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, [Intervention(IDX, "zero"), Intervention(IDX, "scale", 2.0, positions="last")]):
            assert hook_count(model) == 3  # z hooks on two layers + the shape recorder
            raise RuntimeError("boom")
    assert hook_count(model) == 0


@pytest.mark.parametrize("item,match", [
    (Intervention(IDX, "mean"), "atlas"),
    (Intervention(IDX, "explode"), "unknown op"),
    (Intervention(IDX, "constant"), "needs a value"),
    (Intervention({0: torch.tensor([37])}, "zero"), "beyond layer 0's width 37"),
    (Intervention({5: torch.tensor([1])}, "zero"), "layer 5 is out of range"),
    (Intervention(IDX, "zero", signal="h"), "unknown signal"),
    (Intervention(IDX, "zero", positions="first"), "positions"),
    (Intervention({0: torch.tensor([0.5])}, "zero"), "integers"),
])
def test_bad_interventions_fail_before_any_hook(llama, item, match):
    model, _ = llama
    with pytest.raises(NeuronAtlasError, match=match) as error:
        with intervene(model, [item]):
            pass
    assert "\n" not in str(error.value)
    assert hook_count(model) == 0


def test_bad_labels_and_atlas(llama, atlas):
    model, _ = llama
    for item, match in [
        (Intervention(IDX, "replace_label_mean", label="fr"), "unknown label 'fr'"),
        (Intervention(IDX, "add_label_mean"), "needs a label"),
    ]:
        with pytest.raises(NeuronAtlasError, match=match):
            with intervene(model, [item], atlas=atlas):
                pass
    assert hook_count(model) == 0


def test_set_for_another_model_is_refused(llama, gpt2):
    model, _ = llama
    other = NeuronSet("hand", {"name_or_path": "gpt2", "fingerprint": model_fingerprint(gpt2[0])}, [Neuron(0, 1, label="en")])
    with pytest.raises(NeuronAtlasError, match="another model"):
        other.check_model(model_fingerprint(model), locate_neurons(model).widths)
