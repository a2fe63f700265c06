"""``neuronatlas steer``: steer generation from one language to another with language neurons.

    neuronatlas steer --model DIR --atlas ATLAS --sets SET.json --from A --to B --corpus FILE.jsonl \\
        [--prompts N] [--calibration 10] [--mode add|replace|diff] [--strength auto|LAMBDA] [--max-new-tokens 20] [--json OUT]

The first --calibration documents of the source language give the calibration prompts of the
strength search (``--strength auto``); the next --prompts documents give the reported prompts.
"""

from __future__ import annotations

import argparse
import math

from ..errors import NeuronAtlasError
from .args import corpus_args, debug_arg, model_args, quiet_arg
from .common import check_causal_model, load_model_from, preflight_output, read_corpus_from, write_json

# The defaults of neuronatlas.steer, repeated here so that building the parser imports no torch
# (a test checks they agree).
DEFAULT_DEACTIVATE = "auto"
DEFAULT_STRENGTH = "auto"
DEFAULT_CALIBRATION = 10
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_PROMPT_WORDS = 4


def register(commands) -> None:
    parser = commands.add_parser(
        "steer", help="steer generation from one language to another with language neurons",
        description="Language Arithmetics: during greedy generation from source-language prompts, set the source "
                    "language's neurons to a constant and add (or set) the target language's mean activation at "
                    "its neurons; report the share of continuations a language identifier puts in the target.",
    )
    model_args(parser)
    parser.add_argument("--atlas", required=True, help="the model's atlas (for the target's mean activations)")
    parser.add_argument("--sets", required=True, help="a neuron set JSON with language labels (e.g. from find lape)")
    parser.add_argument("--from", dest="source", required=True, help="the source language (label)")
    parser.add_argument("--to", dest="target", required=True, help="the target language (label)")
    corpus_args(parser, help="labelled text to take source-language prompts from (e.g. the held-out corpus)", formats=True)
    parser.add_argument("--prompts", type=int, default=20, help="number of prompts (default: 20)")
    parser.add_argument("--prompt-words", type=int, default=DEFAULT_PROMPT_WORDS,
                        help=f"words of each document used as its prompt (default: {DEFAULT_PROMPT_WORDS})")
    parser.add_argument("--mode", default="add", choices=["add", "replace", "diff"], help="how to activate the target (default: add)")
    parser.add_argument("--strength", type=_strength, default=DEFAULT_STRENGTH,
                        help="lambda of mode add/diff (a += lambda * mean_target), or 'auto': the smallest of a grid "
                             "that flips 80%% of the calibration prompts with fluent text (default: auto)")
    parser.add_argument("--calibration", type=int, default=DEFAULT_CALIBRATION,
                        help=f"calibration prompts of --strength auto, taken before the reported ones "
                             f"(default: {DEFAULT_CALIBRATION})")
    parser.add_argument("--deactivate", default=DEFAULT_DEACTIVATE,
                        help="constant the source neurons are set to, 'none', or 'auto': searched with the strength "
                             "on the calibration prompts, the paper's -2.5 first, then 0, then none (default: auto)")
    parser.add_argument("--signal", default=None, choices=["z", "gate"],
                        help="default: the one the set was selected on, else gate for gated families, else z")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--examples", type=int, default=3, help="examples to print (default: 3)")
    parser.add_argument("--json", default=None, help="write the full result (all continuations) as JSON to OUT")
    quiet_arg(parser, "print only the result lines")
    debug_arg(parser)
    parser.set_defaults(handler=run)


def _deactivate_value(text: str) -> float | str | None:
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise NeuronAtlasError(f"--deactivate must be a number, 'none' or 'auto', not {text!r}") from None


def _strength(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        strength = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', not {text!r}") from None
    if not math.isfinite(strength):
        raise argparse.ArgumentTypeError(f"must be a finite number or 'auto', not {text}")
    return strength


def run(args) -> int:
    from ..atlas import load_atlas
    from ..neuronset import load_neuron_set
    from ..steer import PAPER_DEACTIVATE, format_steering, prompts_from_corpus, steer, steering_interventions

    preflight_output(args.json, "file", overwrite=True, what="steering JSON", flag="--json")
    check_causal_model(args, "steer", "text generation")  # from the config: before the corpus and the weights
    deactivate = _deactivate_value(args.deactivate)
    neuron_set = load_neuron_set(args.sets)
    atlas = load_atlas(args.atlas)
    for label, flag in ((args.source, "--from"), (args.target, "--to")):
        neuron_set.require_label(label, flag)
        atlas.label_index(label)
    steering_interventions(neuron_set, args.source, args.target, args.mode,  # checks before the prompts
                           PAPER_DEACTIVATE if deactivate == "auto" else deactivate)
    label_field = args.label_field or atlas.meta.get("corpus", {}).get("label_field") or "lang"
    corpus = read_corpus_from(args, label_field=label_field)
    calibration = None
    if (args.strength == "auto" and args.mode != "replace") or deactivate == "auto":
        if args.calibration < 1:
            raise NeuronAtlasError(f"--strength auto and --deactivate auto need at least 1 calibration prompt "
                                   f"(--calibration), not {args.calibration}")
        calibration = prompts_from_corpus(corpus, args.source, args.calibration, args.prompt_words)
    skip = len(calibration) if calibration else 0
    prompts = prompts_from_corpus(corpus, args.source, args.prompts, args.prompt_words, skip=skip)
    model, tokenizer = load_model_from(args)
    result = steer(
        model, tokenizer, atlas, neuron_set, args.source, args.target, prompts, mode=args.mode,
        deactivate_value=deactivate, strength=args.strength, max_new_tokens=args.max_new_tokens,
        signal=args.signal, calibration_prompts=calibration,
    )
    result["params"]["prompt_words"] = args.prompt_words
    print(format_steering(result, examples=0 if args.quiet else args.examples))
    if args.json:
        write_json(args.json, result)
    return 0
