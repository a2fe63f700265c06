"""CLI verbs that prove what neurons do: ``neuronatlas evaluate`` and ``neuronatlas steer``.

    neuronatlas evaluate --model DIR --sets SET.json --corpus FILE.jsonl --text-field text \\
        --label-field lang --out EVAL.json [--controls 5]
    neuronatlas steer --model DIR --atlas ATLAS --sets SET.json --from A --to B --corpus FILE.jsonl \\
        [--prompts N] [--mode add|replace] [--strength 1.0] [--max-new-tokens 20] [--json OUT]

Handlers import the heavy modules inside the function, so ``neuronatlas --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import NeuronAtlasError


def register(commands) -> None:
    """Add the evaluate and steer subcommands to the CLI's subparsers."""
    _add_evaluate(commands)
    _add_steer(commands)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model id or a local model folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def _corpus_args(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--corpus", required=True, help=help)
    parser.add_argument("--text-field", default="text", help="field or column holding the text (default: text)")
    parser.add_argument("--label-field", default=None, help="field or column holding the label, e.g. lang")
    parser.add_argument("--format", default=None, choices=["txt", "jsonl", "csv", "parquet", "dataset", "folder"],
                        help="corpus format (default: from the suffix)")


def _tail(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print only the result lines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


# ---- evaluate ---------------------------------------------------------------------------------


def _add_evaluate(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="ablate each label's neurons and measure every label's NLL, against random controls",
        description="The causal check: for each label L of the neuron set, ablate L's neurons (all layers) and "
                    "measure the mean token NLL on held-out text of every label; compare with random sets of the "
                    "same per-layer sizes on L's text.",
    )
    _model_args(parser)
    parser.add_argument("--sets", required=True, help="a neuron set JSON with labels (e.g. from find lape)")
    _corpus_args(parser, "held-out text with labels (.jsonl/.csv/.parquet/...)")
    parser.add_argument("--out", required=True, help="where to write EVAL.json")
    parser.add_argument("--controls", type=int, default=5, help="random control sets per label (default: 5; 0 = none)")
    parser.add_argument("--op", default="zero", choices=["zero", "mean", "constant", "scale"],
                        help="how to ablate (default: zero)")
    parser.add_argument("--value", type=float, default=None, help="the value of --op constant / scale")
    parser.add_argument("--atlas", default=None, help="the model's atlas (needed by --op mean)")
    parser.add_argument("--signal", default="z", choices=["z", "gate"], help="the signal to ablate (default: z)")
    parser.add_argument("--max-docs-per-label", type=int, default=None, help="use at most N documents per label")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per window (default: min(model positions, 256))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random control sets (default: 0)")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to PATH")
    parser.add_argument("--heatmap", default=None, help="also write a heatmap PNG to PATH")
    _tail(parser)
    parser.set_defaults(handler=run_evaluate)


def _load_set(path: str):
    from .neuronset import load_neuron_set

    return load_neuron_set(path)


def run_evaluate(args) -> int:
    from .distributed import refuse_distributed

    refuse_distributed("evaluate")
    from .corpus import read_corpus
    from .evaluate import check_causal_lm, evaluate, format_matrix, plot_heatmap, to_markdown
    from .loading import load_config, load_model, model_fingerprint
    from .models import locate_neurons

    neuron_set = _load_set(args.sets)
    if not neuron_set.labels:
        raise NeuronAtlasError(f"neuron set {args.sets} has no labels; evaluate needs labelled neurons (e.g. from find lape)")
    corpus = read_corpus(args.corpus, text_field=args.text_field, label_field=args.label_field, format=args.format)
    if args.label_field is None:
        raise NeuronAtlasError("evaluate needs labelled text: pass --label-field (e.g. --label-field lang)")
    config = load_config(args.model, args.trust_remote_code)
    if config.model_type in ("bert", "roberta") or getattr(config, "is_encoder_decoder", False):
        raise NeuronAtlasError(
            f"evaluate measures next-token NLL, which needs a causal (decoder-only) language model; "
            f"{config.model_type} is an encoder (masked LM): use a decoder model such as llama or gpt2"
        )
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code, quiet=True)
    check_causal_lm(model)
    neuron_set.check_model(model_fingerprint(model), locate_neurons(model).widths)
    atlas = None
    if args.atlas:
        from .atlas import load_atlas

        atlas = load_atlas(args.atlas)
    result = evaluate(
        model, tokenizer, neuron_set, corpus, controls=args.controls, op=args.op,
        max_docs_per_label=args.max_docs_per_label, seed=args.seed, atlas=atlas, value=args.value,
        signal=args.signal, batch_size=args.batch_size, max_length=args.max_length, check_fingerprint=False,
        quiet=args.quiet,
    )
    result["neuron_set"]["path"] = str(args.sets)
    result["model"]["name_or_path"] = args.model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(to_markdown(result))
    if args.heatmap:
        plot_heatmap(result, args.heatmap)
    print(format_matrix(result))
    if not args.quiet:
        print(f"evaluation written to {out} ({result['seconds']:.1f} s)")
    return 0


# ---- steer ------------------------------------------------------------------------------------


# The defaults of neuronatlas.steer, repeated here so that building the parser imports no torch
# (a test checks they agree).
DEFAULT_DEACTIVATE = -2.5
DEFAULT_STRENGTH = 7.0
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_PROMPT_WORDS = 4


def _add_steer(commands) -> None:
    parser = commands.add_parser(
        "steer", help="steer generation from one language to another with language neurons",
        description="Language Arithmetics: during greedy generation from source-language prompts, set the source "
                    "language's neurons to a constant and add (or set) the target language's mean activation at "
                    "its neurons; report the share of continuations a language identifier puts in the target.",
    )
    _model_args(parser)
    parser.add_argument("--atlas", required=True, help="the model's atlas (for the target's mean activations)")
    parser.add_argument("--sets", required=True, help="a neuron set JSON with language labels (e.g. from find lape)")
    parser.add_argument("--from", dest="source", required=True, help="the source language (label)")
    parser.add_argument("--to", dest="target", required=True, help="the target language (label)")
    _corpus_args(parser, "labelled text to take source-language prompts from (e.g. the held-out corpus)")
    parser.add_argument("--prompts", type=int, default=20, help="number of prompts (default: 20)")
    parser.add_argument("--prompt-words", type=int, default=DEFAULT_PROMPT_WORDS,
                        help=f"words of each document used as its prompt (default: {DEFAULT_PROMPT_WORDS})")
    parser.add_argument("--mode", default="add", choices=["add", "replace", "diff"], help="how to activate the target (default: add)")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                        help=f"lambda of mode add/diff: a += lambda * mean_target (default: {DEFAULT_STRENGTH})")
    parser.add_argument("--deactivate", default=str(DEFAULT_DEACTIVATE),
                        help=f"constant the source neurons are set to, or 'none' (default: {DEFAULT_DEACTIVATE})")
    parser.add_argument("--signal", default=None, choices=["z", "gate"], help="default: gate for gated families, else z")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--examples", type=int, default=3, help="examples to print (default: 3)")
    parser.add_argument("--langid", default=None, help="a saved language identifier (.npz); default: train one")
    parser.add_argument("--langid-corpus", default=None,
                        help="labelled corpus to train the language identifier on (default: the atlas's corpus)")
    parser.add_argument("--json", default=None, help="write the full result (all continuations) as JSON to OUT")
    _tail(parser)
    parser.set_defaults(handler=run_steer)


def _deactivate_value(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise NeuronAtlasError(f"--deactivate must be a number or 'none', not {text!r}") from None


def run_steer(args) -> int:
    from .atlas import load_atlas
    from .corpus import read_corpus
    from .langid import LangId, train_langid
    from .loading import load_model
    from .steer import format_steering, langid_for_atlas, prompts_from_corpus, steer

    deactivate = _deactivate_value(args.deactivate)
    neuron_set = _load_set(args.sets)
    atlas = load_atlas(args.atlas)
    for label, flag in ((args.source, "--from"), (args.target, "--to")):
        if label not in neuron_set.labels:
            raise NeuronAtlasError(
                f"unknown label {label!r} for {flag}; the neuron set has labels: {', '.join(neuron_set.labels) or 'none'}"
            )
        atlas.label_index(label)
    label_field = args.label_field or atlas.meta.get("corpus", {}).get("label_field") or "lang"
    corpus = read_corpus(args.corpus, text_field=args.text_field, label_field=label_field, format=args.format)
    prompts = prompts_from_corpus(corpus, args.source, args.prompts, args.prompt_words)
    if args.langid:
        langid = LangId.load(args.langid)
    elif args.langid_corpus:
        langid = train_langid(read_corpus(args.langid_corpus, text_field=args.text_field, label_field=label_field))
    else:
        langid = langid_for_atlas(atlas)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.trust_remote_code, quiet=True)
    result = steer(
        model, tokenizer, atlas, neuron_set, args.source, args.target, prompts, mode=args.mode,
        deactivate_value=deactivate, strength=args.strength, max_new_tokens=args.max_new_tokens,
        signal=args.signal, langid=langid,
    )
    result["params"]["prompt_words"] = args.prompt_words
    print(format_steering(result, examples=0 if args.quiet else args.examples))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0
