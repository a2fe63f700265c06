"""Explain, simulate and score every neuron of a set, writing the explanations JSON.

Output (read by the viewer)::

    {"format": "neuronatlas.explanations", "version": 1,
     "model": {"name_or_path", "fingerprint"}, "explainer": str, "simulator": str,
     "neurons": [{"layer", "index", "explanation", "score", "score_top", "score_random",
                  "clusters": [{"explanation", "size", "score"}],
                  "scores": {scorer: {"score", "baseline", ...}}, "baseline_from", "candidates", "threshold",
                  "contexts": {"source", "n_activating", "n_non_activating", "dropped", "non_activating_max"}}]}

Each finished neuron is appended to ``OUT.partial.jsonl`` (made with the first finished neuron: a
header line, then one line per neuron); the output is written at the end through a temporary file
and a rename, and the partial file is then removed. A run stopped by an error or an interrupt leaves
no output, and a partial file only when a neuron was finished, which ``resume=True`` continues.
Folders are never made: the folder of ``OUT`` must exist. Baselines (another neuron's explanation
scored on each neuron's contexts) are computed once every neuron is explained, before the output
is written; a resumed run computes them again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..atlas import Atlas, load_atlas
from ..corpus import Corpus, read_corpus
from ..errors import NeuronAtlasError
from .exemplars import (
    DEFAULT_CONTEXT, RandomSpan, SubjectModel, TokenStrings, atlas_tokenizer, contexts_of, exemplar_rows, random_spans, top_exemplars,
)
from .contexts import draw_samples
from .neuron import SCORERS, add_baselines, explain_neuron, material_from_samples, material_of

FORMAT, VERSION = "neuronatlas.explanations", 1
CONTEXT_SOURCES = ("samples", "exemplars")


@dataclass
class ExplainOptions:
    top: int = 10  # top exemplars shown to the explainer
    holdout: int = 5  # top exemplars held out for scoring (spread over the ranks)
    random: int = 10  # random exemplars for scoring, shared by all neurons
    context: int = DEFAULT_CONTEXT  # tokens either side of an exemplar token
    clusters: int = 0  # k-means groups of the shown exemplars, each explained (0 = none)
    seed: int = 0  # random exemplars, k-means, sampled explanations, fuzzing marks
    stored: bool = True  # read per-token activations from the atlas when it records them
    scorers: tuple[str, ...] = SCORERS  # the first ranks best-of-N candidates
    samples: int = 1  # explanations sampled per neuron (best of N)
    temperature: float = 0.7  # of sampled explanations (when samples > 1)
    active: float = 0.25  # a token is active at this fraction of the neuron's largest shown activation
    baseline: bool = True  # score another neuron's explanation on each neuron's contexts
    contexts: str = "samples"  # scoring contexts: "samples" (quantile bands, non-activating) or "exemplars" (held-out, random)
    bands: int = 10  # samples: quantile bands of the activation range
    per_band: int = 2  # samples: contexts drawn from each band
    non_activating: int = 20  # samples: contexts where the neuron does not fire
    sample_docs: int = 256  # samples: corpus documents the sampling pass reads

    def check(self) -> None:
        for name in ("top", "holdout", "random", "context", "clusters"):
            if getattr(self, name) < 0:
                raise NeuronAtlasError(f"--{name} must be 0 or more (got {getattr(self, name)})")
        if self.top < 1:
            raise NeuronAtlasError(f"--top must be at least 1: the explainer needs an exemplar (got {self.top})")
        self.scorers = tuple(self.scorers)
        unknown = [s for s in self.scorers if s not in SCORERS]
        if not self.scorers or unknown or len(set(self.scorers)) < len(self.scorers):
            raise NeuronAtlasError(f"--scorers takes distinct names among {', '.join(SCORERS)} (got {','.join(self.scorers) or 'none'})")
        if self.samples < 1:
            raise NeuronAtlasError(f"--samples must be at least 1 (got {self.samples})")
        if self.temperature < 0 or (self.samples > 1 and self.temperature == 0):
            raise NeuronAtlasError(f"--temperature must be above 0 to sample several explanations (got {self.temperature})")
        if not 0 < self.active <= 1:
            raise NeuronAtlasError(f"--active must be in (0, 1] (got {self.active})")
        if self.contexts not in CONTEXT_SOURCES:
            raise NeuronAtlasError(f"--scoring-contexts is one of {', '.join(CONTEXT_SOURCES)} (got {self.contexts})")
        for name in ("bands", "per_band", "non_activating", "sample_docs"):
            if getattr(self, name) < 1:
                raise NeuronAtlasError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")


# ---- the whole set ----------------------------------------------------------------------------


def atlas_corpus(atlas: Atlas, path: str | None = None) -> Corpus:
    """The corpus the atlas was profiled on (``path`` instead, read with the same options)."""
    described = atlas.meta["corpus"]
    if path is None and "parts" in described:
        raise NeuronAtlasError("this atlas merges several corpora; pass --corpus for the random exemplars")
    path = path or described["path"]
    if not Path(path).exists():
        raise NeuronAtlasError(f"the atlas's corpus {path} is not there any more; pass --corpus for the random exemplars")
    return read_corpus(path, text_field=described.get("text_field", "text"), label_field=described.get("label_field"),
                       format=described.get("format") if path == described["path"] else None,
                       label_from_folder=described.get("label_from_folder", False))


def explain_neurons(atlas_dir: str | Path, neurons: list[tuple[int, int]], explainer, simulator, out: str | Path,
                    options: ExplainOptions, subject: SubjectModel | None = None, corpus: Corpus | None = None,
                    resume: bool = False, quiet: bool = True, atlas: Atlas | None = None) -> dict:
    """Explain, simulate and score ``neurons`` of the atlas in ``atlas_dir``; write and return the JSON.

    ``subject`` (the profiled model) is needed for samples and random exemplars and for atlases that
    record no per-token exemplar activations; ``corpus`` for samples and random exemplars.
    ``atlas``: already loaded.
    """
    options.check()
    atlas = atlas if atlas is not None else load_atlas(atlas_dir)
    header = {"format": FORMAT, "version": VERSION,
              "model": {k: atlas.meta["model"][k] for k in ("name_or_path", "fingerprint")},
              "explainer": explainer.name, "simulator": simulator.name}
    described = json.loads(json.dumps(dict(header, options=asdict(options), neurons=[list(n) for n in neurons])))  # as read back
    partial = PartialOutput(Path(out), described, resume)
    rows = exemplar_rows(atlas_dir, neurons)
    contexts = contexts_of(atlas)
    strings = TokenStrings(atlas.vocab, subject.tokenizer if subject is not None else atlas_tokenizer(atlas))
    sampled = options.contexts == "samples"
    thresholds = {n: _sample_threshold(rows[n], atlas, options) for n in neurons}
    drawn = _samples(subject, corpus, thresholds, options) if sampled else {}
    spans = [] if sampled else _random_spans(atlas, subject, corpus, neurons, options)
    materials = []
    for layer, index in tqdm(neurons, desc="explain", unit="neuron", disable=quiet):
        tops = top_exemplars(rows[(layer, index)], layer, index, contexts, strings, options.context, subject, options.stored)
        if sampled:
            materials.append(material_from_samples(tops, drawn[(layer, index)], strings, options, thresholds[(layer, index)]))
        else:
            materials.append(material_of(tops, [span.exemplar(layer, index, strings) for span in spans], options))
        if (layer, index) not in partial.done:
            partial.add(explain_neuron(layer, index, materials[-1], explainer, simulator, options))
    records = [partial.done[n] for n in neurons]
    if options.baseline:
        add_baselines(records, materials, simulator, options)
    return partial.finish(header, records)


def _sample_threshold(rows: list[dict], atlas: Atlas, options: ExplainOptions) -> float:
    """A sample is active above ``--active`` x the neuron's top exemplar activation (the atlas's
    threshold for a neuron without exemplars, which is not explained)."""
    if not rows:
        return float(atlas.meta["options"].get("threshold", 0.0))
    return options.active * float(rows[0]["activation"])


def _samples(subject, corpus, thresholds: dict, options: ExplainOptions) -> dict:
    if subject is None or corpus is None:
        raise NeuronAtlasError("scoring on samples needs the subject model and the corpus (or pass --scoring-contexts exemplars)")
    return draw_samples(subject, corpus, thresholds, options)


def _random_spans(atlas: Atlas, subject, corpus, neurons, options: ExplainOptions) -> list[RandomSpan]:
    if options.random == 0:
        return []
    if subject is None or corpus is None:
        raise NeuronAtlasError("random exemplars need the subject model and the corpus (or pass --random 0)")
    max_length = atlas.meta["options"]["max_length"]
    return random_spans(subject, corpus, max_length, atlas.meta["windows"], options.random, neurons, options.context, options.seed)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def check_out(out: str | Path, resume: bool) -> None:
    """Errors a run would meet only when writing: ``out`` a folder, its folder missing, an
    interrupted run's partial file there without ``resume``."""
    out = Path(out)
    if out.is_dir():
        raise NeuronAtlasError(f"--out {out} is a folder; give the path of the explanations JSON file to write")
    if not out.parent.is_dir():
        raise NeuronAtlasError(f"the folder of --out {out} does not exist; create {out.parent} or write elsewhere")
    if partial_path(out).exists() and not resume:
        raise NeuronAtlasError(f"{partial_path(out)} holds an interrupted run; pass --resume to continue it or delete it")


class PartialOutput:
    """Finished neurons in ``OUT.partial.jsonl``: a header line, then one JSON line per neuron. The
    file is made with the first neuron, so a run that finishes none leaves nothing behind."""

    def __init__(self, out: Path, header: dict, resume: bool):
        check_out(out, resume)
        self.out, self.path, self.header = out, partial_path(out), header
        self.done: dict[tuple[int, int], dict] = {}
        if self.path.exists():
            self._read(header)

    def _read(self, header: dict) -> None:
        lines = self.path.read_text().splitlines()
        try:
            saved = json.loads(lines[0])["header"]
        except (IndexError, KeyError, TypeError, json.JSONDecodeError):
            raise NeuronAtlasError(f"{self.path} is not a partial explanations file; delete it and run again") from None
        if saved != header:
            changed = sorted(k for k in header if saved.get(k) != header[k])
            raise NeuronAtlasError(f"--resume: the interrupted run used other {', '.join(changed)}; rerun it with the same arguments or delete {self.path}")
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            self.done[(record["layer"], record["index"])] = record

    def add(self, record: dict) -> None:
        lines = [record] if self.path.exists() else [{"header": self.header}, record]
        with self.path.open("a") as handle:
            handle.write("".join(json.dumps(line) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        self.done[(record["layer"], record["index"])] = record

    def finish(self, header: dict, records: list[dict]) -> dict:
        result = dict(header, neurons=records)
        temporary = self.out.with_name(self.out.name + ".writing")
        try:
            temporary.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(temporary, self.out)
        except BaseException:  # a full disk or an interrupt: no half-written file stays
            temporary.unlink(missing_ok=True)
            raise
        self.path.unlink(missing_ok=True)
        return result
