"""What a profile records and how it batches: the options, their checks, and the metadata they
resolve to (saved in atlas.json and in every checkpoint, and compared on ``--resume``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .. import __version__
from ..atlas import FORMAT_VERSION, default_position_edges
from ..corpus import Corpus
from ..docpool import POOLS
from ..errors import NeuronAtlasError
from ..exemplar_windows import DEFAULT_BITS, DEFAULT_RADIUS
from ..loading import gguf_source, model_fingerprint, window_length
from ..models import ModelNeurons
from ..stats import default_hist_edges

UNLABELLED = "all"  # the one label of a corpus profiled without labels
DEFAULT_MAX_LENGTH = 512
RUN_ONLY = ("stat_threads",)  # options that change how fast, not what: not in the atlas, free to change on resume


@dataclass
class ProfileOptions:
    """What a profile records and how it batches; all but ``device`` must match on resume."""

    batch_size: int = 8  # windows per forward pass
    max_length: int | None = None  # tokens per window; None = min(model positions, 512)
    threshold: float = 0.0  # a neuron is active on a token when its activation > threshold
    top_k: int = 20  # exemplars kept per neuron
    bottom_k: int = 10  # most negative exemplars of z kept per neuron (those below zero are saved); 0 = none
    gate: bool = True  # also count the gate signal act(gate(x)) of gated families
    padding_side: str = "right"
    dtype: str = "float32"
    hist_edges: list[float] = field(default_factory=lambda: default_hist_edges().tolist())
    positions: bool = True  # also keep z per position bucket
    position_edges: list[int] | None = None  # lower bucket edges; None = 0, 1, 2, 3, 4, 8, 16, ... < max_length
    doc_sample: int | None = None  # documents per label whose pooled z is kept; None = auto (auto_doc_sample); 0 = none
    doc_pools: list[str] = field(default_factory=lambda: ["mean"])  # pools of z over a document kept: mean, max
    doc_format: str = "ranks"  # the sample on disk: uint8 rank codes, or float16 values (which merge can join)
    exemplar_radius: int = DEFAULT_RADIUS  # z kept this many tokens either side of each exemplar; 0 = none
    window_bits: int = DEFAULT_BITS  # bits a value of those windows, 2-8 (see exemplar_windows)
    stat_threads: int = 0  # intra-op threads of the statistics; 0 = auto (see worker.placement)
    bucket_batches: int = 8  # batches whose windows are batched by length (corpus.by_length); 1 = corpus order
    batch_tokens: int | None = None  # more windows join a batch while it holds at most this many padded tokens; None = auto


BATCH_BYTES = 4 * 2**20  # auto batch_tokens: a batch's z of the widest layer in float32 stays within 4 MiB (cache)
AUTO_BATCH_TOKENS_MAX = 16_384  # and a toy model's batches stay bounded (its attention scores grow with rows x T^2)


DOC_FORMATS = ("ranks", "float16")
DOC_SAMPLE_TOTAL = 512  # auto doc_sample: the sample holds about this many documents over all labels,
DOC_SAMPLE_RANGE = (32, 256)  # with this many a label at least and at most


def auto_doc_sample(labels: int) -> int:
    """Documents per label of the default document sample: DOC_SAMPLE_TOTAL shared by the labels,
    within DOC_SAMPLE_RANGE. The sample is the only part of an atlas that grows with the corpus (a
    byte a document and neuron a pool): bounded, an atlas stays near 2 KB a neuron (5 labels: 102 a
    label, 2: 256; from 17 labels on, 32 a label)."""
    low, high = DOC_SAMPLE_RANGE
    return max(low, min(high, DOC_SAMPLE_TOTAL // max(labels, 1)))


def batch_budget(options: ProfileOptions, widths: list[int]) -> int:
    """Padded tokens up to which a batch takes more than batch_size windows (0: never): the option, or
    as many tokens as keep one layer's z (float32) within BATCH_BYTES. That lifts a small model's
    batches (tiny-llama, 384 neurons: 2,730 tokens; a batch's fixed cost is shared by more tokens)
    and leaves a wide one's as they were (SmolLM2, 1,536: 682, fewer than 8 short windows hold:
    larger batches made its profile slower)."""
    if options.batch_tokens is not None:
        return options.batch_tokens
    return min(BATCH_BYTES // (4 * max(widths)), AUTO_BATCH_TOKENS_MAX)


def check_options(options: ProfileOptions) -> None:
    if options.batch_size < 1:
        raise NeuronAtlasError(f"batch size must be at least 1 (got {options.batch_size})")
    if options.batch_tokens is not None and options.batch_tokens < 0:
        raise NeuronAtlasError(f"--batch-tokens must be 0 (--batch-size windows a batch) or more (got {options.batch_tokens})")
    if options.bucket_batches < 1:
        raise NeuronAtlasError(f"--bucket-batches must be at least 1 (got {options.bucket_batches}); 1 keeps corpus order")
    if options.top_k < 0:
        raise NeuronAtlasError(f"top-k must be 0 or more (got {options.top_k})")
    if options.bottom_k < 0:
        raise NeuronAtlasError(f"bottom-k must be 0 or more (got {options.bottom_k})")
    if options.exemplar_radius < 0:
        raise NeuronAtlasError(f"exemplar radius must be 0 or more (got {options.exemplar_radius})")
    if not 2 <= options.window_bits <= 8:
        raise NeuronAtlasError(f"window bits must be 2 to 8 (got {options.window_bits}); 6 is the default, 8 the most precise")
    if options.padding_side not in ("left", "right"):
        raise NeuronAtlasError(f"padding side must be left or right (got {options.padding_side!r})")
    if options.stat_threads < 0:
        raise NeuronAtlasError(f"threads must be 0 (auto) or more (got {options.stat_threads})")
    if options.doc_sample is not None and options.doc_sample < 0:
        raise NeuronAtlasError(f"doc sample must be 0 (none) or more documents per label (got {options.doc_sample})")
    if options.doc_format not in DOC_FORMATS:
        raise NeuronAtlasError(f"--doc-format takes ranks or float16 (got {options.doc_format!r})")
    unknown = [pool for pool in options.doc_pools if pool not in POOLS]
    if unknown or not options.doc_pools:
        raise NeuronAtlasError(f"--doc-pools takes mean, max or mean,max (got {','.join(options.doc_pools) or 'nothing'})")


def resolve_max_length(config, requested: int | None) -> int:
    """Tokens per window: ``requested``, checked against the model's positions, or min(positions, 512)."""
    return window_length(config, requested, DEFAULT_MAX_LENGTH)


def _position_edges(options: ProfileOptions) -> list[int] | None:
    """The position buckets' lower edges for the resolved max_length (None without positions)."""
    if not options.positions:
        return None
    if options.position_edges is None:
        return default_position_edges(options.max_length)
    edges = [int(edge) for edge in options.position_edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[-1] >= options.max_length:
        raise NeuronAtlasError(
            f"position edges must start at 0 and increase below max length {options.max_length} (got {edges}); "
            "leave them out for the default 0, 1, 2, 3, 4, 8, 16, ..."
        )
    return edges


def documents_per_label(meta: dict, counts: dict) -> dict:
    """The documents of each label (all of them under the one label of an unlabelled corpus)."""
    if meta["labels"] == [UNLABELLED] and not counts["documents_per_label"]:
        return {UNLABELLED: counts["documents"]}
    return counts["documents_per_label"]


def run_metadata(model, tokenizer, neurons: ModelNeurons, corpus: Corpus, counts: dict, options: ProfileOptions) -> dict:
    """The atlas metadata of a profile, before its counts (see Atlas.recount); resolves the position edges."""
    if options.max_length is not None:
        options.position_edges = _position_edges(options)  # resolved like max_length: saved, checked on resume
    per_label = counts["documents_per_label"]
    labels = sorted(per_label) if corpus.label_field or corpus.label_from_folder else [UNLABELLED]
    if options.doc_sample is None:  # resolved like max_length: saved, checked on resume
        options.doc_sample = auto_doc_sample(len(labels))
    options.doc_pools = [pool for pool in POOLS if pool in options.doc_pools]
    gguf = gguf_source(model)  # {file, bytes, fingerprint} of a model loaded from a GGUF file
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model": {
            "name_or_path": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
            "model_type": neurons.model_type,
            "fingerprint": model_fingerprint(model),
            "num_layers": neurons.num_layers,
            "widths": neurons.widths,
            "gated": neurons.gated,
            **({"gguf": gguf} if gguf else {}),
        },
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer),
        },
        "corpus": corpus.describe(),
        "labels": labels,
        "documents": counts["documents"],
        "options": {key: value for key, value in asdict(options).items() if key not in RUN_ONLY},
    }


def check_same_run(saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint of another model, corpus or options (``saved``: its metadata)."""
    for key in ("model", "corpus", "labels"):
        if saved[key] != current[key]:
            raise NeuronAtlasError(
                f"--resume: the interrupted profile used another {key} "
                f"({_short(saved[key])} vs now {_short(current[key])}); rerun with the same arguments or pass --overwrite"
            )
    defaults = asdict(ProfileOptions())  # an option the checkpoint predates ran as its default does
    was = {k: saved["options"].get(k, defaults.get(k)) for k in current["options"]}
    changed = {k: (was[k], v) for k, v in current["options"].items() if was[k] != v}
    if changed:
        listed = ", ".join(f"{k} was {old} now {new}" for k, (old, new) in changed.items())
        raise NeuronAtlasError(f"--resume: options differ from the interrupted profile ({listed}); rerun with the same options")


def _short(value) -> str:
    if isinstance(value, dict):
        for key in ("fingerprint", "path"):
            if key in value:
                return f"{key} {value[key]}"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 80 else text[:77] + "..."
