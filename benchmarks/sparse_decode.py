"""End-to-end greedy decode of a randomly initialised Llama (or a real model), dense vs each sparse plan.

    python benchmarks/sparse_decode.py [--layers 8] [--threads 2] [--runs 3] [--methods hot,coreinfer,teal,wina,cats,moe]
    python benchmarks/sparse_decode.py --model SmolLM2.gguf --methods teal,coreinfer,hot --scope all [--batches 4,16]

With ``--model`` the plans are calibrated on the bundled training corpus (TEAL/WINA/CATS; TEAL/WINA with
``--scope`` and uniform allocation: speed depends on the bytes skipped, not on how they are
shared) and measured by ``neuronatlas.sparse.bench.bench``: threads fitted to the free cores
unless ``--threads`` is given, per-run range, batched decode, CoreInfer's compaction time.

The model (hidden 2048, FFN 5632, vocabulary 8192 tied: about 430M parameters, FFN ~65% of the
weight bytes) is built from a config with seeded random weights: no download. Speed does not depend
on which neurons a plan keeps, so hot scores are random and TEAL/WINA/CATS calibrate on random token ids.
Dense and sparse decode take turns step by step (`neuronatlas.sparse.bench.paired_decode`), so
load from other processes hits both alike; CoreInfer's per-prompt compaction is in its decode
time. Prints one JSON line per plan (the fields of `neuronatlas bench`, with each run's speedup
and the load average).
"""

from __future__ import annotations

import argparse
import json

import torch

from neuronatlas.sparse import SparsifyOptions, sparsify
from neuronatlas.sparse.speed import decode_speed
from neuronatlas.sparse.calibrate import CalibrationSample
from neuronatlas.sparse.cats import gate_quantiles
from neuronatlas.sparse.plan import SparsePlan, model_info
from neuronatlas.sparse.attention import sparse_layers
from neuronatlas.sparse.teal import threshold_tables
from neuronatlas.sparse.wrap import SparseModel
from neuronatlas.models import locate_neurons


def random_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def random_sample(model, tokens: int) -> CalibrationSample:
    """FFN inputs of the model on random token ids (a stand-in corpus for threshold calibration)."""
    neurons, store = locate_neurons(model), {}
    handles = [layer.up.register_forward_pre_hook(lambda m, a, i=layer.index: store.__setitem__(("x", i), a[0][0]))
               for layer in neurons.layers]
    handles += [layer.down.register_forward_pre_hook(lambda m, a, i=layer.index: store.__setitem__(("z", i), a[0][0]))
                for layer in neurons.layers]
    try:
        model(torch.randint(model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)))
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationSample(x={i: store[("x", i)] for i in range(neurons.num_layers)},
                             z={i: store[("z", i)] for i in range(neurons.num_layers)})


def plans(model, methods: list[str], sparsity: float, moe_sparsity: float):
    neurons, info = locate_neurons(model), model_info(model, "random-llama")
    sample = random_sample(model, 128) if {"teal", "wina", "cats"} & set(methods) else None
    for method in methods:
        if method == "hot":
            scores = {f"score.{i}": torch.rand(w) for i, w in enumerate(neurons.widths)}
            yield SparsePlan("hot", sparsity, info, {"seed": 0}, scores)
        elif method in ("teal", "wina"):
            yield SparsePlan(method, sparsity, info, {}, threshold_tables(sparse_layers(model), None, sample, method == "wina"))
        elif method == "cats":
            yield SparsePlan("cats", sparsity, info, {"prefill": "sparse", "seed": 0},
                             {f"quantiles.act.{layer.index}": gate_quantiles(layer, sample.x[layer.index])
                              for layer in neurons.layers})
        else:
            yield sparsify(method, model, None, moe_sparsity if method == "moe" else sparsity,
                           options=SparsifyOptions(experts=16))


def real_model(args) -> None:
    """Each plan of a real model through ``bench`` (speed only), one JSON line each."""
    from neuronatlas import bundled
    from neuronatlas.loading import load_model
    from neuronatlas.sparse.bench import bench
    from neuronatlas.sparse.speed import speed_lines

    model, tokenizer = load_model(args.model, device="cpu", dtype=args.dtype, quiet=True)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    methods = args.methods.split(",")
    atlas = hot_atlas(model, tokenizer, args.atlas) if "hot" in methods else None
    for method in methods:
        options = SparsifyOptions(calib_tokens=1024, scope=args.scope)
        corpus = bundled.CORPUS_TRAIN if method in ("teal", "wina", "cats") else None
        plan = sparsify(method, model, tokenizer, args.sparsity, corpus=corpus, atlas=atlas, options=options)
        result = bench(model, tokenizer, plan, bundled.CORPUS_HELDOUT, runs=args.runs, new_tokens=args.new_tokens,
                       prompt_tokens=args.prompt_tokens, max_windows=1, threads=args.threads, batches=batches)
        result.pop("ppl_dense", None), result.pop("ppl_sparse", None), result.pop("ppl_ratio", None)
        print("\n".join(speed_lines(result)), flush=True)
        print(json.dumps({"scope": args.scope, "dtype": args.dtype} | {k: rounded(v) for k, v in result.items()}), flush=True)


def hot_atlas(model, tokenizer, path: str | None):
    """The atlas hot neurons are scored from: ``path``, or a small one profiled here (the first 40
    training documents of each bundled language, 128-token windows, no exemplars)."""
    import tempfile
    from pathlib import Path

    from neuronatlas import bundled
    from neuronatlas.atlas import load_atlas
    from neuronatlas.corpus import read_corpus
    from neuronatlas.profile import ProfileOptions, profile

    if path:
        return load_atlas(path)
    folder = Path(tempfile.mkdtemp(prefix="hot-atlas-"))
    corpus = bundled.first_per_label(bundled.CORPUS_TRAIN, folder / "corpus.jsonl", 40)
    return profile(model, read_corpus(corpus, label_field="lang"), folder / "atlas", tokenizer=tokenizer,
                   quiet=True, options=ProfileOptions(max_length=128, top_k=0, doc_sample=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a real model (folder or .gguf) instead of the random Llama")
    parser.add_argument("--dtype", default="float32", help="with --model: float32 or bfloat16")
    parser.add_argument("--scope", default="all", help="with --model: TEAL/WINA scope, mlp or all")
    parser.add_argument("--batches", default=None, help="with --model: also these batch sizes, e.g. 4,16")
    parser.add_argument("--atlas", default=None, help="with --model: the atlas of hot's scores (default: profiled here)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="default: 2 (random model), the free cores (--model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--moe-sparsity", type=float, default=0.75, help="share of experts skipped (0.75: 4 of 16 run)")
    parser.add_argument("--methods", default="hot,coreinfer,teal,wina,moe")
    args = parser.parse_args()
    if args.model:
        return real_model(args)
    args.threads = args.threads or 2
    torch.set_num_threads(args.threads)
    model = random_llama(args.layers)
    prompt = torch.randint(model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(2))
    params = sum(p.numel() for p in model.parameters())
    for plan in plans(model, args.methods.split(","), args.sparsity, args.moe_sparsity):
        result = decode_speed(model, SparseModel(model, plan), prompt, args.new_tokens, args.runs)
        print(json.dumps({"method": plan.method, "sparsity": plan.sparsity, "params_m": round(params / 1e6),
                          "threads": args.threads} | {k: rounded(v) for k, v in result.items()}), flush=True)


def rounded(value):
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
