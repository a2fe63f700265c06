"""Decoding a corpus's bytes and strings into valid text, for :mod:`neuronatlas.corpus`.

Text that is not valid Unicode (bytes that are not UTF-8, a JSON ``"\\ud800"`` escape of a lone
surrogate the tokenizer cannot encode) is an error naming its file and line, or, when the reader passes
a :class:`TextRepairs`, is replaced by U+FFFD and counted there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import NeuronAtlasError

INVALID_TEXT = ("error", "replace")  # --on-invalid-text
_SURROGATE = re.compile("[\ud800-\udfff]")  # left in a str by JSON escapes; not encodable as UTF-8
_REPLACEMENT_BYTES = "\ufffd".encode()


@dataclass
class TextRepairs:
    """Invalid text replaced by U+FFFD during one reading of a corpus (``on_invalid_text="replace"``)."""

    characters: int = 0  # replaced characters (a run of undecodable bytes may count once)
    places: int = 0  # lines, rows or files that held any
    noted: bool = False  # the note was printed (once per Corpus)

    def add(self, count: int) -> None:
        if count > 0:
            self.characters += count
            self.places += 1


def read_lines(path: Path, repairs: TextRepairs | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its line ending) decoded as strict UTF-8 (bytes that are not
    replaced by U+FFFD and counted in ``repairs`` when given), one line at a time."""
    offset = 0  # byte offset of the current line
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                if repairs is None:
                    raise _not_utf8(path, number, offset + error.start) from None
                line = _replaced(raw, repairs)
            offset += len(raw)
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def read_text_file(file: Path, repairs: TextRepairs | None = None) -> str:
    """A whole file as strict UTF-8 (or replaced, as in :func:`read_lines`), a leading byte-order mark dropped."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        if repairs is None:
            raise _not_utf8(file, data.count(b"\n", 0, error.start) + 1, error.start) from None
        text = _replaced(data, repairs)
    return text.removeprefix("\ufeff")


def _replaced(raw: bytes, repairs: TextRepairs) -> str:
    text = raw.decode("utf-8", errors="replace")
    repairs.add(text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES))  # U+FFFD already in the file is not counted
    return text


def _not_utf8(path: Path, line: int, offset: int) -> NeuronAtlasError:
    return NeuronAtlasError(
        f"{path} line {line} (byte {offset}) is not valid UTF-8 "
        "(re-encode the file to UTF-8, e.g. with iconv, or pass --on-invalid-text replace)"
    )


def valid_text(text: str, repairs: TextRepairs | None, where: str, name: str) -> str:
    """``text`` checked for lone surrogates (a JSON "\\ud800" escape): an error naming ``where``, or
    each replaced by U+FFFD and counted."""
    if text.isascii():
        return text
    found = _SURROGATE.search(text)
    if found is None:
        return text
    if repairs is None:
        raise NeuronAtlasError(
            f"{where}: field {name!r} holds a lone surrogate {ascii(found.group())} at character {found.start()}, "
            "which is not valid Unicode (fix the escape, or pass --on-invalid-text replace)"
        )
    fixed, count = _SURROGATE.subn("\ufffd", text)
    repairs.add(count)
    return fixed
