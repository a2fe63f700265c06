"""``neuronatlas explain``: automatic explanations of neurons, simulated and scored.

    neuronatlas explain --atlas ATLAS --neurons SET.json --explainer DIR_OR_ENDPOINT --out EXPL.json

See docs/explain.md.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import NeuronAtlasError
from .args import debug_arg, load_args, model_arg, out_arg, quiet_arg


def register(commands) -> None:
    parser = commands.add_parser("explain", help="explain neurons with a language model, then simulate and score the explanations")
    parser.add_argument("--atlas", required=True, help="an atlas folder (its exemplars are explained)")
    parser.add_argument("--neurons", required=True, help="a neuron set JSON (from `neuronatlas find`)")
    out_arg(parser, "the explanations JSON to write")
    _backend_args(parser)
    parser.add_argument("--max-neurons", type=int, default=None, help="explain only the first N neurons of the set")
    parser.add_argument("--top", type=int, default=10, help="top exemplars shown to the explainer (default: 10)")
    parser.add_argument("--holdout", type=int, default=5, help="top exemplars held out for scoring (default: 5)")
    parser.add_argument("--random", type=int, default=10, help="random corpus exemplars for scoring (default: 10; 0 = none)")
    parser.add_argument("--context", type=int, default=16, help="tokens either side of an exemplar token (default: 16)")
    parser.add_argument("--clusters", type=int, default=0, metavar="K",
                        help="also group each neuron's exemplars into K clusters and explain each (default: 0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random exemplars and the clustering (default: 0)")
    model_arg(parser, required=False, help="the profiled model (default: the path recorded in the atlas)")
    parser.add_argument("--corpus", default=None, help="corpus of the random exemplars (default: the atlas's corpus)")
    load_args(parser)  # of the local models: subject, explainer and simulator
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (skips the neurons in OUT.partial.jsonl)")
    quiet_arg(parser)
    debug_arg(parser)
    parser.set_defaults(handler=run)


def _backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--explainer", required=True,
                        help="a local causal LM (folder or Hugging Face id) or the http(s) URL of an OpenAI-compatible endpoint")
    parser.add_argument("--explainer-model", default=None,
                        help="model name sent to an explainer endpoint (default: the first model it lists at GET .../models)")
    parser.add_argument("--simulator", default=None, help="like --explainer (default: the explainer)")
    parser.add_argument("--simulator-model", default=None,
                        help="model name sent to a simulator endpoint (default: --explainer-model, else the first it lists)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the endpoints' API key (default: OPENAI_API_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an endpoint's answer (default: 60)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens a local explainer may write (default: 24)")


def run(args) -> int:
    from ..atlas import load_atlas
    from ..explain import ExplainOptions, explain_neurons
    from ..explain.run import atlas_corpus, check_out
    from ..neuronset import load_neuron_set

    if args.max_neurons is not None and args.max_neurons < 1:
        raise NeuronAtlasError(f"--max-neurons must be at least 1 (got {args.max_neurons})")
    check_out(args.out, args.resume)
    atlas = load_atlas(args.atlas)
    if not atlas.meta["options"].get("top_k"):
        raise NeuronAtlasError(f"{args.atlas} keeps no exemplars (profiled with --top-k 0); profile it with --top-k above 0")
    neuron_set = load_neuron_set(args.neurons)
    neuron_set.check_model(atlas.meta["model"]["fingerprint"], atlas.widths)
    neurons = list(dict.fromkeys((n.layer, n.index) for n in neuron_set.neurons))[: args.max_neurons]
    if not neurons:
        raise NeuronAtlasError(f"{args.neurons} holds no neurons; nothing to explain")
    options = ExplainOptions(top=args.top, holdout=args.holdout, random=args.random, context=args.context,
                             clusters=args.clusters, seed=args.seed)
    options.check()
    explainer, simulator = _backends(args)
    subject = _subject(args, atlas, options)
    corpus = atlas_corpus(atlas, args.corpus) if options.random else None
    result = explain_neurons(args.atlas, neurons, explainer, simulator, args.out, options, subject=subject,
                             corpus=corpus, resume=args.resume, quiet=args.quiet, atlas=atlas)
    if not args.quiet:
        _print_summary(result)
        print(f"explanations written to {args.out}")
    return 0


def _backends(args):
    from ..explain import open_backend

    common = {"api_key_env": args.api_key_env, "timeout": args.timeout, "device": args.device, "dtype": args.dtype,
              "max_new_tokens": args.max_new_tokens, "trust_remote_code": args.trust_remote_code, "quiet": args.quiet}
    explainer = _announced(open_backend(args.explainer, args.explainer_model, **common), "explainer", args.quiet)
    if args.simulator is None or (args.simulator == args.explainer and args.simulator_model in (None, args.explainer_model)):
        return explainer, explainer
    simulator = open_backend(args.simulator, args.simulator_model or args.explainer_model, **common)
    return explainer, _announced(simulator, "simulator", args.quiet)


def _announced(backend, role: str, quiet: bool):
    """``backend``, after saying on stderr which model an endpoint given without a name will use."""
    if getattr(backend, "discovered", False) and not quiet:
        print(f"neuronatlas: {role}: no model name given, using {backend.name} (the first model it lists)", file=sys.stderr)
    return backend


def _subject(args, atlas, options):
    """The profiled model, when random exemplars or unrecorded exemplar activations need it."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from ..explain import load_subject

    file = Path(args.atlas) / "exemplars.parquet"
    recorded = file.exists() and "window_activations" in pq.read_schema(file).names
    if options.random == 0 and recorded and args.model is None:
        return None
    return load_subject(atlas, args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _print_summary(result: dict) -> None:
    def shown(value):
        return "   n/a" if value is None else f"{value:+.3f}"

    print(f"{'neuron':>10} {'score':>6} {'top':>6} {'random':>6}  explanation")
    for record in result["neurons"]:
        name = f"{record['layer']}/{record['index']}"
        print(f"{name:>10} {shown(record['score'])} {shown(record['score_top'])} {shown(record['score_random'])}  {record['explanation']}")
