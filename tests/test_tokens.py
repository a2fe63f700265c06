"""Readable token text (neuronatlas.tokens) for every kind of tokenizer, on Cyrillic, Arabic, CJK and emoji.

Byte-level BPE: the bundled tiny-gpt2 and tiny-llama, and SmolLM2-135M's (a real model, skipped
unless fetched); SentencePiece: a BPE with byte fallback (Llama-2's decoders) and a Unigram with the
Metaspace decoder, both trained here; WordPiece: one trained here and all-MiniLM-L6-v2's (real);
and the word-level tokenizer of the test fixtures, read through decode.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import make_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from neuronatlas import bundled
from neuronatlas.real_models import real_model_path
from neuronatlas.tokens import (
    character_bounds, decode_bytes, display_spans, piece_text, scheme_of, token_bytes, token_texts, vocab_bytes,
    vocab_table,
)

TEXTS = [
    "Привет, мир! Москва — столица России, а Пётр живёт в Санкт-Петербурге.",
    "مرحبا بالعالم، هذه جملة عربية قصيرة.",
    "你好，世界。東京は日本の首都です。서울",
    "party 🎉🎉 family 👩‍👩‍👧 and flags 🇺🇦 done",
    "naïve café, Straße, Ελληνικά",
]
TRAINING = ["the cat sat on the mat", "Привет мир и Москва", "hello world again", "мир мир мир"] * 5


def trained_sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """A small BPE with the Metaspace pre-tokenizer, byte fallback and Llama-2's decoders."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(TRAINING, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces live in the model's vocabulary, as in Llama-2's
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def trained_unigram() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TRAINING + TEXTS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"],
                                                                           unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def trained_wordpiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(TRAINING + TEXTS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def real_tokenizer(name: str):
    path = real_model_path(name)
    if path is None:
        pytest.skip(f"the real model {name} is not fetched (make real-models)")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def check_readable(tokenizer, text: str) -> list[int]:
    """The spans of ``text``'s tokens read back as the tokenizer's decoding, with every token's value kept."""
    ids = tokenizer(text)["input_ids"]
    values = [float(i) - 0.5 * len(ids) for i in range(len(ids))]  # distinct, some negative
    pieces = token_bytes(tokenizer, ids)
    spans = display_spans(pieces, values)
    shown = "".join(span.text for span in spans)
    assert "\ufffd" not in shown and "\ufffd" not in "".join(token_texts(tokenizer, ids))
    assert shown == decode_bytes(pieces)
    # SentencePiece and WordPiece decoders drop the first token's space; the text is otherwise the same.
    assert shown.strip() == tokenizer.decode(ids).strip()
    assert [i for span in spans for i in span.tokens] == list(range(len(ids)))
    for span in spans:
        assert span.activations == [values[i] for i in span.tokens]
        assert span.activation == max(span.activations)
        assert len(span.pieces) == len(span.tokens)
    return ids


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_bundled_byte_level_tokenizers(name):
    tokenizer = AutoTokenizer.from_pretrained(str(bundled.model_path(name)))
    assert scheme_of(tokenizer).kind == "byte-level"
    for text in TEXTS:
        check_readable(tokenizer, text)
    # A Cyrillic letter is two byte tokens: alone each is a partial byte, shown as <0xNN>; together a letter.
    ids = tokenizer("П", add_special_tokens=False)["input_ids"]
    if len(ids) == 2:
        assert token_texts(tokenizer, ids) == ["<0xD0>", "<0x9F>"]
        assert [span.text for span in display_spans(token_bytes(tokenizer, ids), [1.0, 2.0])] == ["П"]


def test_sentencepiece_with_byte_fallback():
    tokenizer = trained_sentencepiece_bpe()
    assert scheme_of(tokenizer).kind == "sentencepiece"
    for text in TEXTS:
        ids = check_readable(tokenizer, text)
        assert " " + text == decode_bytes(token_bytes(tokenizer, ids)).replace("<s>", "", 1)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("ж", add_special_tokens=False)["input_ids"])
    assert "<0xD0>" in pieces  # not in the trained vocabulary: byte-fallback tokens
    assert token_bytes(tokenizer, [tokenizer.convert_tokens_to_ids("<0xD0>")]) == [b"\xd0"]


def test_sentencepiece_unigram():
    tokenizer = trained_unigram()
    assert scheme_of(tokenizer).kind == "sentencepiece"
    for text in TEXTS[:3]:
        check_readable(tokenizer, text)


def test_wordpiece():
    tokenizer = trained_wordpiece()
    assert scheme_of(tokenizer).kind == "wordpiece"
    for text in TEXTS:
        check_readable(tokenizer, text)
    ids = tokenizer("мир, кот", add_special_tokens=False)["input_ids"]
    assert decode_bytes(token_bytes(tokenizer, ids)) == " мир, кот"  # ## pieces continue a word; no space before ","


def test_word_level_tokenizer_reads_through_decode(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    assert scheme_of(tokenizer).kind == "other"
    ids = tokenizer("кот сидел на коврике")["input_ids"]
    assert decode_bytes(token_bytes(tokenizer, ids)) == "<s> кот сидел на коврике"


@pytest.mark.real
def test_smollm2_byte_level():
    tokenizer = real_tokenizer("smollm2-135m")
    assert scheme_of(tokenizer).kind == "byte-level"
    for text in TEXTS:
        check_readable(tokenizer, text)
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert token_texts(tokenizer, [special]) == ["<|im_start|>"]


@pytest.mark.real
def test_minilm_wordpiece():
    tokenizer = real_tokenizer("all-minilm-l6-v2")
    assert scheme_of(tokenizer).kind == "wordpiece"
    for text in TEXTS:
        check_readable(tokenizer, text)


def test_display_spans_of_a_window_cut_inside_characters():
    data = "Пётр 🎉".encode()
    # The window starts after П's first byte and ends inside 🎉: its first and last bytes complete no character.
    pieces = [data[1:2], data[2:3], data[3:4], data[4:9], data[9:11], data[11:12]]
    spans = display_spans(pieces, [1.0, None, 3.0, 0.5, 2.0, None])
    assert [span.text for span in spans] == ["<0x9F>", "ё", "тр ", "<0xF0><0x9F>", "<0x8E>"]
    assert [span.tokens for span in spans] == [[0], [1, 2], [3], [4], [5]]
    assert [span.activation for span in spans] == [1.0, 3.0, 0.5, 2.0, None]
    assert spans[1].pieces == ["<0xD1>", "<0x91>"] and spans[1].activations == [None, 3.0]
    assert display_spans([b"\xd0"], None)[0].activation is None
    assert piece_text(b"\xd0") == "<0xD0>" and piece_text("ok".encode()) == "ok"


def test_character_bounds_widen_a_window_cut_inside_characters():
    data = "Пётр 🎉 x".encode()
    pieces = [data[0:1], data[1:2], data[2:3], data[3:4], data[4:9], data[9:11], data[11:12], data[12:13], data[13:]]
    at = pieces.__getitem__
    # starts after П's first byte, ends inside 🎉: one token more on the left, two on the right
    assert character_bounds(at, 1, 6, len(pieces)) == (0, 8)
    assert decode_bytes(pieces[0:8]) == "Пётр 🎉"
    assert character_bounds(at, 0, 4, len(pieces)) == (0, 4)  # whole characters: unchanged
    assert character_bounds(at, 1, 6, 6) == (0, 6)  # the window's last token: nothing to add
    assert character_bounds(at, 1, 6, len(pieces), most=1) == (0, 7)  # at most one token each way
    assert character_bounds(lambda i: [b"", b"\x91"][i], 1, 2, 2) == (0, 2)  # an empty piece is no character


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.real)])
def test_every_window_of_a_byte_level_text_widens_to_whole_characters(name):
    """Every cut of Arabic, Cyrillic, CJK and emoji text into windows of 1 to 6 tokens widens to whole characters."""
    tokenizer = real_tokenizer(name) if name == "smollm2-135m" else AutoTokenizer.from_pretrained(str(bundled.model_path(name)))
    cut_inside = 0
    for text in TEXTS:
        pieces = token_bytes(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
        for lo in range(len(pieces)):
            for hi in range(lo + 1, min(lo + 7, len(pieces) + 1)):
                cut_inside += "<0x" in decode_bytes(pieces[lo:hi])
                wide_lo, wide_hi = character_bounds(pieces.__getitem__, lo, hi, len(pieces))
                assert wide_lo <= lo and hi <= wide_hi
                assert "<0x" not in decode_bytes(pieces[wide_lo:wide_hi]), (text, lo, hi)
    assert cut_inside > 0  # some cut falls inside a character (emoji, CJK; Arabic and Cyrillic too on SmolLM2)


def test_vocab_table_and_older_tables():
    tokenizer = AutoTokenizer.from_pretrained(str(bundled.model_path("tiny-llama")))
    ids = tokenizer("Москва 🎉")["input_ids"]
    table = vocab_table(tokenizer, ids + ids)
    assert table.column_names == ["id", "token", "bytes"] and table.num_rows == len(set(ids))
    assert table["id"].to_pylist() == sorted(set(ids))
    assert not any("\ufffd" in token for token in table["token"].to_pylist())
    known = vocab_bytes(table)
    assert decode_bytes([known[i] for i in ids]) == tokenizer.decode(ids)
    older = pa.table({"id": pa.array([5, 6], pa.int32()), "token": pa.array([" the", "\ufffd"])})  # no bytes
    assert vocab_bytes(older) == {5: b" the", 6: "\ufffd".encode()}
    assert vocab_bytes(None) == {}
