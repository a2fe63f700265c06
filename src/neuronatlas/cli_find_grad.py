"""``neuronatlas find attribution | ig | atp | cett``: gradient-based ways to find neurons.

:func:`add_find_commands` adds the four methods to the ``find`` command's sub-subparsers. Each
loads a model, writes a neuron set JSON (``--out``) and prints a short summary. Torch-heavy modules
are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_sets import write_set
from .errors import NeuronAtlasError


def add_find_commands(methods) -> None:
    """Add ``attribution``, ``ig``, ``atp`` and ``cett`` to the subparsers of ``neuronatlas find``."""
    _add_attribution(methods)
    _add_ig(methods)
    _add_atp(methods)
    _add_cett(methods)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model id or a local model folder")
    parser.add_argument("--out", required=True, help="the neuron set JSON to write")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _check_out(out: str) -> None:
    if Path(out).is_dir():
        raise NeuronAtlasError(f"--out {out} is a folder; give the path of the neuron set JSON file to write")


def _load(args):
    from .loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      quiet=True)


def _save(found, args, extra: str) -> None:
    found.params["model"] = args.model
    write_set(found, args.out, extra)


def _layers(text: str | None) -> list[int] | None:
    if text is None or text == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NeuronAtlasError(f"--layers {text!r} is not a comma-separated list of layer numbers (or 'all')") from None


# ---- attribution --------------------------------------------------------------------------------


def _add_attribution(methods) -> None:
    parser = methods.add_parser("attribution", help="per-label neurons by activation x gradient of the text's next tokens")
    parser.add_argument("--corpus", required=True, help="a labelled corpus (.jsonl/.csv/.parquet ...)")
    parser.add_argument("--label-field", required=True, help="field or column holding the label (e.g. lang)")
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    parser.add_argument("--control", default=None, help="a control corpus (default: the other labels' text)")
    parser.add_argument("--labels", default=None, help="comma-separated labels to find neurons for (default: all)")
    parser.add_argument("--top-rate", type=float, default=0.01, help="share of all neurons kept per label (default: 0.01)")
    parser.add_argument("--target", default="logprob", choices=["logprob", "prob"],
                        help="differentiate the mean log-probability or probability of the next tokens (default: logprob)")
    parser.add_argument("--pool", default="max", choices=["max", "mean", "sum"],
                        help="pool a x grad over a window's positions (default: max, as CULNIG)")
    parser.add_argument("--no-clamp-control", action="store_true", help="subtract negative control scores too")
    parser.add_argument("--exclude", default=None, help="a neuron set (of this model) whose neurons are never kept")
    parser.add_argument("--max-docs-per-label", type=int, default=None, help="documents read per label (default: all)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    _common(parser)
    parser.set_defaults(handler=_run_attribution)


def _run_attribution(args) -> int:
    from .corpus import read_corpus
    from .methods.attribution import find_attribution
    from .neuronset import load_neuron_set

    _check_out(args.out)
    corpus = read_corpus(args.corpus, text_field=args.text_field, label_field=args.label_field)
    exclude = load_neuron_set(args.exclude) if args.exclude else None
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    model, tokenizer = _load(args)
    found = find_attribution(model, tokenizer, corpus, control=args.control, labels=labels, top_rate=args.top_rate,
                             target=args.target, pool=args.pool, clamp_control=not args.no_clamp_control,
                             exclude=exclude, max_docs_per_label=args.max_docs_per_label,
                             max_length=args.max_length, batch_size=args.batch_size, quiet=args.quiet)
    _save(found, args, f"target {args.target}, pool {args.pool}, control {found.params['control']}")
    return 0


# ---- integrated gradients -----------------------------------------------------------------------


def _add_ig(methods) -> None:
    parser = methods.add_parser("ig", help="knowledge neurons of facts by integrated gradients (Dai et al.)")
    parser.add_argument("--facts", required=True, help='JSONL: {"fact" (or "id"), "prompt", "answer"}, several prompts per fact')
    parser.add_argument("--steps", type=int, default=20, help="integration steps m from the zero baseline (default: 20)")
    parser.add_argument("--threshold", type=float, default=0.2,
                        help="keep IG >= this x the prompt's largest IG (default: 0.2)")
    parser.add_argument("--share", type=float, default=0.7, help="keep neurons of at least this share of a fact's prompts (default: 0.7)")
    parser.add_argument("--layers", default=None, help="comma-separated layers to attribute (default: all)")
    parser.add_argument("--min-paraphrases", type=int, default=2, help="prompts each fact needs (default: 2)")
    parser.add_argument("--target-count", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="move the share by 0.05 until each fact has LOW..HIGH neurons (the paper: 2 5)")
    parser.add_argument("--check", action="store_true",
                        help="zero each fact's neurons; print P(answer)'s relative drop on its own vs other facts")
    _common(parser)
    parser.set_defaults(handler=_run_ig)


def _run_ig(args) -> int:
    from .methods.ig import find_knowledge_neurons, group_facts, knowledge_check, read_facts

    _check_out(args.out)
    facts = read_facts(args.facts)
    group_facts(facts, args.min_paraphrases)  # fail before loading the model
    model, tokenizer = _load(args)
    found = find_knowledge_neurons(model, tokenizer, facts, steps=args.steps, threshold=args.threshold,
                                   share=args.share, layers=_layers(args.layers), min_paraphrases=args.min_paraphrases,
                                   target_count=tuple(args.target_count) if args.target_count else None,
                                   quiet=args.quiet)
    if args.check and len(found):
        check = knowledge_check(model, tokenizer, facts, found)
        found.params["check"] = check
        ratio = "n/a" if check["ratio"] is None else f"{check['ratio']:.1f}"
        print(f"zeroing a fact's neurons: P(answer) drops {100 * check['own']:.1f}% on its own prompts, "
              f"{100 * check['others']:.1f}% on other facts' (ratio {ratio})")
    _save(found, args, f"{len(found.labels)} facts with neurons, {args.steps} steps, threshold {args.threshold:g}, "
                       f"share {args.share:g}")
    return 0


# ---- attribution patching -----------------------------------------------------------------------


def _add_atp(methods) -> None:
    parser = methods.add_parser("atp", help="neurons that matter for clean vs corrupted prompts, by attribution patching")
    parser.add_argument("--pairs", required=True, help='JSONL: {"clean", "corrupt", "target", "foil"?}, same token length')
    parser.add_argument("--metric", default=None, choices=["logit_diff", "logprob"],
                        help="logit(target) - logit(foil), or log P(target) (default: logit_diff when every pair has a foil)")
    parser.add_argument("--top-k", type=int, default=100, help="neurons kept by |estimate| (default: 100)")
    parser.add_argument("--graddrop", action="store_true", help="AtP* GradDrop: one extra pass per layer")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="patch the N highest and N lowest neurons for real; Spearman into the set's params")
    _common(parser)
    parser.set_defaults(handler=_run_atp)


def _run_atp(args) -> int:
    from .methods.atp import find_atp, read_pairs

    _check_out(args.out)
    pairs = read_pairs(args.pairs)
    model, tokenizer = _load(args)
    found = find_atp(model, tokenizer, pairs, metric=args.metric, top_k=args.top_k, graddrop=args.graddrop,
                     verify=args.verify, quiet=args.quiet)
    extra = f"metric {found.params['metric']} over {len(pairs)} pairs" + (", GradDrop" if args.graddrop else "")
    if "verify" in found.params:
        check = found.params["verify"]
        extra += f"; Spearman {check['spearman']:.3f} with real patching of {len(check['neurons'])} neurons"
    _save(found, args, extra)
    return 0


# ---- CETT ---------------------------------------------------------------------------------------


def _add_cett(methods) -> None:
    parser = methods.add_parser("cett", help="neurons whose share of the FFN output predicts a binary label (H-Neurons)")
    parser.add_argument("--data", required=True, help='JSONL: a label and "text", or "prompt" + "answer"')
    parser.add_argument("--label-field", default="label", help="field holding the label (default: label)")
    parser.add_argument("--positive", required=True, help="the label the classifier predicts (e.g. hallucinated)")
    parser.add_argument("--negative", default=None, help="the other label (default: every other label)")
    parser.add_argument("--pool", default="mean", choices=["mean", "max"], help="pool CETT over answer tokens (default: mean)")
    parser.add_argument("--C", dest="c", type=float, default=None, help="inverse L1 strength (default: grid search)")
    parser.add_argument("--test-size", type=float, default=0.3, help="held-out share (default: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="split and solver seed (default: 0)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")
    _common(parser)
    parser.set_defaults(handler=_run_cett)


def _run_cett(args) -> int:
    from .methods.cett import find_cett, read_examples

    _check_out(args.out)
    records = read_examples(args.data, args.label_field)
    model, tokenizer = _load(args)
    found = find_cett(model, tokenizer, records, args.positive, label_field=args.label_field, negative=args.negative,
                      pool=args.pool, c=args.c, test_size=args.test_size, seed=args.seed, max_length=args.max_length)
    p = found.params
    _save(found, args, f"held-out accuracy {p['test_accuracy']:.3f} (chance {p['chance']:.3f}), AUROC "
                       f"{p['test_auroc']:.3f}, C {p['C']:g}; scale them with intervene --op scale")
    return 0
