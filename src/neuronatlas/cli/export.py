"""``neuronatlas export``: an atlas in another tool's format.

    neuronatlas export neuronpedia ATLAS --out DIR [--explanations EXPL.json] [--neurons SET.json]

See docs/export.md.
"""

from __future__ import annotations

from .args import atlas_positional, debug_arg, load_args, model_arg


def register(commands) -> None:
    parser = commands.add_parser("export", help="write an atlas (and its explanations) in another tool's format")
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    neuronpedia = formats.add_parser("neuronpedia", help="Neuronpedia's import folders: neurons, activations, explanations")
    atlas_positional(neuronpedia)
    neuronpedia.add_argument("--out", required=True, help="the folder to write (made when missing)")
    neuronpedia.add_argument("--explanations", default=None, help="an explanations JSON from `neuronatlas explain`")
    neuronpedia.add_argument("--neurons", default=None,
                             help="a neuron set JSON (default: the explained neurons, else every neuron with exemplars)")
    neuronpedia.add_argument("--model-id", default=None, help="Neuronpedia model id (default: from the model's name)")
    neuronpedia.add_argument("--source-set", default="neurons", help="source set name; a layer's source is LAYER-SET (default: neurons)")
    neuronpedia.add_argument("--creator-id", default="neuronatlas", help="the Neuronpedia user id the rows name (default: neuronatlas)")
    neuronpedia.add_argument("--creator-name", default="neuronatlas", help="creator name shown by Neuronpedia (default: neuronatlas)")
    neuronpedia.add_argument("--context", type=int, default=16, help="tokens either side of an exemplar token (default: 16)")
    model_arg(neuronpedia, required=False, help="the profiled model, for atlases without recorded exemplar windows")
    load_args(neuronpedia)
    debug_arg(neuronpedia)
    neuronpedia.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from ..atlas import load_atlas
    from ..errors import NeuronAtlasError
    from ..explain import load_subject
    from ..exemplar_windows import has_windows
    from ..explain.exemplars import atlas_tokenizer
    from ..export import export_neuronpedia
    from ..export.neuronpedia import read_explanations
    from ..neuronset import load_neuron_set

    if Path(args.out).is_file():
        raise NeuronAtlasError(f"--out {args.out} is a file; give a folder to write the export into")
    if args.context < 0:
        raise NeuronAtlasError(f"--context must be 0 or more (got {args.context})")
    atlas = load_atlas(args.atlas)
    if not atlas.meta["options"].get("top_k"):
        raise NeuronAtlasError(f"{args.atlas} keeps no exemplars (profiled with --top-k 0); profile it with --top-k above 0")
    neurons = None
    if args.neurons:
        neuron_set = load_neuron_set(args.neurons)
        neuron_set.check_model(atlas.meta["model"]["fingerprint"], atlas.widths)
        neurons = list(dict.fromkeys((n.layer, n.index) for n in neuron_set.neurons))
    explanations = read_explanations(args.explanations, atlas) if args.explanations else None
    recorded = has_windows(pq.read_schema(Path(args.atlas) / "exemplars.parquet").names)
    subject = None if recorded and args.model is None else load_subject(
        atlas, args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = subject.tokenizer if subject is not None else atlas_tokenizer(atlas, args.model, args.trust_remote_code)
    result = export_neuronpedia(args.atlas, atlas, args.out, neurons, explanations, model_id=args.model_id,
                                source_set=args.source_set, creator_id=args.creator_id, creator_name=args.creator_name,
                                subject=subject, tokenizer=tokenizer, context=args.context)
    print(f"{result['neurons']} neurons, {result['activations']} activations, {result['explanations']} explanations "
          f"written to {len(result['folders'])} source folder(s) under {args.out}")
    return 0
