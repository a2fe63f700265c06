"""``neuronatlas explain``: automatic explanations of neurons, simulated and scored.

    neuronatlas explain --atlas ATLAS --neurons SET.json --explainer DIR_OR_ENDPOINT --out EXPL.json \
        [--scorers detection,fuzzing,simulation] [--samples N]

See docs/explain.md.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import NeuronAtlasError
from .args import debug_arg, load_args, model_arg, nonnegative_float, out_arg, positive_float, quiet_arg
from .common import preflight_output


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
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random exemplars, the clustering, sampled explanations and fuzzing marks (default: 0)")
    _scoring_args(parser)
    model_arg(parser, required=False, help="the profiled model (default: the path recorded in the atlas)")
    parser.add_argument("--corpus", default=None, help="corpus of the random exemplars (default: the atlas's corpus)")
    load_args(parser)  # of the local models: subject, explainer and simulator
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (skips the neurons in OUT.partial.jsonl)")
    quiet_arg(parser)
    debug_arg(parser)
    parser.set_defaults(handler=run)


def _scoring_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorers", default="detection,fuzzing,simulation",
                        help="comma-separated scorers among detection, fuzzing, simulation; the first ranks --samples "
                             "candidates (default: detection,fuzzing,simulation)")
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="explanations sampled per neuron; the best on the held-out contexts is kept (default: 1)")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.7, help="sampling temperature when --samples > 1 (default: 0.7)")
    parser.add_argument("--active", type=float, default=0.25,
                        help="a token counts as active at this fraction of the neuron's top shown activation (default: 0.25)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the baseline (another neuron's explanation scored on each neuron's contexts)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass of a local scorer (default: 8)")
    parser.add_argument("--scoring-contexts", choices=("samples", "exemplars"), default="samples",
                        help="contexts the explanations are scored on: samples from every quantile band of the activation "
                             "range and non-activating ones (neuronatlas.samples), or held-out top and random exemplars "
                             "(default: samples)")
    parser.add_argument("--bands", type=int, default=10, help="samples: quantile bands of the activation range (default: 10)")
    parser.add_argument("--per-band", type=int, default=2, help="samples: contexts drawn from each band (default: 2)")
    parser.add_argument("--non-activating", type=int, default=20,
                        help="samples: contexts where the neuron does not fire (default: 20)")
    parser.add_argument("--sample-docs", type=int, default=256, help="samples: corpus documents the sampling pass reads (default: 256)")


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
    parser.add_argument("--timeout", type=positive_float, default=60.0, help="seconds to wait for an endpoint's answer (default: 60)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens a local explainer may write (default: 24)")


def run(args) -> int:
    from ..atlas import load_atlas
    from ..explain import ExplainOptions, explain_neurons
    from ..explain.run import atlas_corpus, check_out
    from ..neuronset import load_neuron_set

    if args.max_neurons is not None and args.max_neurons < 1:
        raise NeuronAtlasError(f"--max-neurons must be at least 1 (got {args.max_neurons})")
    preflight_output(args.out, "file", overwrite=None, what="explanations JSON")
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
                             clusters=args.clusters, seed=args.seed, scorers=_names(args.scorers), samples=args.samples,
                             temperature=args.temperature, active=args.active, baseline=args.baseline,
                             contexts=args.scoring_contexts, bands=args.bands, per_band=args.per_band,
                             non_activating=args.non_activating, sample_docs=args.sample_docs)
    options.check()
    explainer, simulator = _backends(args)
    subject = _subject(args, atlas, options)
    corpus = atlas_corpus(atlas, args.corpus) if options.random or options.contexts == "samples" else None
    result = explain_neurons(args.atlas, neurons, explainer, simulator, args.out, options, subject=subject,
                             corpus=corpus, resume=args.resume, quiet=args.quiet, atlas=atlas)
    if not args.quiet:
        _print_summary(result)
        print(f"explanations written to {args.out}")
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _backends(args):
    from ..explain import open_backend

    common = {"api_key_env": args.api_key_env, "timeout": args.timeout, "device": args.device, "dtype": args.dtype,
              "max_new_tokens": args.max_new_tokens, "trust_remote_code": args.trust_remote_code, "quiet": args.quiet,
              "batch_size": args.batch_size}
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
    """The profiled model, when samples, random exemplars or unrecorded exemplar activations need it."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from ..exemplar_windows import has_windows
    from ..explain import load_subject

    file = Path(args.atlas) / "exemplars.parquet"
    recorded = file.exists() and has_windows(pq.read_schema(file).names)
    if options.contexts == "exemplars" and options.random == 0 and recorded and args.model is None:
        return None
    return load_subject(atlas, args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _print_summary(result: dict) -> None:
    """One line per neuron: each scorer's score (and a classifier's AUROC) and, after the slash, its
    shuffled baseline."""
    def shown(value):
        return "  n/a" if value is None else f"{value:+.2f}"

    first = next((r["scores"] for r in result["neurons"] if r.get("scores")), {})
    columns = [(name, key) for name, values in first.items() for key in ("score", "auc") if key in values]
    baselines = {"score": "baseline", "auc": "baseline_auc"}
    heads = [name[:11] if key == "score" else f"{name[:7]} auc" for name, key in columns]
    print(f"{'neuron':>10} " + " ".join(f"{head:>11}" for head in heads) + "  explanation")
    for record in result["neurons"]:
        scores = record.get("scores") or {}
        cells = [f"{shown(scores.get(n, {}).get(k))}/{shown(scores.get(n, {}).get(baselines[k]))}" for n, k in columns]
        name = f"{record['layer']}/{record['index']}"
        print(f"{name:>10} " + " ".join(f"{c:>11}" for c in cells) + f"  {record['explanation']}")
    if columns:
        print("(score/baseline: the baseline is another neuron's explanation scored on the same contexts; "
              "detection and fuzzing: balanced accuracy, and AUROC in the auc columns)")
