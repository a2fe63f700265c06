"""Corpus reading, windowing and batching.

Every format is written in tmp_path holding the same four labelled documents and must read them back
identically; tokenizers are tiny WordLevel models trained in the test (no hub access).
"""

from __future__ import annotations

import csv
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from neuronatlas.corpus import Document, Window, by_length, iter_batches, iter_windows, read_corpus, token_batches
from neuronatlas.errors import NeuronAtlasError

DOCS = [  # ordered by label, so a folder sorted by path reads them in this order too
    ("the cat sat on the mat", "en"),
    ("a dog ran, and \"the\" cat sat", "en"),
    ("le chat dort", "fr"),
    ("un chien court", "fr"),
]
TEXTS = [text for text, _ in DOCS]
LABELS = [label for _, label in DOCS]


# --- writers: each returns the path read_corpus should be given ----------------------------------


def write_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t, "lang": label, "id": i}) for i, (t, label) in enumerate(DOCS)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped
    return path


def write_csv(tmp_path):
    path = tmp_path / "c.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "lang"])
        writer.writerows([i, t, label] for i, (t, label) in enumerate(DOCS))
    return path


def write_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": TEXTS, "lang": LABELS}), path, row_group_size=3)  # 2 row groups
    return path


def write_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": TEXTS, "lang": LABELS}).save_to_disk(str(path))
    return path


def write_folder(tmp_path):
    root = tmp_path / "docs"
    for i, (text, label) in enumerate(DOCS):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.txt").write_text(text, encoding="utf-8")
    (root / "en" / "notes.md").write_text("not a document")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("skipped")
    return root


LABELLED = {
    "jsonl": (write_jsonl, dict(label_field="lang")),
    "csv": (write_csv, dict(label_field="lang")),
    "parquet": (write_parquet, dict(label_field="lang")),
    "dataset": (write_dataset, dict(label_field="lang")),
    "folder": (write_folder, dict(label_from_folder=True)),
}


@pytest.mark.parametrize("fmt", LABELLED)
def test_every_format_reads_the_same_documents(tmp_path, fmt):
    write, options = LABELLED[fmt]
    corpus = read_corpus(write(tmp_path), **options)
    assert corpus.format == fmt
    expected = [Document(i, t, label) for i, (t, label) in enumerate(DOCS)]
    assert list(corpus) == expected
    assert list(corpus) == expected  # re-iterable
    assert corpus.validate() == {"documents": 4, "documents_per_label": {"en": 2, "fr": 2}}
    described = corpus.describe()
    assert described["format"] == fmt and described["fingerprint"] == corpus.fingerprint()
    assert json.loads(json.dumps(described)) == described


def test_txt_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(("\ufeff" + "\n".join(TEXTS[:2]) + "\n  \n\r\n" + "\r\n".join(TEXTS[2:])).encode())
    corpus = read_corpus(path)
    assert [(d.index, d.text, d.label) for d in corpus] == [(i, t, None) for i, t in enumerate(TEXTS)]
    assert corpus.validate() == {"documents": 4, "documents_per_label": {}}


def test_folder_without_labels_and_explicit_format(tmp_path):
    root = write_folder(tmp_path)
    assert [d.label for d in read_corpus(root)] == [None] * 4
    assert read_corpus(root, format="folder").format == "folder"
    jsonl = tmp_path / "c.data"
    jsonl.write_text(write_jsonl(tmp_path).read_text())
    assert [d.text for d in read_corpus(jsonl, format="jsonl")] == TEXTS


def test_labels_become_strings(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "y": 3}\n{"text": "b", "y": true}\n')
    assert [d.label for d in read_corpus(path, label_field="y")] == ["3", "True"]
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "y": [1, 2]}), parquet)
    assert [d.label for d in read_corpus(parquet, label_field="y")] == ["1", "2"]


def test_csv_quoted_newline_and_long_field(tmp_path):
    path = tmp_path / "c.csv"
    long_text = "word " * 40_000  # over csv's default 128 KiB field limit
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["text"], ["two\nlines"], [long_text]])
    before = csv.field_size_limit()
    assert [d.text for d in read_corpus(path)] == ["two\nlines", long_text]
    assert csv.field_size_limit() == before


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(tmp_path):
    path = write_jsonl(tmp_path)
    base = read_corpus(path, label_field="lang").fingerprint()
    assert read_corpus(path, label_field="lang").fingerprint() == base
    assert len(base) == 64
    assert read_corpus(path).fingerprint() != base  # options count
    assert read_corpus(path, label_field="id").fingerprint() != base
    path.write_text(path.read_text().replace("cat", "cow"))
    assert read_corpus(path, label_field="lang").fingerprint() != base


def test_folder_fingerprint_covers_names_and_contents(tmp_path):
    root = write_folder(tmp_path)
    base = read_corpus(root, label_from_folder=True).fingerprint()
    (root / "en" / "notes.md").write_text("not read, so not fingerprinted")
    assert read_corpus(root, label_from_folder=True).fingerprint() == base
    (root / "en" / "0.txt").rename(root / "fr" / "0.txt")
    moved = read_corpus(root, label_from_folder=True).fingerprint()
    assert moved != base
    (root / "fr" / "3.txt").write_text("changed")
    assert read_corpus(root, label_from_folder=True).fingerprint() != moved


# --- windows -------------------------------------------------------------------------------------


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose post-processor adds bos ("llama"), nothing ("gpt2"), [CLS]/[SEP] ("bert")
    or eos after the text only ("eos", as T5's tokenizer does)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    elif kind == "bert":
        tok.post_processor = processors.BertProcessing(("</s>", eos), ("<s>", bos))
    elif kind == "eos":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert", "eos"])
def tokenizer(request):
    return request.param, _tokenizer(request.param)


def _content(kind, input_ids):
    """The content tokens of a window: its ids without the special tokens the tokenizer added."""
    cut = {"llama": slice(1, None), "bert": slice(1, -1), "eos": slice(None, -1)}.get(kind, slice(None))
    return list(input_ids[cut])


def test_iter_windows_splits_long_documents(tokenizer):
    kind, tok = tokenizer
    long_text = " ".join(TEXTS * 5)
    docs = [Document(0, "", "x"), Document(1, long_text, "en"), Document(2, "le chat", "fr")]
    windows = list(iter_windows(docs, tok, max_length=8))
    size = 8 - tok.num_special_tokens_to_add(pair=False)
    tokens = tok(long_text, add_special_tokens=False)["input_ids"]
    long = [w for w in windows if w.doc == 1]
    assert [w.start for w in long] == list(range(0, len(tokens), size))
    assert all(len(w.input_ids) <= 8 for w in windows)
    assert [t for w in long for t in _content(kind, w.input_ids)] == tokens
    for w in long:
        assert _content(kind, w.input_ids) == tokens[w.start : w.start + size]
        expected = tok(tok.decode(tokens[w.start : w.start + size]))["input_ids"]  # specials as the tokenizer adds them
        assert list(w.input_ids) == expected
    assert [w.seq for w in windows] == list(range(len(windows)))  # the empty document gives none
    assert windows[-1].doc == 2 and windows[-1].label == "fr" and windows[-1].start == 0
    assert list(iter_windows(docs, tok, max_length=8)) == windows  # deterministic


def test_iter_windows_uses_build_inputs_when_present():
    class Slow:  # the transformers "python" tokenizer interface
        def num_special_tokens_to_add(self, pair=False):
            return 2

        def build_inputs_with_special_tokens(self, ids):
            return [100] + ids + [101]

        def __call__(self, texts, add_special_tokens, verbose, padding, truncation):  # a batch of texts
            return {"input_ids": [[len(word) for word in text.split()] for text in texts]}

    windows = list(iter_windows([Document(0, "a bb ccc dddd e", None)], Slow(), max_length=4))
    assert [w.input_ids for w in windows] == [(100, 1, 2, 101), (100, 3, 4, 101), (100, 1, 101)]
    assert [w.start for w in windows] == [0, 2, 4]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "eos"])
def test_iter_windows_ignores_padding_and_truncation_the_tokenizer_file_switches_on(kind):
    plain, padded = _tokenizer(kind), _tokenizer(kind)
    padded.backend_tokenizer.enable_padding(length=16, pad_id=0, pad_token="<pad>")  # as all-MiniLM-L6-v2 ships
    padded.backend_tokenizer.enable_truncation(max_length=3)
    docs = [Document(i, " ".join(TEXTS[i:] * 3), None) for i in range(len(TEXTS))]
    windows = list(iter_windows(docs, padded, max_length=8))
    assert windows == list(iter_windows(docs, plain, max_length=8))
    lengths = [len(plain(doc.text, add_special_tokens=False)["input_ids"]) for doc in docs]
    specials = plain.num_special_tokens_to_add(pair=False)
    assert sum(len(w.input_ids) for w in windows) == sum(lengths) + specials * len(windows)


def test_iter_windows_max_length_too_small(tokenizer):
    kind, tok = tokenizer
    specials = tok.num_special_tokens_to_add(pair=False)
    with pytest.raises(NeuronAtlasError, match=f"max_length {specials}"):
        iter_windows([], tok, max_length=specials)


# --- batches -------------------------------------------------------------------------------------


def _windows():
    return [Window(i, i, None, 0, tuple(range(10 * i + 1, 10 * i + 1 + n))) for i, n in enumerate([3, 5, 1, 4, 2])]


@pytest.mark.parametrize("side", ["left", "right"])
def test_iter_batches_pads_on_the_given_side(side):
    windows = _windows()
    batches = list(iter_batches(iter(windows), batch_size=3, pad_token_id=0, padding_side=side))
    assert [b.windows for b in batches] == [windows[:3], windows[3:]]
    assert [tuple(b.input_ids.shape) for b in batches] == [(3, 5), (2, 4)]
    for batch in batches:
        assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
        width = batch.input_ids.shape[1]
        for row, window in enumerate(batch.windows):
            mask = batch.attention_mask[row].bool()
            assert tuple(batch.input_ids[row][mask].tolist()) == window.input_ids
            assert (batch.input_ids[row][~mask] == 0).all()
            n = len(window.input_ids)
            real = slice(0, n) if side == "right" else slice(width - n, width)
            assert batch.attention_mask[row, real].sum() == n == batch.attention_mask[row].sum()


@pytest.mark.parametrize("size,budget", [(1, 0), (2, 0), (1, 8), (2, 8), (1, 100)])
def test_token_batches_take_batch_size_windows_and_more_within_the_budget(size, budget):
    windows = by_length(_windows())  # lengths 5, 4, 3, 2, 1
    batches = list(token_batches(windows, size, budget, pad_token_id=0))
    assert sorted(w.seq for b in batches for w in b.windows) == list(range(5))  # every window once
    for batch in batches:  # rows in corpus order: uids ascending, as the statistics rank ties
        assert [w.seq for w in batch.windows] == sorted(w.seq for w in batch.windows)
    for batch in batches:
        assert len(batch.windows) <= size or batch.input_ids.numel() <= budget
    taken = {(1, 0): [1, 1, 1, 1, 1], (2, 0): [2, 2, 1],  # budget 0: batch_size windows, as iter_batches
             (1, 8): [1, 2, 2],  # 5 alone (2 x 5 > 8); 4 + 3 (2 x 4 = 8, 3 x 4 > 8); 2 + 1
             (2, 8): [2, 2, 1],  # 5 + 4 (the batch size; a third: 3 x 5 > 8); 3 + 2 (3 x 3 > 8); 1
             (1, 100): [5]}
    assert [len(b.windows) for b in batches] == taken[(size, budget)]


def test_iter_batches_rejects_bad_arguments():
    with pytest.raises(NeuronAtlasError, match="'middle'"):
        iter_batches(_windows(), 2, 0, padding_side="middle")
    with pytest.raises(NeuronAtlasError, match="batch_size"):
        iter_batches(_windows(), 0, 0)
    with pytest.raises(NeuronAtlasError, match="pad_token_id"):
        iter_batches(_windows(), 2, None)


# --- errors --------------------------------------------------------------------------------------


def _error(make, *match: str) -> str:
    """Run ``make`` (reading fully), expect a one-line NeuronAtlasError containing every ``match``."""
    with pytest.raises(NeuronAtlasError) as info:
        result = make()
        if hasattr(result, "validate"):
            result.validate()
    message = str(info.value)
    assert "\n" not in message
    for part in match:
        assert part in message, message
    return message


def test_missing_path_and_unknown_format(tmp_path):
    _error(lambda: read_corpus(tmp_path / "nope.jsonl"), "corpus file not found", "nope.jsonl")
    (tmp_path / "c.xml").write_text("<a/>")
    _error(lambda: read_corpus(tmp_path / "c.xml"), "'.xml'", "c.xml")
    _error(lambda: read_corpus(tmp_path / "c.xml", format="xml"), "'xml'", "txt, jsonl")
    _error(lambda: read_corpus(tmp_path, format="jsonl"), "is a folder", "'jsonl'")


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    _error(lambda: read_corpus(tmp_path / "blank.txt"), "no documents", "blank.txt")
    (tmp_path / "empty.csv").write_text("")
    _error(lambda: read_corpus(tmp_path / "empty.csv"), "no documents")
    (tmp_path / "header.csv").write_text("text,lang\n")
    _error(lambda: read_corpus(tmp_path / "header.csv", label_field="lang"), "no documents")
    (tmp_path / "folder").mkdir()
    _error(lambda: read_corpus(tmp_path / "folder"), "no documents", "folder")


def test_jsonl_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b" "lang": 1}\n')
    _error(lambda: read_corpus(path), "line 3 is not valid JSON", "Expecting ',' delimiter", "c.jsonl")
    path.write_text('{"text": "a"}\n{"body": "b", "lang": "en"}\n')
    _error(lambda: read_corpus(path), "line 2", "'text'", "'body', 'lang'")
    path.write_text('{"text": "a", "lang": "en"}\n{"text": "b"}\n')
    _error(lambda: read_corpus(path, label_field="lang"), "line 2", "label field 'lang'", "fields: 'text'")
    path.write_text('{"text": 5}\n')
    _error(lambda: read_corpus(path), "line 1", "'text'", "int, not a string")
    path.write_text('{"text": null}\n')
    _error(lambda: read_corpus(path), "null, not a string")
    path.write_text('["text"]\n')
    _error(lambda: read_corpus(path), "line 1 is a JSON array, not an object")
    path.write_text('{"text": "a", "lang": null}\n')
    _error(lambda: read_corpus(path, label_field="lang"), "line 1", "'lang' is null")


def test_csv_errors(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("body,lang\nhello,en\n")
    _error(lambda: read_corpus(path), "header", "'text'", "'body', 'lang'")
    path.write_text("text,lang\nhello,en\nshort\n")
    _error(lambda: read_corpus(path, label_field="lang"), "line 3", "label field 'lang'", "fields: 'text'")
    _error(lambda: read_corpus(path, label_field="topic"), "header", "'topic'", "'text', 'lang'")


def test_parquet_missing_column_from_schema(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a"], "lang": ["en"]}), path)

    def no_rows(*args, **kwargs):
        raise AssertionError("rows read before the schema was checked")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_rows)
    _error(lambda: read_corpus(path), "schema", "'text'", "'body', 'lang'")
    _error(lambda: read_corpus(path, text_field="body", label_field="topic"), "'topic'", "'body', 'lang'")
    (tmp_path / "bad.parquet").write_text("not parquet")
    _error(lambda: read_corpus(tmp_path / "bad.parquet"), "not a readable parquet file")


def test_parquet_non_string_text(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), path)
    _error(lambda: read_corpus(path), "row 2", "null, not a string")


def test_dataset_errors(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = write_dataset(tmp_path)
    _error(lambda: read_corpus(path, label_field="topic"), "schema", "'topic'", "'text', 'lang'")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(splits))
    _error(lambda: read_corpus(splits), "splits (train)", str(splits / "train"))
    assert [d.text for d in read_corpus(splits / "train")] == ["a"]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    _error(lambda: read_corpus(path), "'datasets' package", "pip install")


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("fine\n".encode() + b"caf\xe9\n")
    _error(lambda: read_corpus(path), "c.txt line 2 (byte 8)", "not valid UTF-8", "re-encode")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": "caf\xe9"}\n')
    _error(lambda: read_corpus(jsonl), "c.jsonl line 1", "UTF-8")
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b"text\nok\ncaf\xe9\n")
    _error(lambda: read_corpus(csv_path), "c.csv line 3", "UTF-8")
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_bytes(b"one\ntwo \xff\n")
    _error(lambda: read_corpus(root), "a.txt line 2 (byte 8)", "UTF-8")


def test_option_mismatches(tmp_path):
    root = write_folder(tmp_path)
    (root / "loose.txt").write_text("no label folder")
    _error(lambda: read_corpus(root, label_from_folder=True), "loose.txt", "label subfolder")
    _error(lambda: read_corpus(root, label_field="lang"), "label_field 'lang'", "label_from_folder")
    _error(lambda: read_corpus(write_jsonl(tmp_path), label_from_folder=True), "label_from_folder", "'jsonl'")


def test_invalid_text_is_an_error_naming_its_line_or_replaced_with_a_count(tmp_path, capsys):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text('{"text": "fine", "lang": "en"}\n{"text": "a \\ud800 b \\udfff", "lang": "en"}\n', encoding="utf-8")
    _error(lambda: read_corpus(jsonl), "s.jsonl line 2", "lone surrogate", "--on-invalid-text replace")
    labels = tmp_path / "l.jsonl"
    labels.write_text('{"text": "fine", "lang": "e\\udc80"}\n', encoding="utf-8")
    _error(lambda: read_corpus(labels, label_field="lang"), "l.jsonl line 1", "'lang'", "surrogate")
    replaced = read_corpus(jsonl, on_invalid_text="replace")
    assert [d.text for d in replaced] == ["fine", "a \ufffd b \ufffd"]
    assert list(replaced) and "replaced 2 invalid character(s) in 1 line(s)" in capsys.readouterr().err  # noted once
    assert capsys.readouterr().err == ""
    text = tmp_path / "b.txt"
    text.write_bytes(b"caf\xe9 \xef\xbf\xbd\nok\n")  # a U+FFFD already in the file is not counted
    assert [d.text for d in read_corpus(text, on_invalid_text="replace")] == ["caf\ufffd \ufffd", "ok"]
    assert "replaced 1 invalid character(s)" in capsys.readouterr().err
    assert read_corpus(text, on_invalid_text="replace").fingerprint() == read_corpus(text).fingerprint()
    _error(lambda: read_corpus(text, on_invalid_text="skip"), "on_invalid_text", "'skip'")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "eos"])
def test_iter_windows_tokenises_in_groups_as_one_document_at_a_time(kind):
    tokenizer = _tokenizer(kind)
    docs = [Document(i, " ".join(TEXTS[: i % len(TEXTS) + 1]), None) for i in range(150)]  # groups 1, 2 ... 64
    one_by_one = [list(iter_windows([doc], tokenizer, max_length=5)) for doc in docs]
    expected = [(doc.index, window.start, window.input_ids) for doc, windows in zip(docs, one_by_one) for window in windows]
    grouped = list(iter_windows(docs, tokenizer, max_length=5))
    assert [(w.doc, w.start, w.input_ids) for w in grouped] == expected
    assert [w.seq for w in grouped] == list(range(len(expected)))
