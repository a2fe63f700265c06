"""``neuronatlas find probe | universal | entropy | frequency``: sparse probing, universal neurons and
confidence-regulation (entropy, token-frequency) neurons.

:func:`add_find_commands` adds the four methods to the ``find`` command's sub-subparsers. Each
writes a neuron set JSON (``--out``) and prints a short summary. Torch-heavy modules are imported
inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_sets import write_set
from .errors import NeuronAtlasError


def add_find_commands(methods) -> None:
    """Add ``probe``, ``universal``, ``entropy`` and ``frequency`` to the subparsers of ``neuronatlas find``."""
    _add_probe(methods)
    _add_universal(methods)
    _add_entropy(methods)
    _add_frequency(methods)


# ---- shared arguments ---------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def _corpus_args(parser: argparse.ArgumentParser, required: bool, label: bool = False) -> None:
    parser.add_argument("--corpus", required=required, help="a .txt/.jsonl/.csv/.parquet file or a folder")
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    if label:
        parser.add_argument("--label-field", default=None, help="field or column holding the label (e.g. lang)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")


def _load(path: str, args):
    from .loading import load_model

    return load_model(path, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, quiet=True)


def _corpus(args):
    from .corpus import read_corpus

    if args.max_length < 2 or args.batch_size < 1:
        raise NeuronAtlasError(f"--max-length must be at least 2 and --batch-size at least 1 "
                               f"(got {args.max_length} and {args.batch_size})")
    return read_corpus(args.corpus, text_field=args.text_field, label_field=getattr(args, "label_field", None))


def _check_out(path: str | None, what: str = "--out", kind: str = "neuron set JSON") -> None:
    if path is not None and Path(path).is_dir():
        raise NeuronAtlasError(f"{what} {path} is a folder; give the path of the {kind} file to write")


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NeuronAtlasError(f"{option} {text!r} is not a comma-separated list of integers; e.g. {option} 1,2,4") from None


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


# ---- probe --------------------------------------------------------------------------------------


def _add_probe(methods) -> None:
    parser = methods.add_parser("probe", help="sparse probing: F1/AUROC of logistic probes on the top k neurons per layer")
    parser.add_argument("--atlas", default=None, help="an atlas with a document sample (or --model with --corpus)")
    parser.add_argument("--model", default=None, help="collect samples by running this model over --corpus instead")
    _corpus_args(parser, required=False, label=True)
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--label", default=None, help="the label probed (default: every label, each against the rest)")
    parser.add_argument("--against", default=None, help="probe --label against this label only (default: the rest)")
    parser.add_argument("--ranking", default="mean_diff", choices=["mean_diff", "f_stat", "l1"],
                        help="how neurons are ranked on the training split (default: mean_diff)")
    parser.add_argument("--ks", default=None, help="probe sizes, comma-separated (default: 1,2,4,...,256)")
    parser.add_argument("--top-k", type=int, default=8, help="neurons kept per label in the set (default: 8)")
    parser.add_argument("--per-layer", action="store_true", help="keep the top k of every layer, not only the best")
    parser.add_argument("--pool", default="mean", choices=["mean", "max"], help="a document's z: mean or max (default: mean)")
    parser.add_argument("--unit", default="doc", choices=["doc", "token"],
                        help="with --model: a sample is a document (pooled) or a token (default: doc)")
    parser.add_argument("--max-per-label", type=int, default=200, help="with --model: samples per label (default: 200)")
    parser.add_argument("--tokens-per-window", type=int, default=8, help="with --unit token: tokens per window (default: 8)")
    parser.add_argument("--test-size", type=float, default=0.3, help="held-out share of the documents (default: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and token sampling (default: 0)")
    parser.add_argument("--l1-c", type=float, default=0.1, help="C of the L1 ranking (default: 0.1)")
    parser.add_argument("--probe-c", type=float, default=1.0, help="C of the logistic probes (default: 1.0)")
    parser.add_argument("--report", default=None, help="write every layer's F1/AUROC/MCC against k to this JSON")
    parser.add_argument("--plot", default=None, help="plot F1 and AUROC against k per layer to this PNG")
    _device_args(parser)
    _common(parser)
    parser.set_defaults(handler=_run_probe)


def _run_probe(args) -> int:
    from .methods.probe import collect_samples, from_atlas, plot_curves, sparse_probe

    _check_out(args.out)
    _check_out(args.report, "--report", "report JSON")
    _check_out(args.plot, "--plot", "PNG")
    ks = _int_list(args.ks, "--ks")
    if (args.atlas is None) == (args.model is None):
        raise NeuronAtlasError("give either --atlas (its document sample) or --model with --corpus, not both or neither")
    if args.model is not None:
        if args.corpus is None or args.label_field is None:
            raise NeuronAtlasError("--model needs --corpus and --label-field (the label of each document)")
        from .methods import model_block

        corpus = _corpus(args)
        model, tokenizer = _load(args.model, args)
        data = collect_samples(model, tokenizer, corpus, unit=args.unit, pool=args.pool, max_per_label=args.max_per_label,
                               tokens_per_window=args.tokens_per_window, max_length=args.max_length,
                               batch_size=args.batch_size, seed=args.seed)
        block = model_block(model)
    else:
        from .atlas import load_atlas
        from .neuronset import model_info

        atlas = load_atlas(args.atlas)
        data, block = from_atlas(atlas, args.pool), model_info(atlas.meta)
    found = sparse_probe(data, block, None if args.label is None else [args.label], args.against, ranking=args.ranking,
                         ks=ks, top_k=args.top_k, per_layer=args.per_layer, test_size=args.test_size, seed=args.seed,
                         l1_c=args.l1_c, probe_c=args.probe_c)
    found.params["atlas" if args.atlas else "model"] = str(args.atlas or args.model)
    report = found.params["report"]
    print(f"{'label':>8} {'layer':>5} " + " ".join(f"{'F1@' + str(p['k']):>7}" for p in report[next(iter(report))]["layers"][0]["curve"]))
    for label, info in report.items():
        layer = info["layers"][info["best_layer"]]
        print(f"{label:>8} {layer['layer']:>5} " + " ".join(f"{p['f1']:>7.3f}" for p in layer["curve"]))
    if args.report:
        _write_json(args.report, {"method": "probe", "params": {k: v for k, v in found.params.items() if k != "report"},
                                  "labels": report})
        print(f"report written to {args.report}")
    if args.plot:
        plot_curves(found, args.plot)
        print(f"plot written to {args.plot}")
    write_set(found, args.out, f"ranking {args.ranking}, best layer per label by mean F1 over k <= {args.top_k}")
    return 0


# ---- universal ----------------------------------------------------------------------------------


def _add_universal(methods) -> None:
    parser = methods.add_parser("universal", help="neurons whose activations another model (e.g. another seed) shares")
    parser.add_argument("--model", required=True, help="model A: its universal neurons form the set")
    parser.add_argument("--other", required=True, help="model B, with the same tokenizer")
    _corpus_args(parser, required=True)
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="universal when best correlation minus the rotation baseline exceeds this (default: 0.5)")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="tokens correlated (default: 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rotations (default: 0)")
    parser.add_argument("--report", default=None, help="write the shares and weight statistics to this JSON")
    _device_args(parser)
    _common(parser)
    parser.set_defaults(handler=_run_universal)


def _run_universal(args) -> int:
    from .methods.universal import find_universal

    _check_out(args.out)
    _check_out(args.report, "--report", "report JSON")
    corpus = _corpus(args)
    model_a, tokenizer = _load(args.model, args)
    model_b, tokenizer_b = _load(args.other, args)
    if tokenizer.get_vocab() != tokenizer_b.get_vocab():
        raise NeuronAtlasError(f"--model {args.model} and --other {args.other} have different tokenizers; "
                               "universal neurons need both models to read the same tokens")
    found = find_universal(model_a, model_b, tokenizer, corpus, threshold=args.threshold, seed=args.seed,
                           max_tokens=args.max_tokens, max_length=args.max_length, batch_size=args.batch_size)
    found.params["model"], found.params["other_model"] = args.model, args.other
    share = found.params["share"]
    print(f"{found.params['tokens']:,} tokens; universal: A {100 * share['a']['all']:.2f}%, B {100 * share['b']['all']:.2f}% "
          f"(per layer of A: {', '.join(f'{100 * s:.1f}%' for s in share['a']['per_layer'])})")
    print(f"medians {'statistic':>22} {'universal':>10} {'rest':>10} {'layer z':>8} {'p':>9} {'rho(excess)':>11}")
    for name, entry in found.params["statistics"].items():
        mine, rest = entry["universal"]["median"], entry["rest"]["median"]
        print(f"        {name:>22} {_number(mine):>10} {_number(rest):>10} {_number(entry['layer_z']):>8} "
              f"{_number(entry['p_value']):>9} {_number(entry['spearman_excess']):>11}")
    if args.report:
        _write_json(args.report, {"method": "universal", "params": found.params})
        print(f"report written to {args.report}")
    write_set(found, args.out, f"excess correlation > {args.threshold:g} over {found.params['tokens']:,} tokens")
    return 0


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


# ---- entropy and frequency ----------------------------------------------------------------------


def _confidence_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model id or a local model folder")
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--layers", default=None, help="layers searched, comma-separated (default: the last)")
    parser.add_argument("--top-k", type=int, default=10, help="neurons kept (default: 10)")
    parser.add_argument("--check-docs", type=int, default=40,
                        help="documents of --corpus the mean-ablation check runs on (default: 40; 0 = no check)")


def _add_entropy(methods) -> None:
    parser = methods.add_parser("entropy", help="entropy neurons: w_out in the unembedding's null space")
    _confidence_args(parser)
    _corpus_args(parser, required=False)
    parser.add_argument("--null-dims", type=int, default=None, help="null-space dimensions (default: 1%% of d_model, >= 1)")
    parser.add_argument("--norm-quantile", type=float, default=0.5, help="||w_out|| at least this quantile of its layer (default: 0.5)")
    parser.add_argument("--logit-var-quantile", type=float, default=0.5,
                        help="LogitVar at most this quantile of its layer (default: 0.5)")
    parser.add_argument("--min-null-share", type=float, default=0.0, help="null-space share at least this (default: 0)")
    _device_args(parser)
    _common(parser)
    parser.set_defaults(handler=_run_entropy)


def _run_entropy(args) -> int:
    from .methods.confidence import find_entropy

    _check_out(args.out)
    corpus = _corpus(args) if args.corpus is not None else None
    model, tokenizer = _load(args.model, args)
    found = find_entropy(model, _int_list(args.layers, "--layers"), args.null_dims, args.top_k, args.norm_quantile,
                         args.logit_var_quantile, args.min_null_share)
    found.params["model"] = args.model
    if corpus is not None and args.check_docs:
        _check(found, model, tokenizer, corpus, args, direction=None)
    write_set(found, args.out, f"{found.params['candidates']:,} candidates, null dims {found.params['null_dims']}")
    return 0


def _add_frequency(methods) -> None:
    parser = methods.add_parser("frequency", help="token-frequency neurons: W_U w_out along the log-unigram direction")
    _confidence_args(parser)
    _corpus_args(parser, required=True)
    parser.add_argument("--min-cosine", type=float, default=0.0, help="|cosine| at least this (default: 0)")
    parser.add_argument("--smoothing", type=float, default=1.0, help="count added to every token (default: 1)")
    parser.add_argument("--count-docs", type=int, default=None, help="documents counted for the unigram (default: all)")
    _device_args(parser)
    _common(parser)
    parser.set_defaults(handler=_run_frequency)


def _run_frequency(args) -> int:
    from .methods.confidence import find_frequency, unigram_direction
    from .methods.vocab import unembedding

    _check_out(args.out)
    corpus = _corpus(args)
    model, tokenizer = _load(args.model, args)
    direction = unigram_direction(tokenizer, corpus, unembedding(model).shape[0], args.smoothing, args.count_docs)
    found = find_frequency(model, direction, _int_list(args.layers, "--layers"), args.top_k, args.min_cosine)
    found.params["model"] = args.model
    if args.check_docs:
        _check(found, model, tokenizer, corpus, args, direction)
    write_set(found, args.out, f"{found.params['candidates']:,} candidates")
    return 0


def _check(found, model, tokenizer, corpus, args, direction) -> None:
    """Run the mean-ablation check; its numbers go into the set's details and a table."""
    from .methods.confidence import mean_ablation_effects

    result = mean_ablation_effects(model, tokenizer, corpus, [(n.layer, n.index) for n in found.neurons], direction,
                                   max_docs=args.check_docs, max_length=args.max_length, batch_size=args.batch_size)
    found.params["check"] = {"tokens": result["tokens"], "clean": result["clean"], "documents": args.check_docs}
    columns = ["loss_total", "loss_direct", "entropy_abs_total", "entropy_abs_direct"]
    if direction is not None:
        columns += ["projection_slope", "loss_frequency_frozen"]
    print(f"mean ablation over {result['tokens']:,} predicted tokens (changes; entropy_abs = mean |change|)")
    print(f"{'neuron':>10} " + " ".join(f"{name:>20}" for name in columns))
    for key, info in result["neurons"].items():
        found.params["details"].setdefault(key, {}).update(info)
        print(f"{key:>10} " + " ".join(f"{'-' if info[name] is None else format(info[name], '.5f'):>20}" for name in columns))
