"""Read-only queries over one atlas for the viewer: statistics, exemplars, sets, explanations.

Statistics come from stats.safetensors (held in memory, as :func:`neuronatlas.atlas.load_atlas`
reads them); exemplars are queried per neuron with duckdb over exemplars.parquet, which the atlas
writes sorted by (layer, neuron, rank), so a query only decodes the row groups that hold that
neuron and a page never loads the whole table. The most negative exemplars are read the same way
from bottom_exemplars.parquet (same columns, rank 0 the most negative); an atlas profiled with
``--bottom-k 0`` has none recorded. Context windows and the vocabulary are small
(only windows an exemplar points to) and are indexed once at start-up.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

from ..atlas import Atlas, is_atlas, load_atlas
from ..errors import NeuronAtlasError
from ..exemplar_windows import exact_peak, has_windows, window_sql
from ..files import BOTTOM_EXEMPLARS_FILE, EXEMPLARS_FILE
from ..methods.lape import find_lape
from ..neuronset import NeuronSet, load_neuron_set
from ..tokens import character_bounds, decode_bytes, piece_text, vocab_bytes

EXEMPLAR_RADIUS = 16  # tokens shown either side of an exemplar when the atlas has no activation windows
EXPLANATIONS_FORMAT = "neuronatlas.explanations"
VIEWER_LAPE = "LAPE (computed by the viewer)"  # the name of the set the viewer finds itself


@dataclass
class Membership:
    """One neuron set that names a neuron: the set's name and method, the label and the score."""

    set_name: str
    method: str
    label: str | None
    score: float
    rank: int  # place of the neuron in its set, best score first


@dataclass
class Explanations:
    """One explanations file: who explained, and the entries per (layer, index)."""

    name: str
    explainer: str
    simulator: str
    by_neuron: dict[tuple[int, int], dict] = field(default_factory=dict)


class AtlasData:
    """Everything the pages show about one atlas, plus the neuron sets, explanations and evaluations given."""

    def __init__(self, path: str | Path, sets: list[str | Path] = (), explanations: list[str | Path] = (),
                 evaluations: list[str | Path] = ()):
        path = Path(path)
        if not is_atlas(path):
            raise NeuronAtlasError(f"{path} is not an atlas (no atlas.json); make one with `neuronatlas profile`")
        self.path = path
        self.atlas: Atlas = load_atlas(path)
        self.meta = self.atlas.meta
        self.widths = self.atlas.widths
        self.labels = self.atlas.labels
        self.summary = self.atlas.summary()
        self._exemplars_file = path / EXEMPLARS_FILE
        self._bottom_file = path / BOTTOM_EXEMPLARS_FILE
        self.has_exemplars = self._exemplars_file.exists()
        columns = pq.read_schema(self._exemplars_file).names if self.has_exemplars else []
        self.has_windows = has_windows(columns)
        self._columns_sql = {file: _exemplar_columns_sql(pq.read_schema(file).names)  # read once: schemas are not small
                             for file in (self._exemplars_file, self._bottom_file) if file.exists()}
        self.has_bottom = self._bottom_file.exists()
        self._db = duckdb.connect()
        self._db.execute("set parquet_metadata_cache = true")  # the atlas does not change while viewed
        self._db_lock = threading.Lock()  # one duckdb connection, queried from the server's threads
        self._preloaded: dict[tuple[Path, int, int], list[tuple]] = {}  # (file, layer, neuron) -> exemplar rows
        self._index_contexts()
        self._index_vocab()
        self.set_signals: dict[str, str] = {}  # set name -> the signal it was found on, where it says
        self.sets = [self._load_set(item) for item in sets]
        self.viewer_lape, self.viewer_lape_note = self._find_lape()
        self.memberships = self._index_memberships()
        self.explanations = [load_explanations(item, self.meta) for item in explanations]
        self.evaluations = [load_evaluation(item) for item in evaluations]

    # ---- start-up indexes -------------------------------------------------------------------

    def _index_contexts(self) -> None:
        contexts = self.atlas.contexts
        if contexts is None or contexts.num_rows == 0:
            self._context_seqs = np.zeros(0, np.int64)
            self._context_rows = np.zeros(0, np.int64)
            return
        seqs = contexts["seq"].to_numpy()
        order = np.argsort(seqs, kind="stable")
        self._context_seqs, self._context_rows = seqs[order], order
        self._token_ids = contexts["token_ids"]
        self._context_start = contexts["start"].to_numpy()

    def _index_vocab(self) -> None:
        self.vocab_bytes = vocab_bytes(self.atlas.vocab)  # id -> what the token adds to the text
        self.vocab = {i: piece_text(data) for i, data in self.vocab_bytes.items()}  # id -> the token alone, readable

    def pieces(self, ids: list[int]) -> list[bytes]:
        """Each token's bytes (an id the vocab lacks as ``<id>``)."""
        return [self.vocab_bytes.get(i, f"<{i}>".encode()) for i in ids]

    def _load_set(self, item) -> tuple[str, NeuronSet]:
        neuron_set = load_neuron_set(item)
        neuron_set.check_model(self.meta["model"]["fingerprint"], self.widths)
        signal = json.loads(Path(item).read_text()).get("signal") or neuron_set.params.get("signal")
        if signal:
            self.set_signals[Path(item).stem] = str(signal)
        return Path(item).stem, neuron_set

    def _find_lape(self) -> tuple[NeuronSet | None, str]:
        """Label-specific neurons by LAPE with its default options, found once at start-up.

        An atlas with a single label has none; the note says why.
        """
        if len(self.labels) < 2:
            return None, (f"This atlas has a single label ({', '.join(map(repr, self.labels)) or 'none'}), so it has "
                          "no label-specific neurons; profile with --label-field for them.")
        lape = find_lape(self.atlas)
        params = lape.params
        self.set_signals[VIEWER_LAPE] = params["signal"]
        return lape, (f"LAPE with its default options (the {params['kept']:,} neurons of lowest entropy over labels, "
                      f"{100 * params['top_rate']:g}% of {params['total_neurons']:,}; tau {params['tau']:.4g} on "
                      f"the {params['signal']} signal), computed by the viewer from this atlas.")

    def searchable_sets(self) -> list[tuple[str, NeuronSet]]:
        """The sets given, then the viewer's own LAPE set when the atlas has labels."""
        return self.sets + ([(VIEWER_LAPE, self.viewer_lape)] if self.viewer_lape is not None else [])

    def _index_memberships(self) -> dict[tuple[int, int], list[Membership]]:
        table: dict[tuple[int, int], list[Membership]] = {}
        for name, neuron_set in self.searchable_sets():
            for rank, neuron in enumerate(best_first(neuron_set)):
                table.setdefault((neuron.layer, neuron.index), []).append(
                    Membership(name, neuron_set.method, neuron.label, neuron.score, rank))
        return table

    # ---- one neuron -------------------------------------------------------------------------

    def check_neuron(self, layer: int, index: int) -> None:
        if not 0 <= layer < len(self.widths):
            raise NeuronAtlasError(f"layer {layer} is out of range: this atlas has layers 0-{len(self.widths) - 1}")
        if not 0 <= index < self.widths[layer]:
            raise NeuronAtlasError(f"neuron {index} is out of range: layer {layer} has neurons 0-{self.widths[layer] - 1}")

    def neuron_stats(self, layer: int, index: int) -> dict:
        """Per-label activation probability and mean, overall min/max/mean/std, the histogram."""
        atlas = self.atlas
        tokens = int(atlas.tokens_per_label.sum())
        probability = atlas.activation_probability(layer)[:, index].tolist()
        mean = atlas.mean(layer)[:, index].tolist()
        total, total_sq = float(atlas.overall("sum", layer)[index]), float(atlas.overall("sumsq", layer)[index])
        overall_mean = total / max(tokens, 1)
        variance = max(total_sq / max(tokens, 1) - overall_mean ** 2, 0.0)
        stats = {
            "corpus_tokens": tokens,
            "activation_rate": float(atlas.overall("active", layer)[index]) / max(tokens, 1),
            "mean": overall_mean,
            "std": variance ** 0.5,
            "min": float(atlas.overall("min", layer)[index]),
            "max": float(atlas.overall("max", layer)[index]),
            "label_probability": dict(zip(self.labels, probability)),
            "label_mean": dict(zip(self.labels, mean)),
            "histogram": self._histogram(layer, index),
        }
        if "gate" in atlas.signals:
            gate = atlas.activation_probability(layer, "gate")[:, index].tolist()
            stats["gate_label_probability"] = dict(zip(self.labels, gate))
        return stats

    def _histogram(self, layer: int, index: int) -> dict | None:
        signal = self.atlas.signals["z"]
        key = f"hist.{layer}"
        if key not in signal.tensors or signal.hist_edges is None:
            return None
        return {"edges": signal.hist_edges.tolist(), "counts": signal.tensors[key][index].tolist()}

    def exemplars(self, layer: int, index: int) -> list[dict]:
        """Top exemplars, best first: tokens of the window around the exemplar, its text, their activations.

        Without activation windows in the atlas only the exemplar token's activation is known (the
        others are None).
        """
        if not self.has_exemplars:
            return []
        return [self._exemplar(row) for row in self._rows(self._exemplars_file, layer, index)]

    def bottom_exemplars(self, layer: int, index: int) -> list[dict] | None:
        """The most negative exemplars, most negative first, as :meth:`exemplars`; None when the atlas
        records none."""
        if not self.has_bottom:
            return None
        return [self._exemplar(row) for row in self._rows(self._bottom_file, layer, index)]

    def _rows(self, file: Path, layer: int, index: int) -> list[tuple]:
        preloaded = self._preloaded.get((file, layer, index))
        if preloaded is not None:
            return preloaded
        query = f"select {self._columns_sql[file]} from read_parquet(?) where layer = ? and neuron = ? order by rank"
        with self._db_lock:
            return self._db.execute(query, [str(file), layer, index]).fetchall()

    def preload_layer(self, layer: int, neurons: list[int] | None = None) -> None:
        """Read the exemplars (top, and bottom where recorded) of one layer's neurons (all, or ``neurons``)
        at once, to write their pages. Replaces what was preloaded before: one layer's rows are held at a time.
        """
        wanted = list(range(self.widths[layer])) if neurons is None else [int(index) for index in neurons]
        self._preloaded = {}
        for file in (self._exemplars_file, self._bottom_file):
            if not file.exists():
                continue
            chosen = "" if neurons is None else "and neuron in (select unnest(?::bigint[])) "  # a hash semi-join
            query = (f"select neuron, {self._columns_sql[file]} from read_parquet(?) where layer = ? {chosen}"
                     "order by neuron, rank")
            parameters = [str(file), layer] + ([wanted] if neurons is not None else [])
            with self._db_lock:
                rows = self._db.execute(query, parameters).fetchall()
            self._preloaded.update({(file, layer, index): [] for index in wanted})
            for row in rows:
                self._preloaded[(file, layer, row[0])].append(row[1:])

    def _exemplar(self, row: tuple) -> dict:
        rank, activation, seq, pos, doc, label = row[:6]
        ids = self.window_tokens(seq)
        if len(row) > 6 and row[6] is not None:
            start, values = int(row[6]), exact_peak(row[7], int(row[6]), pos, activation)
        else:
            start = max(0, pos - EXEMPLAR_RADIUS)
            stop = min(len(ids), pos + EXEMPLAR_RADIUS + 1) if ids else pos + 1
            values = [activation if p == pos else None for p in range(start, stop)]
        if 0 <= start < len(ids):  # whole characters at the edges: the tokens added show no value
            stop = min(start + len(values), len(ids))
            lo, hi = character_bounds(lambda i: self.pieces([ids[i]])[0], start, stop, len(ids))
            values = [None] * (start - lo) + values[: stop - start] + [None] * (hi - stop)
            start = lo
        window_ids = ids[start : start + len(values)] if ids else []
        pieces = self.pieces(window_ids)
        return {
            "rank": rank, "activation": activation, "seq": seq, "pos": pos, "doc": doc, "label": label,
            "start": start, "peak": pos - start,
            "token_ids": window_ids,
            "tokens": [piece_text(piece) for piece in pieces],
            "text": decode_bytes(pieces),
            "activations": values[: len(window_ids)] if ids else [],
        }

    def _context_row(self, seq: int) -> int | None:
        where = np.searchsorted(self._context_seqs, seq)
        if where >= len(self._context_seqs) or self._context_seqs[where] != seq:
            return None
        return int(self._context_rows[where])

    def window_tokens(self, seq: int) -> list[int]:
        """Token ids of context window ``seq`` (empty when the atlas did not keep it)."""
        row = self._context_row(seq)
        return [] if row is None else self._token_ids[row].as_py()

    def label_signal(self, layer: int, index: int) -> dict:
        """{"signal", "set"}: the signal the label chart shows, the one the first set that names this neuron
        was found on (LAPE on the gate of a gated model; z when no set says)."""
        for membership in self.memberships.get((layer, index), []):
            signal = self.set_signals.get(membership.set_name)
            if signal in self.atlas.signals:
                return {"signal": signal, "set": membership.set_name}
        return {"signal": "z", "set": None}

    def explanations_of(self, layer: int, index: int) -> list[dict]:
        found = []
        for explanations in self.explanations:
            entry = explanations.by_neuron.get((layer, index))
            if entry is not None:
                found.append(dict(entry, source=explanations.name, explainer=explanations.explainer,
                                  simulator=explanations.simulator))
        return found

    def neighbours(self, layer: int, index: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """The previous and next neuron in (layer, index) order, None at either end."""
        previous = (layer, index - 1) if index > 0 else ((layer - 1, self.widths[layer - 1] - 1) if layer > 0 else None)
        last = len(self.widths) - 1
        following = (layer, index + 1) if index + 1 < self.widths[layer] else ((layer + 1, 0) if layer < last else None)
        return previous, following

    def random_neuron(self, generator: np.random.Generator) -> tuple[int, int]:
        flat = int(generator.integers(sum(self.widths)))
        for layer, width in enumerate(self.widths):
            if flat < width:
                return layer, flat
            flat -= width
        raise AssertionError("unreachable")

    # ---- search -----------------------------------------------------------------------------

    def token_ids_matching(self, text: str) -> list[int]:
        """Ids of the atlas's tokens that read ``text`` (ignoring case and surrounding spaces)."""
        wanted = text.strip().casefold()
        return [i for i, token in self.vocab.items() if token.strip().casefold() == wanted] if wanted else []

    def neurons_peaking_on(self, ids: list[int]) -> list[dict]:
        """Neurons with an exemplar whose peak token is one of ``ids``: most such exemplars first."""
        if not ids or not self.has_exemplars or self.atlas.contexts is None:
            return []
        query = """
            select e.layer, e.neuron, count(*) as exemplars, max(e.activation) as top
            from read_parquet(?) e join contexts c on e.seq = c.seq
            where list_contains(?, c.token_ids[e.pos + 1])
            group by e.layer, e.neuron order by exemplars desc, top desc, e.layer, e.neuron"""
        contexts = self.atlas.contexts.select(["seq", "token_ids"])
        with self._db_lock:
            self._db.register("contexts", contexts)
            rows = self._db.execute(query, [str(self._exemplars_file), ids]).fetchall()
            self._db.unregister("contexts")
        return [{"layer": l, "index": n, "exemplars": c, "activation": a} for l, n, c, a in rows]

    def neurons_of_sets(self, label: str | None = None, method: str | None = None) -> list[dict]:
        """Neurons with this label (or of sets by this method) in the sets given and the viewer's LAPE.

        Set by set in that order, each best score first.
        """
        found = []
        for name, neuron_set in self.searchable_sets():
            if method is not None and method.casefold() not in (neuron_set.method.casefold(), name.casefold()):
                continue
            for neuron in best_first(neuron_set):
                if label is None or (neuron.label or "").casefold() == label.casefold():
                    found.append({"layer": neuron.layer, "index": neuron.index, "score": neuron.score,
                                  "label": neuron.label, "set": name, "method": neuron_set.method})
        return found

    def neurons_explained_by(self, words: str) -> list[dict]:
        """Neurons whose explanation (or a cluster's) holds every word of ``words``."""
        wanted = [word.casefold() for word in words.split()]
        if not wanted:
            return []
        found = []
        for explanations in self.explanations:
            for (layer, index), entry in explanations.by_neuron.items():
                texts = [entry["explanation"]] + [c.get("explanation") or "" for c in entry.get("clusters", [])]
                text = " ".join(texts).casefold()
                if all(word in text for word in wanted):
                    found.append({"layer": layer, "index": index, "explanation": entry["explanation"],
                                  "score": entry.get("score"), "source": explanations.name})
        return sorted(found, key=lambda item: (-(item["score"] if item["score"] is not None else -1e9),
                                               item["layer"], item["index"]))

    # ---- overview ---------------------------------------------------------------------------

    def specialised_counts(self, neuron_set: NeuronSet, name: str) -> dict:
        """{"name", "method", "labels", "counts": [[neurons of label l in layer i]]} of one set."""
        labels = neuron_set.labels or [None]
        counts = [[0] * len(self.widths) for _ in labels]
        for neuron in neuron_set.neurons:
            counts[labels.index(neuron.label) if neuron.label in labels else 0][neuron.layer] += 1
        return {"name": name, "method": neuron_set.method,
                "labels": [label or "(none)" for label in labels], "counts": counts}


def best_first(neuron_set: NeuronSet) -> list:
    """The set's neurons, best score first: lowest first where the set says lower is better (LAPE's entropy)."""
    lower_is_better = "lower =" in str(neuron_set.params.get("score", ""))
    return sorted(neuron_set.neurons, key=lambda n: ((n.score if lower_is_better else -n.score), n.layer, n.index))


def load_explanations(path: str | Path, atlas_meta: dict) -> Explanations:
    """An explanations file written by `neuronatlas explain`, checked against the atlas's model."""
    path = Path(path)
    if not path.is_file():
        raise NeuronAtlasError(f"explanations file not found: {path} (write one with `neuronatlas explain`)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != EXPLANATIONS_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {EXPLANATIONS_FORMAT!r}")
        entries = {(int(n["layer"]), int(n["index"])): _explanation_entry(n) for n in data["neurons"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise NeuronAtlasError(f"{path} is not an explanations file ({error}); write one with `neuronatlas explain`") from error
    fingerprint = (data.get("model") or {}).get("fingerprint")
    if fingerprint and fingerprint != atlas_meta["model"]["fingerprint"]:
        raise NeuronAtlasError(f"{path} explains another model (fingerprint {fingerprint}, the atlas's is "
                               f"{atlas_meta['model']['fingerprint']}); explain this atlas's neurons")
    return Explanations(path.stem, str(data.get("explainer", "")), str(data.get("simulator", "")), entries)


def _explanation_entry(neuron: dict) -> dict:
    def number(value):
        return None if value is None else float(value)

    return {
        "explanation": str(neuron["explanation"]),
        "score": number(neuron.get("score")),
        "score_top": number(neuron.get("score_top")),
        "score_random": number(neuron.get("score_random")),
        "clusters": [{"explanation": str(c.get("explanation", "")), "size": int(c.get("size", 0)),
                      "score": number(c.get("score"))} for c in neuron.get("clusters") or []],
    }


def load_evaluation(path: str | Path) -> dict:
    """An evaluation JSON written by `neuronatlas evaluate`."""
    path = Path(path)
    if not path.is_file():
        raise NeuronAtlasError(f"evaluation file not found: {path} (write one with `neuronatlas evaluate --out`)")
    try:
        data = json.loads(path.read_text())
        if data.get("kind") != "evaluation":
            raise ValueError(f"kind is {data.get('kind')!r}, not 'evaluation'")
        missing = [key for key in ("labels", "set_labels", "delta", "specific") if key not in data]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise NeuronAtlasError(f"{path} is not an evaluation file ({error}); write one with `neuronatlas evaluate --out`") from error
    data["name"] = path.stem
    return data


def _exemplar_columns_sql(names: list[str]) -> str:
    """The columns an exemplar row is read with, from a file's column ``names``: doc and label are null
    where the file has none (an empty bottom list of an atlas written before they were always kept)."""
    documents = ", ".join(name if name in names else f"null as {name}" for name in ("doc", "label"))
    windows = window_sql(names)
    return f"rank, activation, seq, pos, {documents}" + (f", {windows}" if windows else "")
