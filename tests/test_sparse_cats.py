"""CATS: the gate's activation thresholded per layer; up and down skipped for the neurons it drops."""

from __future__ import annotations

import pytest
import torch
from decode_steps import prefill_then_steps
from test_models import FAMILIES, text_config, tiny

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.loading import load_model
from neuronatlas.models import is_encoder, locate_neurons
from neuronatlas.sparse import SparsifyOptions, apply_plan, sparsify
from neuronatlas.sparse.cats import gate_quantiles
from neuronatlas.sparse.limit import bytes_limit, weight_bytes_read
from neuronatlas.sparse.plan import SparsePlan, model_info
from neuronatlas.sparse.thresholds import threshold_at

GATED = sorted(name for name, family in FAMILIES.items() if family.gated)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", quiet=True)


def masked_reference(model, thresholds: dict[int, float]):
    """Hooks making the dense model compute z_j = 0 wherever |act(gate(x))_j| <= its layer's threshold:
    what CATS computes (a context manager; the hooks go when it ends)."""
    from contextlib import ExitStack

    stack = ExitStack()
    for layer in locate_neurons(model).layers:
        seen = {}
        threshold = thresholds[layer.index]
        handle = layer.act.register_forward_hook(lambda module, args, out, seen=seen: seen.__setitem__("g", out))
        stack.callback(handle.remove)
        handle = layer.down.register_forward_pre_hook(
            lambda module, args, seen=seen, t=threshold: (args[0] * (seen["g"].abs() > t),))
        stack.callback(handle.remove)
    return stack


def hand_plan(model, sparsity: float) -> SparsePlan:
    """A CATS plan calibrated on random FFN inputs (models without a tokenizer)."""
    torch.manual_seed(1)
    width = text_config(model).hidden_size
    neurons = locate_neurons(model)
    tensors = {f"quantiles.act.{layer.index}": gate_quantiles(layer, torch.randn(256, width)) for layer in neurons.layers}
    return SparsePlan("cats", sparsity, model_info(model), {"prefill": "sparse", "seed": 0}, tensors)


def thresholds_of(plan: SparsePlan, layers: int) -> dict[int, float]:
    return {layer: threshold_at(plan.tensor("quantiles.act", layer), plan.sparsity) for layer in range(layers)}


@pytest.mark.parametrize("gate_kernel", [False, True])  # the gate on F.linear, or on the row products (forced)
def test_decode_steps_compute_the_dense_model_with_the_dropped_neurons_zeroed(llama, corpus_path, monkeypatch, gate_kernel):
    """The kernels (kept up rows, down's rows of the nonzero z) give what masking z in the dense model gives."""
    from neuronatlas.sparse import row_kernel

    monkeypatch.setattr(row_kernel, "MIN_PRODUCT_WEIGHTS", 0 if gate_kernel else 1 << 62)
    model, tokenizer = llama
    plan = sparsify("cats", model, tokenizer, 0.5, corpus=corpus_path, options=SparsifyOptions(calib_tokens=256, max_length=24))
    ids = tokenizer("the cat sat on a mat and the dog ran to the house", return_tensors="pt").input_ids
    with masked_reference(model, thresholds_of(plan, 2)):
        expected = model(ids).logits[:, 3:-1]
    sparse = apply_plan(model, plan)
    with sparse:
        stepped = prefill_then_steps(model, ids, 4)
    assert sparse.phase.kernel_calls["rows"] > 0  # the kernels ran, not the masked dense product
    assert all(runtime.gate_kernel == gate_kernel for runtime in sparse.runtimes)
    assert torch.allclose(stepped, expected, atol=1e-4)
    assert not torch.allclose(stepped, prefill_then_steps(model, ids, 4), atol=1e-3)  # it changed something


@pytest.mark.parametrize("name", GATED)
def test_every_gated_family_computes_its_masked_mlp(name):
    """Every gated family (Phi-3's fused gate/up included): prompt and decode steps equal the dense model
    with z zeroed where |act(gate(x))| is at most the threshold; the family's modules come back after."""
    model, inputs = tiny(name)
    layers = locate_neurons(model).num_layers
    plan = hand_plan(model, 0.5)
    ids = inputs["input_ids"][:1]
    with masked_reference(model, thresholds_of(plan, layers)), torch.inference_mode():
        expected = model(ids).logits if is_encoder(model.config) else model(ids).logits[:, 2:-1]
    dense = model(ids).logits
    with apply_plan(model, plan, check_fingerprint=False), torch.inference_mode():
        got = model(ids).logits if is_encoder(model.config) else prefill_then_steps(model, ids, 3)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(model(ids).logits, dense)  # put back


def test_calibrated_threshold_drops_the_share_asked_on_held_out_text(llama, corpus_rows_and_path, tmp_path):
    """Calibrated on one half of the corpus, the threshold drops about ``sparsity`` of the other half's
    neuron activations."""
    from neuronatlas.corpus import iter_batches, iter_windows, read_corpus
    from neuronatlas.hooks import forward_batch

    model, tokenizer = llama
    rows, path = corpus_rows_and_path
    halves = [tmp_path / "calibration.jsonl", tmp_path / "held-out.jsonl"]
    for half, part in zip(halves, (path.read_text().splitlines()[::2], path.read_text().splitlines()[1::2])):
        half.write_text("\n".join(part) + "\n")
    plan = sparsify("cats", model, tokenizer, 0.4, corpus=halves[0], options=SparsifyOptions(calib_tokens=4096, max_length=24))
    gates = {layer.index: [] for layer in locate_neurons(model).layers}
    handles = [layer.act.register_forward_hook(lambda m, a, out, i=layer.index: gates[i].append(out.detach()))
               for layer in locate_neurons(model).layers]
    try:
        for batch in iter_batches(iter_windows(read_corpus(halves[1]), tokenizer, 24), 8, 0):
            forward_batch(model, batch.input_ids, batch.attention_mask)
            real = batch.attention_mask.bool()
            for values in gates.values():
                values[-1] = values[-1][real]  # (real tokens, d_ff)
    finally:
        for handle in handles:
            handle.remove()
    for layer, threshold in thresholds_of(plan, 2).items():
        dropped = float((torch.cat(gates[layer]).abs() <= threshold).float().mean())
        assert abs(dropped - 0.4) < 0.08, (layer, dropped)


def test_batched_decode_matches_each_sequence_alone(llama, corpus_path):
    model, tokenizer = llama
    texts = ["the cat sat on a mat and", "der hund lief zum haus und", "the dog ran to the house while",
             "birds sang in trees and the"]
    ids = torch.stack([tokenizer(t, return_tensors="pt").input_ids[0, :7] for t in texts])  # (4, 7), no padding
    plan = sparsify("cats", model, tokenizer, 0.85, corpus=corpus_path, options=SparsifyOptions(calib_tokens=256, max_length=24))
    sparse = apply_plan(model, plan)
    with sparse:
        batched = prefill_then_steps(model, ids, 3)
        alone = torch.cat([prefill_then_steps(model, ids[row : row + 1], 3) for row in range(4)])
    assert torch.allclose(batched, alone, atol=1e-4)
    assert sparse.phase.kernel_calls["rows"] > 0  # 4 x 15% of the rows: the kernels, not the dense product


def test_bytes_limit_counts_up_and_down_but_not_the_gate(llama, corpus_path):
    model, tokenizer = llama
    plan = sparsify("cats", model, tokenizer, 0.5, corpus=corpus_path, options=SparsifyOptions(calib_tokens=256, max_length=24))
    skipped = sum(0.5 * (layer.up.weight.numel() + layer.down.weight.numel()) * 4 for layer in locate_neurons(model).layers)
    read = weight_bytes_read(model)
    assert bytes_limit(model, plan) == pytest.approx(read / (read - skipped))


def test_cats_refuses_a_family_without_a_gate_and_a_call_without_a_corpus(tiny_gpt2, llama):
    model, tokenizer = load_model(str(tiny_gpt2), device="cpu", quiet=True)
    with pytest.raises(NeuronAtlasError, match="gpt2's MLP has no gate: use teal, wina, coreinfer, hot or moe"):
        sparsify("cats", model, tokenizer, 0.5, corpus=None)
    model, tokenizer = llama
    with pytest.raises(NeuronAtlasError, match="calibrates its thresholds on a corpus .*--corpus FILE"):
        sparsify("cats", model, tokenizer, 0.5)


def test_the_command_line_offers_every_registered_method():
    from neuronatlas.cli.sparsify import METHOD_CHOICES
    from neuronatlas.sparse import METHOD_NAMES

    assert METHOD_CHOICES == METHOD_NAMES


@pytest.mark.real
def test_smollm2_cats_at_half_sparsity_beats_its_control():
    """On the real SmolLM2-135M (GGUF): CATS at 50% costs far less perplexity than dropping random neurons."""
    from test_sparse_teal import smollm2_quality

    result = smollm2_quality("cats", 0.5, SparsifyOptions(calib_tokens=1024, max_length=128))
    assert result["ppl_dense"] < result["ppl_sparse"] < 3 * result["ppl_dense"]  # measured ×1.77 on 32 windows
    assert result["ppl_random"] > 10 * result["ppl_sparse"]  # measured ×5.8e3


def test_cli_sparsify_cats_then_bench_with_controls(tmp_path, capsys):
    """On the bundled trained tiny-llama, through the command line: the plan, then bench's contract."""
    import json

    from neuronatlas import bundled
    from neuronatlas.cli import main

    model, plan, out = str(bundled.model_path("tiny-llama")), tmp_path / "plan", tmp_path / "bench.json"
    assert main(["sparsify", "cats", "--model", model, "--corpus", str(bundled.CORPUS_TRAIN), "--sparsity", "0.5",
                 "--calib-tokens", "2048", "--out", str(plan), "--quiet"]) == 0
    assert "thresholds on the gate's activation" in capsys.readouterr().out
    assert main(["bench", "--model", model, "--plan", str(plan), "--corpus", str(bundled.CORPUS_HELDOUT), "--controls",
                 "--json", str(out), "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "8", "--max-windows", "8",
                 "--max-length", "64"]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "cats" and result["prefill"] == "sparse" and 1 < result["bytes_limit"] < 1.5
    assert result["skipping_speedup"] == pytest.approx(result["speedup"] / result["kernel_only"]["speedup"])
    # CATS at 50% is within 1% of dense there (×1.009 on 24 windows), random neurons ×3.2
    assert result["ppl_sparse"] < 1.1 * result["ppl_dense"] and 2 * result["ppl_dense"] < result["ppl_random"]


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_kernel_control_runs_the_kernels_and_computes_the_dense_model(llama, corpus_path, method):
    """The "kernel" control: the plan's decode kernels with nothing skipped, so its logits are dense's
    and only the kernels differ (bench's kernel_only)."""
    model, tokenizer = llama
    plan = sparsify(method, model, tokenizer, 0.5, corpus=corpus_path, options=SparsifyOptions(calib_tokens=256, max_length=24))
    ids = tokenizer("the cat sat on a mat and the dog ran to the house", return_tensors="pt").input_ids
    dense = prefill_then_steps(model, ids, 4)
    sparse = apply_plan(model, plan.as_control("kernel"))
    with sparse:
        stepped = prefill_then_steps(model, ids, 4)
    assert sparse.phase.kernel_calls["rows"] > 0  # the decode steps ran the row kernels
    assert torch.allclose(stepped, dense, atol=1e-4)


@pytest.mark.parametrize("name, method, usable", [
    ("bert", "coreinfer", "use teal, wina, hot or moe for it"),  # an encoder without a gate: neither cats nor coreinfer
    ("modernbert", "coreinfer", "use teal, wina, cats, hot or moe for it"),  # a gated encoder: cats works
    ("gpt2", "cats", "use teal, wina, coreinfer, hot or moe for it"),
])
def test_a_refused_method_names_only_the_methods_the_model_can_run(name, method, usable):
    from neuronatlas.sparse.registry import check_support

    with pytest.raises(NeuronAtlasError, match=usable):
        check_support(method, tiny(name)[0].config)
