"""An atlas as a Neuronpedia import folder: one source per layer, as Neuronpedia's own exporters write it.

Layout (read by Neuronpedia's importer, apps/webapp/app/api/admin/import/route.ts)::

    OUT/<model id>/<layer>-<source set>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one row each
        features/batch-<n>.jsonl.gz       Neuron rows: max activation, density, activation histogram
        activations/batch-<n>.jsonl.gz    Activation rows: one per top exemplar, tokens and values
        explanations/batch-<n>.jsonl.gz   Explanation rows (with --explanations): scoreV1 = simulation
        explanation_scores/batch-<n>.jsonl.gz  ExplanationScore rows: detection, fuzzing, simulation

Every row follows :mod:`.schema`. Tokens are readable text: a token's bytes are joined with its
neighbours into whole characters (:func:`neuronatlas.tokens.display_spans`), each span carrying the
largest activation of its tokens, so a Cyrillic word never shows as U+FFFD, and the lone bytes of a
character cut by the exemplar's edge are left out (:meth:`~neuronatlas.explain.exemplars.Exemplar.readable`).
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np

from ..atlas import Atlas
from ..errors import NeuronAtlasError
from ..explain.exemplars import DEFAULT_CONTEXT, Exemplar, TokenStrings, contexts_of, exemplar_rows, top_exemplars

BATCH = 1024  # neurons per features/activations file
FILES = {  # file name pattern under a source folder -> the table its rows go to
    "release.jsonl": "SourceRelease", "model.jsonl": "Model", "sourceset.jsonl": "SourceSet", "source.jsonl": "Source",
    "features/*.jsonl.gz": "Neuron", "activations/*.jsonl.gz": "Activation", "explanations/*.jsonl.gz": "Explanation",
    "explanation_scores/*.jsonl.gz": "ExplanationScore",
}
SCORE_TYPES = {"detection": "eleuther_recall", "fuzzing": "eleuther_fuzz", "simulation": "neuronatlas_simulation"}


def model_id_of(atlas: Atlas) -> str:
    """A Neuronpedia model id from the model's name: its last path part, lower case, without .gguf."""
    name = Path(str(atlas.meta["model"]["name_or_path"]).rstrip("/")).name.removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


def atlas_neurons(atlas_dir: str | Path) -> list[tuple[int, int]]:
    """Every neuron with an exemplar, in (layer, index) order."""
    file = Path(atlas_dir) / "exemplars.parquet"
    if not file.exists():
        raise NeuronAtlasError(f"{atlas_dir} has no exemplars.parquet; profile it with --top-k above 0")
    path = str(file).replace("'", "''")
    return [tuple(row) for row in duckdb.sql(f"select distinct layer, neuron from read_parquet('{path}') order by 1, 2").fetchall()]


class Export:
    """What every row of one export shares: model id, source set, creator, time."""

    def __init__(self, atlas: Atlas, model_id: str, source_set: str, creator_id: str, creator_name: str):
        self.atlas, self.model_id, self.source_set = atlas, model_id, source_set
        self.creator_id, self.creator_name = creator_id, creator_name
        self.now = datetime.now(timezone.utc).isoformat()

    def source_id(self, layer: int) -> str:
        return f"{layer}-{self.source_set}"

    def metadata(self, layer: int) -> dict[str, dict]:
        """The one-row files of a layer's source folder."""
        meta, corpus = self.atlas.meta, self.atlas.meta.get("corpus", {})
        common = {"creatorId": self.creator_id, "createdAt": self.now}
        description = f"FFN neurons of {meta['model']['name_or_path']} (neuronatlas)"
        return {
            "release.jsonl": {"name": self.source_set, "description": description, "urls": [],
                              "creatorName": self.creator_name, "visibility": "PUBLIC", **common},
            "model.jsonl": {"id": self.model_id, "displayName": self.model_id, "displayNameShort": self.model_id,
                            "layers": self.atlas.num_layers, "neuronsPerLayer": max(self.atlas.widths),
                            "owner": self.creator_name, "visibility": "PUBLIC", "updatedAt": self.now, **common},
            "sourceset.jsonl": {"modelId": self.model_id, "name": self.source_set, "description": "FFN neurons",
                                "type": "neurons", "creatorName": self.creator_name, "urls": [],
                                "releaseName": self.source_set, "visibility": "PUBLIC", **common},
            "source.jsonl": {"id": self.source_id(layer), "modelId": self.model_id, "setName": self.source_set,
                             "visibility": "PUBLIC", "num_prompts": int(meta.get("windows", 0)) or None,
                             "num_tokens_in_prompt": meta.get("options", {}).get("max_length"),
                             "dataset": str(corpus.get("path")) if corpus.get("path") else None, **common},
        }

    def activation(self, layer: int, index: int, rank: int, exemplar: Exemplar) -> dict:
        tokens, values = exemplar.readable()  # whole characters, what the explainer read
        values = [float(value) for value in values]
        peak = int(np.argmax(values))
        return {"id": f"na-{self.model_id}-{layer}-{index}-{rank}", "tokens": tokens, "values": values,
                "modelId": self.model_id, "layer": self.source_id(layer), "index": str(index),
                "maxValue": values[peak], "maxValueTokenIndex": peak, "minValue": min(values),
                "dataIndex": str(exemplar.seq), "creatorId": self.creator_id, "createdAt": self.now}

    def neuron(self, layer: int, index: int, top: float) -> dict:
        heights, values = histogram(self.atlas, layer, index)
        tokens = int(self.atlas.tokens_per_label.sum())
        active = int(self.atlas.stat("active", layer)[:, index].sum())
        return {"modelId": self.model_id, "layer": self.source_id(layer), "index": str(index),
                "sourceSetName": self.source_set, "creatorId": self.creator_id, "createdAt": self.now,
                "maxActApprox": top, "frac_nonzero": active / tokens if tokens else 0.0,
                "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": values}


def histogram(atlas: Atlas, layer: int, index: int) -> tuple[list[float], list[float]]:
    """(counts, bin centres) of the neuron's activations over all tokens, empty bins left out; the
    open bins below the first and above the last edge are placed at that edge."""
    if not atlas.has_stat("hist"):
        return [], []
    edges = np.asarray(atlas.meta["options"]["hist_edges"], np.float64)
    counts = atlas.stat("hist", layer)[index].double().numpy()  # (bins,) = len(edges) + 1
    centres = np.concatenate([edges[:1], (edges[:-1] + edges[1:]) / 2, edges[-1:]])
    kept = counts > 0
    return counts[kept].tolist(), centres[kept].tolist()


def explanation_rows(export: Export, record: dict, explainer: str, scorer: str) -> list[tuple[str, dict]]:
    """(table, row) of one explained neuron: its Explanation and one ExplanationScore per scorer."""
    layer, index = record["layer"], record["index"]
    explanation_id = f"na-{export.model_id}-{layer}-{index}-explanation"
    row = {"id": explanation_id, "modelId": export.model_id, "layer": export.source_id(layer), "index": str(index),
           "description": record["explanation"], "authorId": export.creator_id, "notes": f"neuronatlas explain; explainer {explainer}",
           "createdAt": export.now, "updatedAt": export.now}
    if record.get("score") is not None:
        row["scoreV1"] = float(record["score"])
    rows = [("Explanation", row)]
    for name, values in (record.get("scores") or {}).items():
        if values.get("score") is None:
            continue
        rows.append(("ExplanationScore", {
            "id": f"{explanation_id}-{name}", "initiatedByUserId": export.creator_id, "value": float(values["score"]),
            "explanationId": explanation_id, "explanationScoreTypeName": SCORE_TYPES[name],
            "explanationScoreModelName": scorer, "jsonDetails": json.dumps(values), "createdAt": export.now}))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    path.write_bytes(gzip.compress(text, compresslevel=5) if path.suffix == ".gz" else text)


def read_explanations(path: str | Path, atlas: Atlas) -> dict:
    """An explanations JSON made for this atlas's model."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NeuronAtlasError(f"cannot read the explanations {path} ({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != "neuronatlas.explanations":
        raise NeuronAtlasError(f"{path} is not an explanations file from `neuronatlas explain`")
    if data.get("model", {}).get("fingerprint") != atlas.meta["model"]["fingerprint"]:
        raise NeuronAtlasError(f"{path} explains another model than this atlas's; export it with that model's atlas")
    return data


def export_neuronpedia(atlas_dir: str | Path, atlas: Atlas, out: str | Path, neurons: list[tuple[int, int]] | None = None,
                       explanations: dict | None = None, model_id: str | None = None, source_set: str = "neurons",
                       creator_id: str = "neuronatlas", creator_name: str = "neuronatlas", subject=None, tokenizer=None,
                       context: int = DEFAULT_CONTEXT) -> dict:
    """Write the import folders of ``neurons`` (default: the explained ones, else every neuron with
    an exemplar) under ``out``; returns {"folders": [...], "neurons": n, "activations": n, "explanations": n}.

    ``subject``: the profiled model, for atlases without recorded exemplar windows; ``tokenizer``:
    reads token bytes for atlases whose vocab table lacks them (default: the subject's).
    """
    export = Export(atlas, model_id or model_id_of(atlas), source_set, creator_id, creator_name)
    explained = {(r["layer"], r["index"]): r for r in (explanations or {}).get("neurons", []) if r.get("explanation")}
    neurons = neurons or (list(explained) if explained else atlas_neurons(atlas_dir))
    rows = exemplar_rows(atlas_dir, neurons)
    windows = contexts_of(atlas)
    strings = TokenStrings(atlas.vocab, tokenizer or (subject.tokenizer if subject is not None else None))
    tables: dict[int, dict[str, list]] = {}
    for layer, index in sorted(set(neurons)):
        tops = top_exemplars(rows[(layer, index)], layer, index, windows, strings, context, subject)
        table = tables.setdefault(layer, {"Neuron": [], "Activation": [], "Explanation": [], "ExplanationScore": []})
        table["Neuron"].append(export.neuron(layer, index, max((float(e.activations.max()) for e in tops), default=0.0)))
        table["Activation"] += [export.activation(layer, index, rank, e) for rank, e in enumerate(tops)]
        if (layer, index) in explained:
            for name, row in explanation_rows(export, explained[(layer, index)], explanations["explainer"], explanations["simulator"]):
                table[name].append(row)
    return _write(Path(out), export, tables)


def _write(out: Path, export: Export, tables: dict[int, dict[str, list]]) -> dict:
    folders, counts = [], {"neurons": 0, "activations": 0, "explanations": 0}
    for layer, table in sorted(tables.items()):
        folder = out / export.model_id / export.source_id(layer)
        for name, row in export.metadata(layer).items():
            write_jsonl(folder / name, [row])
        neurons, activations = table["Neuron"], table["Activation"]
        for batch, start in enumerate(range(0, len(neurons), BATCH)):
            chosen = {n["index"] for n in neurons[start:start + BATCH]}
            write_jsonl(folder / "features" / f"batch-{batch}.jsonl.gz", neurons[start:start + BATCH])
            write_jsonl(folder / "activations" / f"batch-{batch}.jsonl.gz", [a for a in activations if a["index"] in chosen])
        if table["Explanation"]:
            write_jsonl(folder / "explanations" / "batch-0.jsonl.gz", table["Explanation"])
            write_jsonl(folder / "explanation_scores" / "batch-0.jsonl.gz", table["ExplanationScore"])
        folders.append(str(folder))
        counts["neurons"] += len(neurons)
        counts["activations"] += len(activations)
        counts["explanations"] += len(table["Explanation"])
    return {"folders": folders, **counts}
