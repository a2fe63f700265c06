"""Sparse plans on tiny random models: exactness of the kernels, generate(), save/load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_fails, make_gpt2, make_tokenizer
from decode_steps import prefill_then_steps

from neuronatlas.cli import main
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.hooks import returned_cache, with_cache
from neuronatlas.intervene import Intervention, intervene
from neuronatlas.loading import load_model
from neuronatlas.sparse import SparsifyOptions, apply_plan, load_plan, sparsify
from neuronatlas.sparse.kernels import sparse_input_matvec, weighted_row_sums

DENSE_TOL = 1e-5


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def llama_atlas(tiny_llama, corpus_path, tmp_path_factory):
    from neuronatlas.atlas import load_atlas
    from neuronatlas.profile import ProfileOptions, profile

    out = tmp_path_factory.mktemp("sparse-atlas") / "atlas"
    profile(str(tiny_llama), corpus_path, out, label_field="lang", device="cpu", quiet=True,
            options=ProfileOptions(max_length=24, top_k=0, doc_sample=0))
    return load_atlas(out), out


def make_plan(method, model, tokenizer, sparsity, atlas=None, corpus=None, **options):
    return sparsify(method, model, tokenizer, sparsity, atlas=atlas, corpus=corpus,
                    options=SparsifyOptions(calib_tokens=256, max_length=24, **options))


def ids_of(tokenizer, text="the cat sat on a mat and the dog ran to the house"):
    return tokenizer(text, return_tensors="pt").input_ids


def all_plans(llama, llama_atlas, corpus_path, sparsity):
    model, tokenizer = llama
    return {"teal": make_plan("teal", model, tokenizer, sparsity, corpus=corpus_path),
            "wina": make_plan("wina", model, tokenizer, sparsity, corpus=corpus_path),
            "coreinfer": make_plan("coreinfer", model, tokenizer, sparsity),
            "hot": make_plan("hot", model, tokenizer, sparsity, atlas=llama_atlas[0]),
            "moe": make_plan("moe", model, tokenizer, sparsity, experts=4)}


def test_sparsity_zero_gives_dense_logits(llama, llama_atlas, corpus_path):
    model, tokenizer = llama
    ids = ids_of(tokenizer)
    dense = model(ids).logits
    for method, plan in all_plans(llama, llama_atlas, corpus_path, 0.0).items():
        with apply_plan(model, plan):
            assert torch.allclose(model(ids).logits, dense, atol=DENSE_TOL), method
    moe_all = make_plan("moe", model, tokenizer, 0.0, experts=4).as_control("random")  # all experts, permuted weights
    with apply_plan(model, moe_all):
        assert torch.allclose(model(ids).logits, dense, atol=1e-4)


def test_plans_change_the_logits_at_half_sparsity(llama, llama_atlas, corpus_path):
    model, tokenizer = llama
    ids = ids_of(tokenizer)
    dense = prefill_then_steps(model, ids, 4)
    for method, plan in all_plans(llama, llama_atlas, corpus_path, 0.5).items():
        with apply_plan(model, plan):
            assert not torch.allclose(prefill_then_steps(model, ids, 4), dense, atol=1e-3), method


@pytest.mark.parametrize("kernel", [False, True])  # decode steps on F.linear, or on the compiled row products
def test_hot_compacted_equals_masked_dense(llama, llama_atlas, monkeypatch, kernel):
    """Hot neurons' compacted weights compute the dense model with the other neurons zeroed, at the
    prompt (many tokens) and at the decode steps (the kernel forced on the tiny model's small weights)."""
    from neuronatlas.sparse import row_kernel

    monkeypatch.setattr(row_kernel, "MIN_PRODUCT_WEIGHTS", 0 if kernel else 1 << 62)
    model, tokenizer = llama
    plan = make_plan("hot", model, tokenizer, 0.5, atlas=llama_atlas[0])
    ids = ids_of(tokenizer)
    dropped = {}
    for layer, width in enumerate(plan.widths):
        kept = plan.tensor("score", layer).topk(width - round(0.5 * width)).indices
        mask = torch.ones(width, dtype=torch.bool)
        mask[kept] = False
        dropped[layer] = mask.nonzero().squeeze(1)
    with intervene(model, [Intervention(dropped, "zero")]):
        masked, masked_steps = model(ids).logits, prefill_then_steps(model, ids, 5)
    with apply_plan(model, plan) as sparse:
        compact, compact_steps = model(ids).logits, prefill_then_steps(model, ids, 5)
    assert torch.allclose(compact, masked, atol=DENSE_TOL)
    assert torch.allclose(compact_steps, masked_steps, atol=DENSE_TOL)
    assert (sparse.phase.kernel_calls["rows"] > 0) == kernel


@pytest.mark.parametrize("method", ["hot", "coreinfer"])
def test_kernel_control_of_compacted_weights_computes_the_dense_model(llama, llama_atlas, monkeypatch, method):
    """The "kernel" control of hot and CoreInfer keeps every neuron on the compacted path's kernel:
    its decode steps are the dense model's, on the kernel (bench's kernel_only)."""
    from neuronatlas.sparse import row_kernel

    monkeypatch.setattr(row_kernel, "MIN_PRODUCT_WEIGHTS", 0)
    model, tokenizer = llama
    plan = make_plan(method, model, tokenizer, 0.5, atlas=llama_atlas[0] if method == "hot" else None)
    ids = ids_of(tokenizer)
    dense = prefill_then_steps(model, ids, 4)
    with apply_plan(model, plan.as_control("kernel")) as sparse:
        stepped = prefill_then_steps(model, ids, 4)
    assert sparse.phase.kernel_calls["rows"] > 0
    assert torch.allclose(stepped, dense, atol=DENSE_TOL)
    with pytest.raises(NeuronAtlasError, match="kernel control is for teal, wina, cats, hot, coreinfer"):
        make_plan("moe", model, tokenizer, 0.5, experts=4).as_control("kernel")


def test_coreinfer_decode_equals_masked_dense(llama, monkeypatch):
    """Prefill chooses the core set; decoding on compacted weights (on the compiled row products,
    forced on the tiny model's small weights) equals zeroing the other neurons."""
    from neuronatlas.models import locate_neurons
    from neuronatlas.sparse import row_kernel
    from neuronatlas.sparse.coreinfer import core_frequency, core_neurons

    monkeypatch.setattr(row_kernel, "MIN_PRODUCT_WEIGHTS", 0)
    model, tokenizer = llama
    plan = make_plan("coreinfer", model, tokenizer, 0.5)
    ids, split = ids_of(tokenizer), 5
    captured = {}
    from neuronatlas.hooks import capture

    with capture(locate_neurons(model), on_activation=lambda layer, z: captured.setdefault(layer, z[0].clone())):
        model(ids[:, :split])
    dropped = {}
    for layer, z in captured.items():
        mask = torch.ones(z.shape[-1], dtype=torch.bool)
        mask[core_neurons(core_frequency(z), 0.5)] = False
        dropped[layer] = mask.nonzero().squeeze(1)
    dense_prompt = model(ids[:, :split], use_cache=True)
    with intervene(model, [Intervention(dropped, "zero")]):
        masked = model(ids[:, split:], **with_cache(model, returned_cache(dense_prompt))).logits
    with apply_plan(model, plan) as sparse:
        prefill_then_steps(model, ids_of(tokenizer, "der hund lief zum haus und die katze"), 3)  # another prompt first
        other_core = [runtime.compact.keep.clone() for runtime in sparse.runtimes]
        stepped = prefill_then_steps(model, ids, split)  # refills the same buffers with this prompt's core set
    assert any(not torch.equal(runtime.compact.keep, old) for runtime, old in zip(sparse.runtimes, other_core))
    assert torch.allclose(stepped[:, 1:], masked[:, :-1], atol=DENSE_TOL)
    assert sparse.phase.kernel_calls["rows"] > 0


def test_paired_decode_gives_the_tokens_of_each_side_alone(llama):
    """Dense and CoreInfer steps taking turns (bench) do not disturb each other's KV cache or core set."""
    from neuronatlas.sparse.speed import paired_decode

    model, tokenizer = llama
    plan = make_plan("coreinfer", model, tokenizer, 0.5)
    prompt, new = ids_of(tokenizer), 6
    sparse = apply_plan(model, plan)
    for sparse_first in (False, True):
        paired = paired_decode(model, sparse, prompt, new, sparse_first=sparse_first)
        greedy = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        dense = model.generate(prompt, **greedy)[0, prompt.shape[1]:]
        with sparse:
            alone = model.generate(prompt, **greedy)[0, prompt.shape[1]:]
        assert torch.equal(paired["dense"]["ids"], dense) and torch.equal(paired["sparse"]["ids"], alone)
        assert paired["sparse"]["decode_s"] > 0 and paired["dense"]["prefill_s"] > 0


@pytest.mark.parametrize("method", ["teal", "wina", "moe", "coreinfer"])
def test_single_token_kernels_equal_the_masked_multi_token_path(llama, corpus_path, method):
    """Decode steps (gathered rows / expert slices) give the logits of one multi-token continuation."""
    model, tokenizer = llama
    plan = make_plan(method, model, tokenizer, 0.5, corpus=corpus_path if method in ("teal", "wina") else None,
                     **({"experts": 4} if method == "moe" else {}))
    ids, split = ids_of(tokenizer), 4
    sparse = apply_plan(model, plan)
    with sparse:
        stepped = prefill_then_steps(model, ids, split)
        first = model(input_ids=ids[:, :split], use_cache=True)
        with sparse.continuation():
            rest = model(input_ids=ids[:, split:], **with_cache(model, returned_cache(first))).logits
    together = torch.cat([first.logits[:, -1:], rest[:, :-1]], 1)
    assert torch.allclose(stepped, together, atol=1e-4)


def test_sparse_input_kernel_equals_masked_matmul():
    torch.manual_seed(0)
    weight_t, x = torch.randn(50, 23), torch.randn(50)
    mask = x.abs() > 0.7
    for pieces in (1, 2, 3, 64):  # the kept rows split into bags (64: more bags than rows, some empty)
        assert torch.allclose(sparse_input_matvec(x, weight_t, mask, pieces),
                              (x * mask) @ weight_t, atol=1e-5)
    assert torch.equal(sparse_input_matvec(x, weight_t, torch.zeros(50, dtype=torch.bool)), torch.zeros(23))
    rows = [torch.tensor([3, 7, 8]), torch.tensor([], dtype=torch.long), torch.tensor([0, 49])]
    weights = [torch.randn(3), torch.randn(0), torch.randn(2)]
    expected = torch.stack([w @ weight_t[r] for r, w in zip(rows, weights)])
    assert torch.allclose(weighted_row_sums(weight_t, rows, weights, pieces=2), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_gate_and_up_come_from_one_group_and_equal_their_masked_products(llama, corpus_path, method):
    from neuronatlas.sparse.attention import sparse_layers
    from neuronatlas.sparse.teal import threshold_runtime

    model, tokenizer = llama
    plan = make_plan(method, model, tokenizer, 0.5, corpus=corpus_path)
    runtime = threshold_runtime(plan, sparse_layers(model)[0], weighted=method == "wina")
    group = runtime.groups["gate"]
    assert group is runtime.groups["up"] and group.shared_mask == (method == "teal")  # TEAL: one mask, one table
    x = torch.randn(1, 1, group.members["gate"].weight_t.shape[0])
    gate = runtime.forward("gate", x, None)
    assert set(group.waiting) == {"up"}
    up = runtime.forward("up", x, None)
    assert not group.waiting  # the second call took the kept output
    for out, projection in ((gate, group.members["gate"]), (up, group.members["up"])):
        expected = (x * projection.mask(x)) @ projection.weight_t
        assert torch.allclose(out, expected, atol=1e-5)
        assert not torch.allclose(out, x @ projection.weight_t, atol=1e-3)  # channels were dropped


def test_every_plan_works_with_generate(llama, llama_atlas, corpus_path):
    model, tokenizer = llama
    ids = ids_of(tokenizer, "the cat")
    dense = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for method, plan in all_plans(llama, llama_atlas, corpus_path, 0.5).items():
        with apply_plan(model, plan):
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == dense.shape, method
    for method, plan in all_plans(llama, llama_atlas, corpus_path, 0.0).items():
        with apply_plan(model, plan):
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), dense), method
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), dense)  # detached


def test_plan_round_trip_and_retargeting(llama, corpus_path, tmp_path):
    model, tokenizer = llama
    plan = make_plan("wina", model, tokenizer, 0.5, corpus=corpus_path)
    loaded = load_plan(plan.save(tmp_path / "plan"))
    assert loaded.method == "wina" and loaded.sparsity == 0.5 and loaded.model == plan.model
    assert set(loaded.tensors) == set(plan.tensors)
    assert all(torch.equal(loaded.tensors[k], plan.tensors[k]) for k in plan.tensors)
    ids = ids_of(tokenizer)
    with apply_plan(model, loaded.at_sparsity(0.0)):
        assert torch.allclose(model(ids).logits, model.__call__(ids).logits)


def test_moe_experts_are_balanced_and_contiguous(llama):
    model, tokenizer = llama
    plan = make_plan("moe", model, tokenizer, 0.5, experts=4)
    for layer, width in enumerate(plan.widths):
        order, bounds = plan.tensor("order", layer), plan.tensor("bounds", layer)
        assert torch.equal(order.sort().values, torch.arange(width))
        sizes = bounds.diff()
        assert int(sizes.max() - sizes.min()) <= 1 and int(bounds[-1]) == width


# ---- families ------------------------------------------------------------------------------------


def _phi3(directory):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    Phi3ForCausalLM(config).eval().save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def _opt(directory):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=41, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0)
    OPTForCausalLM(config).eval().save_pretrained(directory)
    make_tokenizer(directory)
    return directory


@pytest.mark.parametrize("family", ["gpt2", "phi3", "opt"])
def test_families_decode_like_their_multi_token_path(family, corpus_path, tmp_path):
    builder = {"gpt2": make_gpt2, "phi3": _phi3, "opt": _opt}[family]
    model, tokenizer = load_model(str(builder(tmp_path / family)), device="cpu", quiet=True)
    ids, split = ids_of(tokenizer), 4
    dense = model(ids).logits
    for method in ("teal", "wina", "coreinfer", "moe"):
        plan = make_plan(method, model, tokenizer, 0.5, corpus=corpus_path if method in ("teal", "wina") else None,
                         **({"experts": 4} if method == "moe" else {}))
        sparse = apply_plan(model, plan)
        with sparse:
            stepped = prefill_then_steps(model, ids, split)
            first = model(input_ids=ids[:, :split], use_cache=True)
            with sparse.continuation():
                rest = model(input_ids=ids[:, split:], **with_cache(model, returned_cache(first))).logits
            model.generate(ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.allclose(stepped, torch.cat([first.logits[:, -1:], rest[:, :-1]], 1), atol=1e-4), (family, method)
        with apply_plan(model, plan.at_sparsity(0.0)):
            assert torch.allclose(model(ids).logits, dense, atol=DENSE_TOL), (family, method)


# ---- command line --------------------------------------------------------------------------------


def test_bench_windows_fit_a_model_of_few_positions(tiny_gpt2, corpus_path, tmp_path):
    """A learned position table of 64 and documents of up to 91 tokens: the default window (128)
    shrinks to the model's positions instead of indexing past the table."""
    model, tokenizer = load_model(str(tiny_gpt2), device="cpu", quiet=True)
    assert model.config.n_positions == 64
    longest = max(len(tokenizer(json.loads(line)["text"]).input_ids) for line in corpus_path.read_text().splitlines())
    assert longest > 64
    plan = tmp_path / "plan"
    assert main(["sparsify", "coreinfer", "--model", str(tiny_gpt2), "--device", "cpu", "--out", str(plan)]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_gpt2), "--device", "cpu", "--plan", str(plan), "--corpus", str(corpus_path),
                 "--json", str(out), "--runs", "1", "--new-tokens", "2", "--max-windows", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["eval_windows"] == 3 and result["ppl_dense"] > 1


def test_cli_sparsify_and_bench_write_the_contract(tiny_llama, llama_atlas, corpus_path, tmp_path):
    plan = tmp_path / "plan"
    assert main(["sparsify", "hot", "--model", str(tiny_llama), "--atlas", str(llama_atlas[1]),
                 "--sparsity", "0.5", "--out", str(plan)]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_llama), "--plan", str(plan), "--corpus", str(corpus_path),
                 "--json", str(out), "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "8", "--max-windows", "4",
                 "--max-length", "24"]) == 0
    result = json.loads(out.read_text())
    for key in ("dense_tokens_per_s", "sparse_tokens_per_s", "speedup", "ppl_dense", "ppl_sparse"):
        assert result[key] > 0, key
    assert result["speedup"] == pytest.approx(result["sparse_tokens_per_s"] / result["dense_tokens_per_s"])
    assert len(result["speedup_per_run"]) == 1 and result["new_tokens"] == 4
    # hot's kernel control: every neuron on the compacted path (F.linear here: the tiny model's weights are small)
    assert result["skipping_speedup"] == pytest.approx(result["speedup"] / result["kernel_only"]["speedup"])


def test_cli_bench_by_label_measures_each_label_on_its_own_windows(tiny_llama, corpus_rows_and_path, tmp_path):
    rows, corpus_path = corpus_rows_and_path
    plan, out = tmp_path / "plan", tmp_path / "bench.json"
    assert main(["sparsify", "coreinfer", "--model", str(tiny_llama), "--out", str(plan)]) == 0
    assert main(["bench", "--model", str(tiny_llama), "--plan", str(plan), "--corpus", str(corpus_path), "--label-field",
                 "lang", "--json", str(out), "--runs", "1", "--new-tokens", "2", "--max-windows", "3",
                 "--max-length", "24"]) == 0
    by_label = json.loads(out.read_text())["by_label"]
    assert list(by_label) == list(dict.fromkeys(row["lang"] for row in rows))  # every label, in corpus order
    for point in by_label.values():
        assert point["eval_windows"] == 3 and point["ppl_ratio"] == pytest.approx(point["ppl_sparse"] / point["ppl_dense"])
    assert len({round(point["ppl_dense"], 3) for point in by_label.values()}) == len(by_label)  # each on its own text


def test_cli_bench_sweep_writes_a_point_per_sparsity(tiny_llama, corpus_path, tmp_path):
    plan = tmp_path / "plan"
    assert main(["sparsify", "coreinfer", "--model", str(tiny_llama), "--out", str(plan)]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_llama), "--plan", str(plan), "--corpus", str(corpus_path),
                 "--json", str(out), "--runs", "1", "--new-tokens", "2", "--prompt-tokens", "4", "--max-windows", "3",
                 "--max-length", "24", "--sweep", "0.25,0.75"]) == 0
    result = json.loads(out.read_text())
    assert [point["sparsity"] for point in result["sweep"]] == [0.25, 0.75]
    for point in result["sweep"]:
        assert point["ppl_dense"] == result["ppl_dense"] and point["eval_windows"] == 3
        assert point["ppl_sparse"] > 0 and point["ppl_random"] > 0
    low, high = result["sweep"]
    assert high["ppl_random"] != low["ppl_random"]  # the control follows the sparsity too


def test_cli_bad_input(tiny_llama, llama_atlas, corpus_path, tmp_path, capsys):
    model = str(tiny_llama)
    cli_fails(capsys, ["sparsify", "hot", "--model", model, "--atlas", str(llama_atlas[1]), "--sparsity", "1.0",
                       "--out", str(tmp_path / "p")], "sparsity must be in [0, 1)", "1.0")
    cli_fails(capsys, ["sparsify", "hot", "--model", model, "--sparsity", "-0.1", "--out", str(tmp_path / "p")],
              "sparsity must be in [0, 1)")
    cli_fails(capsys, ["sparsify", "hot", "--model", model, "--out", str(tmp_path / "p")], "hot needs an atlas", "--atlas")
    cli_fails(capsys, ["sparsify", "teal", "--model", model, "--out", str(tmp_path / "p")], "--atlas", "--corpus")
    cli_fails(capsys, ["sparsify", "moe", "--model", model, "--experts", "38", "--out", str(tmp_path / "p")],
              "38 experts", "37 neurons")
    other = make_gpt2(tmp_path / "other")
    assert main(["sparsify", "coreinfer", "--model", str(other), "--out", str(tmp_path / "gpt2-plan")]) == 0
    capsys.readouterr()
    cli_fails(capsys, ["bench", "--model", model, "--plan", str(tmp_path / "gpt2-plan")], "plan was made for model")
    bert = _bert(tmp_path / "bert")
    capsys.readouterr()
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", str(bert), "--out", str(tmp_path / "p")],
              "coreinfer", "bert is an encoder")


def test_cli_refuses_a_corrupt_plan(tiny_llama, llama, tmp_path, capsys):
    model, tokenizer = llama
    model_dir = str(tiny_llama)
    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "plan.json").write_text("{garbage", encoding="utf-8")
    cli_fails(capsys, ["bench", "--model", model_dir, "--plan", str(plan)], str(plan), "is not a valid sparse plan",
              "neuronatlas sparsify")
    (plan / "plan.json").write_text('{"format_version": 1}', encoding="utf-8")
    cli_fails(capsys, ["bench", "--model", model_dir, "--plan", str(plan)], "is not a valid sparse plan", "'method'")
    good = make_plan("coreinfer", model, tokenizer, 0.5)
    good.save(plan)
    meta = (plan / "plan.json").read_text(encoding="utf-8")
    (plan / "plan.json").write_text(meta.replace('"sparsity": 0.5', '"sparsity": "half"'), encoding="utf-8")
    cli_fails(capsys, ["bench", "--model", model_dir, "--plan", str(plan)], "is not a valid sparse plan", "'half'")
    (plan / "plan.json").write_text(meta, encoding="utf-8")
    (plan / "tensors.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    cli_fails(capsys, ["bench", "--model", model_dir, "--plan", str(plan)], "is not a valid sparse plan")
    assert load_plan(good.save(tmp_path / "again")).sparsity == 0.5  # a sound plan still loads


def test_cli_refuses_counts_that_would_do_nothing(tiny_llama, corpus_path, tmp_path, capsys):
    model = str(tiny_llama)  # 2 layers
    out = ["--out", str(tmp_path / "p")]
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--layers", "99", *out], "[99]", "0..1", "--layers")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--layers", "1,2", *out], "[1, 2]", "0..1")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--layers", "5-2", *out], "5-2", "backwards", "2-5")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--layers", "", *out], "--layers", "not a list")
    cli_fails(capsys, ["sparsify", "teal", "--model", model, "--corpus", str(corpus_path), "--calib-tokens", "0", *out],
              "--calib-tokens", "at least 1", "not 0")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--alpha", "0", *out], "--alpha", "(0, 1]")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--clusters", "-1", *out], "--clusters", "not -1")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--cluster-layer", "7", *out], "--cluster-layer", "7")
    cli_fails(capsys, ["sparsify", "moe", "--model", model, "--experts", "0", *out], "--experts", "at least 1")
    cli_fails(capsys, ["sparsify", "coreinfer", "--model", model, "--ppl-within", "0", "--corpus", str(corpus_path), *out],
              "--ppl-within", "positive")
    assert not (tmp_path / "p").exists()
    with pytest.raises(NeuronAtlasError, match=r"layers.*not \[\]"):
        sparsify("coreinfer", *load_model(model, device="cpu", quiet=True), 0.5, options=SparsifyOptions(layers=[]))
    plan = tmp_path / "plan"
    assert main(["sparsify", "coreinfer", "--model", model, "--layers", "1", "--out", str(plan)]) == 0
    converted = apply_plan(load_model(model, device="cpu", quiet=True)[0], load_plan(plan)).runtimes
    assert load_plan(plan).options["layers"] == [1] and converted[0] is None and converted[1] is not None
    capsys.readouterr()
    for flag, value in (("--runs", "0"), ("--new-tokens", "1"), ("--prompt-tokens", "0"), ("--max-windows", "0"),
                        ("--max-length", "-3")):
        cli_fails(capsys, ["bench", "--model", model, "--plan", str(plan), flag, value], flag, f"not {value}")
    cli_fails(capsys, ["bench", "--model", model, "--plan", str(plan), "--sweep", "0.5"], "--sweep", "--corpus")


def _bert(directory):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64)).eval().save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def test_ppl_p_search_refuses_an_encoder_in_python_too():
    """The CLI refuses before calibrating; the library function refuses what it cannot measure."""
    from test_models import tiny

    from neuronatlas.sparse.search import ppl_p_sparsity

    bert = tiny("bert")[0]
    with pytest.raises(NeuronAtlasError, match="bert is an encoder"):
        ppl_p_sparsity(bert, plan=None, windows=[torch.tensor([[1, 2, 3]])])
