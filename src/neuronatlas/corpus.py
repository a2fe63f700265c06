"""Read a corpus from disk as a deterministic stream of documents, and cut it into model-sized windows.

Formats (auto-detected from the path unless ``format`` is given):

- ``txt``: one document per non-empty line.
- ``jsonl`` (``.jsonl`` / ``.json``): one JSON object per non-empty line.
- ``csv``: a header row, then one document per row; fields are columns.
- ``parquet``: read in record batches with pyarrow; fields are columns.
- ``dataset``: a folder written by ``datasets.Dataset.save_to_disk`` (a saved DatasetDict is refused:
  point at one of its split folders).
- ``folder``: any other folder; every ``*.txt`` file below it (recursively, sorted by relative path,
  hidden files and folders skipped) is one document, labelled by its first-level subfolder when
  ``label_from_folder`` is set.

Text that is not valid Unicode (bytes that are not UTF-8, a JSON ``"\\ud800"`` escape of a lone
surrogate) stops the reading naming its line, or with ``on_invalid_text="replace"`` becomes U+FFFD and
is counted in one note on stderr.

Every problem a user can fix raises :class:`~neuronatlas.errors.NeuronAtlasError` with a one-line
message naming the file, the line or row, and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from .corpus_text import INVALID_TEXT, TextRepairs, read_lines, read_text_file, valid_text
from .errors import NeuronAtlasError

FORMATS = ("txt", "jsonl", "csv", "parquet", "dataset", "folder")
_FOLDER_FORMATS = ("dataset", "folder")
_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by datasets' save_to_disk
_ROWS_PER_READ = 1024  # rows per parquet record batch / dataset batch
_CSV_FIELD_LIMIT = 2**31 - 1  # csv's default (128 KiB) is too small for long documents


@dataclass(frozen=True)
class Document:
    index: int  # 0-based position in the corpus, stable across runs
    text: str
    label: str | None


@dataclass(frozen=True)
class Corpus:
    """A re-iterable, deterministic stream of Documents read from disk. Build it with :func:`read_corpus`."""

    path: Path
    format: str  # one of FORMATS
    text_field: str = "text"
    label_field: str | None = None
    label_from_folder: bool = False
    on_invalid_text: str = "error"  # one of INVALID_TEXT; not in the fingerprint: both read valid text alike
    repairs: TextRepairs = field(default_factory=TextRepairs, compare=False, repr=False)

    def __iter__(self) -> Iterator[Document]:
        self.repairs.characters = self.repairs.places = 0
        records = _READERS[self.format](self)  # (text, label) pairs
        for index, (text, label) in enumerate(records):
            yield Document(index, text, label)
        if self.repairs.characters and not self.repairs.noted:
            self.repairs.noted = True
            print(f"neuronatlas: note: replaced {self.repairs.characters:,} invalid character(s) in "
                  f"{self.repairs.places:,} line(s) or row(s) of {self.path} with U+FFFD (--on-invalid-text replace)",
                  file=sys.stderr)

    def validate(self) -> dict:
        """Parse the whole corpus once; raise on the first problem or if it holds no documents."""
        documents = 0
        per_label: Counter[str] = Counter()
        for doc in self:
            documents += 1
            if doc.label is not None:
                per_label[doc.label] += 1
        if documents == 0:
            raise NeuronAtlasError(f"corpus has no documents: {self.path} (add text to it, or check the path and format)")
        return {"documents": documents, "documents_per_label": dict(sorted(per_label.items()))}

    def fingerprint(self) -> str:
        """sha256 hex of the reading options and the bytes of the source file(s), read in chunks."""
        digest = hashlib.sha256(json.dumps(self._options(), sort_keys=True).encode())
        for relative, file in _source_files(self):
            digest.update(f"\0{relative}\0{file.stat().st_size}\0".encode())  # frames each file's bytes
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def describe(self) -> dict:
        """JSON-ready description: absolute path, reading options and fingerprint."""
        return {"path": str(self.path.resolve()), **self._options(), "fingerprint": self.fingerprint()}

    def _options(self) -> dict:
        return {
            "format": self.format,
            "text_field": self.text_field,
            "label_field": self.label_field,
            "label_from_folder": self.label_from_folder,
        }

    @property
    def replacing(self) -> TextRepairs | None:
        """Where replaced invalid text is counted; None when invalid text is an error."""
        return self.repairs if self.on_invalid_text == "replace" else None

    @property
    def _fields(self) -> list[str]:
        """The fields every record must have."""
        return [self.text_field] + ([self.label_field] if self.label_field is not None else [])


def read_corpus(
    path: str | Path,
    text_field: str = "text",
    label_field: str | None = None,
    format: str | None = None,
    label_from_folder: bool = False,
    on_invalid_text: str = "error",
) -> Corpus:
    """Open a corpus: check the path and options now, read lazily when iterated. ``on_invalid_text``:
    "error" stops at text that is not valid Unicode, "replace" reads it as U+FFFD and counts it."""
    path = Path(path)
    if on_invalid_text not in INVALID_TEXT:
        raise NeuronAtlasError(f"on_invalid_text must be one of {', '.join(INVALID_TEXT)}, not {on_invalid_text!r}")
    if not path.exists():
        raise NeuronAtlasError(f"corpus file not found: {path} (check the --corpus path)")
    fmt = _detect_format(path) if format is None else _check_format(path, format)
    if label_from_folder and fmt != "folder":
        raise NeuronAtlasError(
            f"label_from_folder needs a folder of text files, but {path} is read as {fmt!r} (use label_field instead)"
        )
    if label_field is not None and fmt in ("txt", "folder"):
        raise NeuronAtlasError(
            f"label_field {label_field!r} cannot be used with {fmt!r} corpus {path}: it has no fields "
            "(use jsonl/csv/parquet, or label_from_folder for a folder)"
        )
    return Corpus(path, fmt, text_field, label_field, label_from_folder, on_invalid_text)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "dataset" if any((path / name).is_file() for name in _DATASET_MARKERS) else "folder"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise NeuronAtlasError(
            f"unknown corpus format for {path}: suffix {path.suffix!r} "
            "(use .txt, .jsonl, .json, .csv, .parquet or a folder, or pass the format explicitly)"
        )
    return fmt


def _check_format(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise NeuronAtlasError(f"unknown corpus format: {fmt!r} (use one of {', '.join(FORMATS)})")
    if path.is_dir() != (fmt in _FOLDER_FORMATS):
        kind = "a folder" if path.is_dir() else "a file"
        raise NeuronAtlasError(f"corpus {path} is {kind}, which format {fmt!r} cannot read (omit format to auto-detect)")
    return fmt


# --- readers: each yields (text, label) pairs in a fixed order ------------------------------------


def _read_txt(corpus: Corpus) -> Iterator[tuple[str, str | None]]:
    for _, line in read_lines(corpus.path, corpus.replacing):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line, None


def _read_jsonl(corpus: Corpus) -> Iterator[tuple[str, str | None]]:
    for number, line in read_lines(corpus.path, corpus.replacing):
        if not line.strip():
            continue
        where = f"{corpus.path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NeuronAtlasError(f"{where} is not valid JSON: {error.msg} (fix the line or remove it)") from None
        if not isinstance(record, dict):
            raise NeuronAtlasError(
                f"{where} is a JSON {_type_name(record)}, not an object (write one JSON object per line)"
            )
        yield _pick(record, corpus, where)


def _read_csv(corpus: Corpus) -> Iterator[tuple[str, str | None]]:
    reader = csv.reader(line for _, line in read_lines(corpus.path, corpus.replacing))  # lines keep their ends for quoted newlines
    with _csv_field_limit():
        try:
            header = next(reader, None)
            if header is None:
                return
            _require_fields(header, corpus, f"{corpus.path} header")
            for row in reader:
                if row:  # a blank line is not a document
                    yield _pick(dict(zip(header, row)), corpus, f"{corpus.path} line {reader.line_num}")
        except csv.Error as error:
            raise NeuronAtlasError(
                f"{corpus.path} line {reader.line_num} is not valid CSV: {error} (fix the quoting on that line)"
            ) from None


def _read_parquet(corpus: Corpus) -> Iterator[tuple[str, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(corpus.path)
    except (pa.ArrowException, OSError) as error:
        raise NeuronAtlasError(
            f"{corpus.path} is not a readable parquet file: {_first_line(error)} (check the file, or write it again)"
        ) from None
    _require_fields(parquet.schema_arrow.names, corpus, f"{corpus.path} schema")
    row = 0
    for batch in parquet.iter_batches(batch_size=_ROWS_PER_READ, columns=corpus._fields):
        for record in batch.to_pylist():
            row += 1
            yield _pick(record, corpus, f"{corpus.path} row {row}")


def _read_dataset(corpus: Corpus) -> Iterator[tuple[str, str | None]]:
    dataset = _load_dataset(corpus.path)
    _require_fields(dataset.column_names, corpus, f"{corpus.path} schema")
    row = 0
    for batch in dataset.select_columns(corpus._fields).iter(batch_size=_ROWS_PER_READ):  # {field: [values]}
        for values in zip(*(batch[field] for field in corpus._fields)):
            row += 1
            yield _pick(dict(zip(corpus._fields, values)), corpus, f"{corpus.path} row {row}")


def _read_folder(corpus: Corpus) -> Iterator[tuple[str, str | None]]:
    for relative, file in _source_files(corpus):
        label = None
        if corpus.label_from_folder:
            parts = relative.split("/")
            if len(parts) < 2:
                raise NeuronAtlasError(
                    f"{file} is not inside a label subfolder of {corpus.path} "
                    "(move it into a subfolder named after its label, or drop label_from_folder)"
                )
            label = parts[0]
        yield read_text_file(file, corpus.replacing), label


_READERS: dict[str, Callable[[Corpus], Iterator[tuple[str, str | None]]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "dataset": _read_dataset,
    "folder": _read_folder,
}


# --- reader helpers -------------------------------------------------------------------------------


def _require_fields(available: Iterable[str], corpus: Corpus, where: str) -> None:
    """Raise naming the first of corpus._fields that ``available`` lacks, and listing what it has."""
    available = list(available)
    for name in corpus._fields:
        if name not in available:
            kind = "text" if name == corpus.text_field else "label"
            listed = ", ".join(repr(field) for field in available) or "none"
            raise NeuronAtlasError(
                f"{where} has no {kind} field {name!r} (fields: {listed}; "
                f"set {kind}_field / --{kind}-field to one of them)"
            )


def _pick(record: dict, corpus: Corpus, where: str) -> tuple[str, str | None]:
    """(text, label) of one record (JSON object, CSV row, parquet or dataset row); labels become str."""
    _require_fields(record, corpus, where)
    text = record[corpus.text_field]
    if not isinstance(text, str):
        raise NeuronAtlasError(
            f"{where}: text field {corpus.text_field!r} is {_type_name(text)}, not a string "
            "(store the text as a string)"
        )
    text = valid_text(text, corpus.replacing, where, corpus.text_field)
    if corpus.label_field is None:
        return text, None
    label = record[corpus.label_field]
    if label is None:
        raise NeuronAtlasError(
            f"{where}: label field {corpus.label_field!r} is null (give every document a label, or drop label_field)"
        )
    return text, valid_text(str(label), corpus.replacing, where, corpus.label_field)


def _load_dataset(path: Path):
    """datasets.load_from_disk(path), which must hold a single Dataset (not a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise NeuronAtlasError(
            f"reading the saved dataset {path} needs the 'datasets' package (pip install 'neuronatlas[data]')"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises many kinds; any of them means the folder is unusable
        raise NeuronAtlasError(
            f"cannot load the saved dataset {path}: {_first_line(error)} (save it again with save_to_disk)"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        example = path / next(iter(dataset))
        raise NeuronAtlasError(
            f"{path} holds several splits ({splits}); point the corpus path at one split folder, e.g. {example}"
        )
    return dataset


def _source_files(corpus: Corpus) -> list[tuple[str, Path]]:
    """(relative posix path, file) of every file the corpus reads, sorted; ("", path) for a single file."""
    if corpus.format not in _FOLDER_FORMATS:
        return [("", corpus.path)]
    pattern = "*.txt" if corpus.format == "folder" else "*"
    files = []
    for file in corpus.path.rglob(pattern):
        relative = file.relative_to(corpus.path)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), file))
    return sorted(files)


@contextmanager
def _csv_field_limit():
    """Allow CSV fields as long as a whole document while reading, then restore csv's limit."""
    previous = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _type_name(value) -> str:
    return {type(None): "null", dict: "object", list: "array"}.get(type(value), type(value).__name__)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- windows and batches --------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    seq: int  # global 0-based window index across the corpus
    doc: int  # Document.index
    label: str | None
    start: int  # offset of the window's first content token within the document's tokens
    input_ids: tuple[int, ...]  # including the tokenizer's special tokens


def iter_windows(documents: Iterable[Document], tokenizer, max_length: int) -> Iterator[Window]:
    """Cut each document's tokens into windows of at most ``max_length`` ids, special tokens included.

    Documents are tokenised without special tokens, split into chunks of
    ``max_length - tokenizer.num_special_tokens_to_add()`` tokens, and each chunk is wrapped with the
    tokenizer's single-sequence special tokens (bos for Llama, none for GPT-2, [CLS]/[SEP] for BERT).
    Documents with no tokens give no windows. Padding and truncation a tokenizer file switches on
    (all-MiniLM-L6-v2's pads and cuts at 128) never apply: a window holds exactly its text's tokens
    and its special tokens.
    """
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    size = max_length - specials
    if size < 1:
        raise NeuronAtlasError(
            f"max_length {max_length} leaves no room for text: the tokenizer adds {specials} special token(s) "
            f"per window (use max_length > {specials})"
        )
    return _windows(documents, tokenizer, size, _special_tokens_wrapper(tokenizer))


TOKENIZE_GROUP = 64  # documents per tokenizer call, at most (the groups grow 1, 2, 4 ... up to it)


def _windows(documents, tokenizer, size: int, wrap: Callable[[list[int]], list[int]]) -> Iterator[Window]:
    seq = 0
    for group in _growing_groups(iter(documents)):
        # one call a group: a fast tokenizer encodes a batch at once (the ids are those of one call each)
        encoded = tokenizer([doc.text for doc in group], add_special_tokens=False, padding=False, truncation=False,
                            verbose=False)["input_ids"]
        for doc, ids in zip(group, encoded):
            for start in range(0, len(ids), size):
                yield Window(seq, doc.index, doc.label, start, tuple(wrap(list(ids[start : start + size]))))
                seq += 1


def _growing_groups(documents: Iterator[Document]) -> Iterator[list[Document]]:
    """Lists of consecutive documents of 1, 2, 4 ... then TOKENIZE_GROUP: the first windows come at once."""
    size = 1
    while group := list(islice(documents, size)):
        yield group
        size = min(2 * size, TOKENIZE_GROUP)


def _special_tokens_wrapper(tokenizer) -> Callable[[list[int]], list[int]]:
    """A function chunk -> chunk wrapped in the tokenizer's special tokens for a single sequence."""
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    if build is not None:
        return build
    # transformers 5's fast tokenizers have no build_inputs_with_special_tokens: ask the Rust
    # post-processor instead, by encoding a one-word probe and keeping what surrounds it.
    # The backend may still pad (to a fixed length, e.g. 128) as its tokenizer.json says: pads have
    # attention mask 0 and are dropped.
    probe = tokenizer.backend_tokenizer.encode(["a"], is_pretokenized=True, add_special_tokens=True)
    kept = [(token, sequence)
            for token, sequence, real in zip(probe.ids, probe.sequence_ids, probe.attention_mask) if real]
    content = [i for i, (_, sequence) in enumerate(kept) if sequence is not None]
    if not content:
        raise NeuronAtlasError(
            f"cannot tell where {type(tokenizer).__name__} puts its special tokens: it encodes 'a' to no tokens "
            "(use a tokenizer with a byte-level or unknown-token fallback)"
        )
    prefix = [token for token, _ in kept[: content[0]]]
    suffix = [token for token, _ in kept[content[-1] + 1 :]]
    return lambda chunk: [*prefix, *chunk, *suffix]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token, 0 = padding
    windows: list[Window]


def iter_batches(
    windows: Iterable[Window], batch_size: int, pad_token_id: int, padding_side: str = "right"
) -> Iterator[Batch]:
    """Group consecutive windows into batches padded to their longest window on ``padding_side``."""
    if padding_side not in ("left", "right"):
        raise NeuronAtlasError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if batch_size < 1:
        raise NeuronAtlasError(f"batch_size must be at least 1, not {batch_size}")
    if pad_token_id is None:
        raise NeuronAtlasError("pad_token_id is None: the tokenizer has no pad token (pass its eos_token_id instead)")
    return _batches(iter(windows), batch_size, pad_token_id, padding_side)


def token_batches(windows: list[Window], batch_size: int, batch_tokens: int, pad_token_id: int,
                  side: str = "right") -> Iterator[Batch]:
    """Consecutive windows in batches of ``batch_size`` windows, and more while the batch stays within
    ``batch_tokens`` padded tokens (rows x longest; 0: never more). In a buffer sorted by length
    (:func:`by_length`) short windows then share one forward pass: a small model's per-batch cost
    (a Python call per layer) is spread over more tokens. Each batch's rows are in corpus order
    (ascending ``seq``), whatever the order of ``windows``: the statistics break exemplar ties by a
    token's place in the corpus and take a batch's tokens in that order."""
    group: list[Window] = []
    longest = 0
    for window in windows:
        length = max(longest, len(window.input_ids))
        if len(group) >= batch_size and (len(group) + 1) * length > batch_tokens:
            yield _pad(sorted(group, key=_corpus_order), pad_token_id, side)
            group, length = [], len(window.input_ids)
        group.append(window)
        longest = length
    if group:
        yield _pad(sorted(group, key=_corpus_order), pad_token_id, side)


def _corpus_order(window: Window) -> int:
    return window.seq


def buffers(windows: Iterable[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive runs of ``size`` windows (the last may be shorter), in corpus order."""
    windows = iter(windows)
    while group := list(islice(windows, size)):
        yield group


def by_length(windows: list[Window]) -> list[Window]:
    """The windows of a buffer, longest first (ties in corpus order): batches cut from them hold
    windows of like length, so padding is barely computed. Deterministic; what runs a buffer takes
    its windows in any order (the document sample folds a document's windows as they come)."""
    return sorted(windows, key=lambda window: (-len(window.input_ids), window.seq))


def _batches(windows: Iterator[Window], batch_size: int, pad_token_id: int, side: str) -> Iterator[Batch]:
    for group in buffers(windows, batch_size):
        yield _pad(group, pad_token_id, side)


def _pad(windows: list[Window], pad_token_id: int, side: str) -> Batch:
    width = max(len(window.input_ids) for window in windows)
    input_ids = torch.full((len(windows), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)  # (B, T)
    for row, window in enumerate(windows):
        n = len(window.input_ids)
        columns = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[row, columns] = torch.tensor(window.input_ids, dtype=torch.long)
        attention_mask[row, columns] = 1
    return Batch(input_ids, attention_mask, windows)
