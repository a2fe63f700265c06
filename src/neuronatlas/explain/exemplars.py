"""A neuron's exemplars as token strings with per-token activations.

Top exemplars come from the atlas: the tokens of window ``seq`` (contexts.parquet) up to
``context`` tokens either side of the exemplar token ``pos``. Their per-token activations are read
from exemplars.parquet's ``window_start`` / ``window_activations`` when the atlas has them, and
computed by running the subject model on the window otherwise (:func:`top_exemplars` does either).
Exemplars whose span overlaps a better-ranked one of the same window are dropped, so that shown and
held-out exemplars never share tokens.

Random exemplars are spans of the same shape around a random position of random corpus windows
(the windows the profile cut, with the atlas's ``max_length``), run through the subject model once
for every neuron of a set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch

from ..atlas import Atlas
from ..corpus import Corpus, iter_windows
from ..errors import NeuronAtlasError
from ..exemplar_windows import exact_peak, window_sql
from ..hooks import activation_module, capture, forward_batch
from ..loading import load_model, load_tokenizer, model_fingerprint
from ..models import locate_neurons
from ..tokens import display_spans, token_bytes, token_texts, vocab_bytes

DEFAULT_CONTEXT = 16  # tokens either side of the exemplar token
LONE_BYTES = re.compile(r"(<0x[0-9A-F]{2}>)+")  # how a piece of bytes that completes no character reads


@dataclass
class Exemplar:
    """A span of one corpus window with the neuron's activation at each of its tokens."""

    token_ids: list[int]
    tokens: list[str]  # what each id decodes to
    activations: np.ndarray  # (T,) float32: the neuron's z at each token
    seq: int  # the corpus window the span comes from
    start: int  # position of the span's first token within that window
    kind: str  # "top" or "random"
    pieces: list[bytes] | None = None  # each token's bytes, to show the span as whole characters

    def readable(self) -> tuple[list[str], np.ndarray]:
        """(texts, activations) of the span as an explainer or simulator reads it: tokens joined into
        whole characters where their bytes are known (a byte-level BPE writes an Arabic letter as two
        tokens, each alone ``<0xD8>``), each piece with the max of its tokens' activations (S,); the
        lone bytes of a character the span's edge cuts are left out."""
        if self.pieces is None:
            return list(self.tokens), np.asarray(self.activations, np.float32)
        spans = display_spans(self.pieces)
        while len(spans) > 1 and LONE_BYTES.fullmatch(spans[0].text):  # a character cut by the span's start
            spans = spans[1:]
        while len(spans) > 1 and LONE_BYTES.fullmatch(spans[-1].text):  # ... or by its end
            spans = spans[:-1]
        values = np.asarray(self.activations, np.float32)
        return [span.text for span in spans], np.array([values[span.tokens].max() for span in spans], np.float32)


class SubjectModel:
    """The profiled model, run on single windows to read the z of chosen neurons."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.neurons = locate_neurons(model)
        self.base = activation_module(model)
        self.device = next(model.parameters()).device

    def activations(self, token_ids: list[int], wanted: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """{layer: (T, len(wanted[layer])) float32}: z of the wanted neurons at every token of one window."""
        out: dict[int, np.ndarray] = {}
        columns = {layer: torch.tensor(indices, dtype=torch.long) for layer, indices in wanted.items()}

        def on_z(layer: int, z: torch.Tensor) -> None:
            if layer in columns:
                z = z.reshape(len(token_ids), -1)  # (T, d_ff): one window, no padding
                out[layer] = z[:, columns[layer].to(z.device)].float().cpu().numpy()

        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # (1, T)
        with torch.inference_mode(), capture(self.neurons, on_z):  # as the profile runs it: positions from 0
            forward_batch(self.base, input_ids, torch.ones_like(input_ids))
        return out


def load_subject(atlas: Atlas, model: str | None = None, device: str = "cpu", dtype: str = "float32",
                 trust_remote_code: bool = False) -> SubjectModel:
    """The model the atlas was profiled with (``model`` names another copy of it), checked by fingerprint."""
    name = model or atlas.meta["model"]["name_or_path"]
    loaded, tokenizer = load_model(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code, quiet=True)
    expected = atlas.meta["model"]["fingerprint"]
    if model_fingerprint(loaded) != expected:
        raise NeuronAtlasError(
            f"model {name} is not the model this atlas was profiled with (fingerprint {model_fingerprint(loaded)} "
            f"vs {expected}); pass that model with --model"
        )
    return SubjectModel(loaded, tokenizer)


class TokenStrings:
    """Token id -> string (the token alone, readable) and bytes (what it adds to the decoded text),
    from the atlas's vocab.parquet, else from the tokenizer."""

    def __init__(self, vocab: pa.Table | None, tokenizer=None):
        # A vocab table without bytes decoded each token alone (a partial character shows as U+FFFD):
        # the tokenizer, when given, reads those tokens instead.
        exact = vocab is not None and "bytes" in vocab.column_names
        use = vocab is not None and (exact or tokenizer is None)
        self.known = dict(zip(vocab["id"].to_pylist(), vocab["token"].to_pylist())) if use else {}
        self.known_bytes = vocab_bytes(vocab) if exact else {}
        self.tokenizer = tokenizer

    def __call__(self, ids: list[int]) -> list[str]:
        return [self._one(i) for i in ids]

    def pieces(self, ids: list[int]) -> list[bytes] | None:
        """Each token's bytes; None when neither the vocab table nor a tokenizer has them all."""
        missing = [i for i in ids if i not in self.known_bytes]
        if missing:
            if self.tokenizer is None:
                return None
            self.known_bytes.update(zip(missing, token_bytes(self.tokenizer, missing)))
        return [self.known_bytes[i] for i in ids]

    def _one(self, token_id: int) -> str:
        if token_id not in self.known:
            if self.tokenizer is None:
                raise NeuronAtlasError(f"token id {token_id} is not in the atlas's vocab.parquet; pass the model")
            self.known[token_id] = token_texts(self.tokenizer, [token_id])[0]
        return self.known[token_id]


def atlas_tokenizer(atlas: Atlas, model: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of the atlas's model when its vocab table lacks token bytes (older atlases),
    else None; None too when the model is not there any more (tokens then read as recorded)."""
    if atlas.vocab is not None and "bytes" in atlas.vocab.column_names:
        return None
    try:
        return load_tokenizer(model or atlas.meta["model"]["name_or_path"], trust_remote_code)
    except (OSError, ValueError, NeuronAtlasError):
        return None


def exemplar_rows(atlas_dir: str | Path, neurons: list[tuple[int, int]]) -> dict[tuple[int, int], list[dict]]:
    """Rows of exemplars.parquet for these neurons, best first (with window columns when recorded)."""
    file = Path(atlas_dir) / "exemplars.parquet"
    if not file.exists():
        raise NeuronAtlasError(f"{atlas_dir} has no exemplars.parquet; profile it with --top-k above 0")
    wanted = pa.table({"layer": pa.array([n[0] for n in neurons], pa.int32()),
                       "neuron": pa.array([n[1] for n in neurons], pa.int32())})
    connection = duckdb.connect()
    connection.register("wanted", wanted)
    source = f"read_parquet('{_quoted(file)}')"
    columns = connection.sql(f"select * from {source} limit 0").columns
    windows = window_sql(columns, alias="e.")
    windows = f", {windows}" if windows else ""
    result = connection.sql(f"select e.layer, e.neuron, e.rank, e.activation, e.seq, e.pos{windows} from {source} e "
                            "join wanted using (layer, neuron) order by e.layer, e.neuron, e.rank")
    rows: dict[tuple[int, int], list[dict]] = {key: [] for key in neurons}
    for values in result.fetchall():
        row = dict(zip(result.columns, values))
        rows[(row["layer"], row["neuron"])].append(row)
    return rows


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def top_exemplars(rows: list[dict], layer: int, index: int, contexts: dict[int, list[int]], strings: TokenStrings,
                  context: int = DEFAULT_CONTEXT, subject: SubjectModel | None = None,
                  stored: bool = True) -> list[Exemplar]:
    """One neuron's top exemplars, best first, without overlapping spans.

    Per-token activations come from the row's recorded window when ``stored`` and present (cut to
    ``context``), else from running ``subject`` on the whole window (causal models see the same
    prefix as in the profile; encoders the same window).
    """
    exemplars: list[Exemplar] = []
    computed: dict[int, np.ndarray] = {}  # seq -> (T,) z over the whole window
    for row in rows:
        ids = contexts.get(row["seq"])
        if ids is None:
            raise NeuronAtlasError(f"exemplar window {row['seq']} is missing from the atlas's contexts.parquet; profile again")
        lo, hi = max(row["pos"] - context, 0), min(row["pos"] + context + 1, len(ids))
        if any(e.seq == row["seq"] and lo < e.start + len(e.tokens) and e.start < hi for e in exemplars):
            continue
        recorded = _recorded_span(row, context) if stored else None
        if recorded is not None:
            lo, values = recorded
        elif subject is None:
            raise NeuronAtlasError("this atlas records no per-token exemplar activations; pass the subject model")
        else:
            if row["seq"] not in computed:
                computed[row["seq"]] = subject.activations(ids, {layer: [index]})[layer][:, 0]
            values = computed[row["seq"]][lo:hi]
        hi = lo + len(values)
        exemplars.append(Exemplar(ids[lo:hi], strings(ids[lo:hi]), np.asarray(values, np.float32), row["seq"], lo, "top",
                                  strings.pieces(ids[lo:hi])))
    return exemplars


def _recorded_span(row: dict, context: int) -> tuple[int, np.ndarray] | None:
    """(first position, activations) of the recorded window cut to ``context`` around pos, or None."""
    start, values = row.get("window_start"), row.get("window_activations")
    if start is None or values is None:
        return None
    values = exact_peak(values, start, row["pos"], row["activation"])
    lo, hi = max(row["pos"] - context, start), min(row["pos"] + context + 1, start + len(values))
    return lo, np.asarray(values[lo - start:hi - start], np.float32)


def contexts_of(atlas: Atlas) -> dict[int, list[int]]:
    if atlas.contexts is None:
        raise NeuronAtlasError("this atlas has no contexts.parquet (exemplar windows); profile it again with --top-k above 0")
    return dict(zip(atlas.contexts["seq"].to_pylist(), atlas.contexts["token_ids"].to_pylist()))


@dataclass
class RandomSpan:
    """A random span of a corpus window with the z of every neuron of a set over it."""

    token_ids: list[int]
    seq: int
    start: int
    activations: dict[tuple[int, int], np.ndarray]  # (layer, index) -> (T,) float32

    def exemplar(self, layer: int, index: int, strings: TokenStrings) -> Exemplar:
        return Exemplar(self.token_ids, strings(self.token_ids), self.activations[(layer, index)], self.seq,
                        self.start, "random", strings.pieces(self.token_ids))


def random_spans(subject: SubjectModel, corpus: Corpus, max_length: int, windows: int, count: int,
                 neurons: list[tuple[int, int]], context: int = DEFAULT_CONTEXT, seed: int = 0) -> list[RandomSpan]:
    """``count`` spans of 2 * context + 1 tokens (fewer at window edges) around random positions of
    distinct random windows among the corpus's first ``windows``, each run once through the model."""
    if count <= 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(windows, size=min(count, windows), replace=False).tolist())
    wanted: dict[int, list[int]] = {}
    for layer, index in neurons:
        wanted.setdefault(layer, []).append(index)
    spans = []
    for window in iter_windows(corpus, subject.tokenizer, max_length):
        if window.seq in chosen:
            spans.append(_random_span(subject, list(window.input_ids), window.seq, wanted, context, rng))
            if len(spans) == len(chosen):
                break
    return spans


def _random_span(subject: SubjectModel, ids: list[int], seq: int, wanted: dict[int, list[int]], context: int,
                 rng: np.random.Generator) -> RandomSpan:
    z = subject.activations(ids, wanted)  # {layer: (T, n)}
    center = int(rng.integers(len(ids)))
    lo, hi = max(center - context, 0), min(center + context + 1, len(ids))
    values = {(layer, index): z[layer][lo:hi, column]
              for layer, indices in wanted.items() for column, index in enumerate(indices)}
    return RandomSpan(ids[lo:hi], seq, lo, values)


def discretise(activations: np.ndarray, scale: float) -> list[int]:
    """Activations as integers 0-10, 10 = ``scale`` (the paper's display): negatives become 0."""
    if scale <= 0:
        return [0] * len(activations)
    return np.clip(np.rint(10 * np.asarray(activations, np.float64) / scale), 0, 10).astype(int).tolist()
