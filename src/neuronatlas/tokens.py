"""Token ids as readable text, for every tokenizer: bytes per token, spans that join them, the vocab table.

A token's piece is not always text: a byte-level BPE (GPT-2, Llama-3, SmolLM2) splits a Cyrillic
letter or an emoji over tokens of one or two UTF-8 bytes each, and a SentencePiece model with byte
fallback has tokens such as ``<0xD0>``. Decoding such a token alone gives U+FFFD. Here each token
maps to the exact bytes it adds to the decoded text (:func:`token_bytes`); the display joins
consecutive tokens whose bytes only decode together into one span (:func:`display_spans`), which
keeps each token's activation; a byte that completes no character, or a control character, is shown
as ``<0xNN>``.

Per-token bytes are context-free (one value per id, so the atlas's vocab.parquet can hold them):

* byte-level BPE: each character of the piece maps back to its byte (GPT-2's bytes<->unicode table);
* SentencePiece (Metaspace, or Replace("▁", " ") + ByteFallback): ``▁`` is a space, ``<0xNN>`` the byte NN;
* WordPiece: ``##x`` continues a word (``x``); any other token is a word, with a leading space
  (none before ``.,!?``, as the decoder's cleanup does);
* special tokens: their name (``[CLS]``, ``<|endoftext|>``);
* any other tokenizer: ``decode([id])``, after the separator ``decode([id, id])`` puts between two copies
  (a word-level tokenizer without a decoder joins with spaces); a slow tokenizer whose pieces are bytes
  (tiktoken-based ones) gives them as they are.
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from dataclasses import dataclass, field

import pyarrow as pa

SENTENCEPIECE_SPACE = "▁"
WORDPIECE_CLEANUP = {".", ",", "!", "?"}  # the decoder's cleanup drops the space before these
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
HEX_ERRORS = "neuronatlas-hex"  # decode error handler: each undecodable byte as <0xNN>


def _hex_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in error.object[error.start:error.end]), error.end


codecs.register_error(HEX_ERRORS, _hex_bytes)


def piece_text(data: bytes) -> str:
    """Bytes as text, each byte that is not part of a whole UTF-8 character (or is a control character
    other than tab and line breaks, which would show as a box) as ``<0xNN>``."""
    return CONTROL.sub(lambda match: f"<0x{ord(match.group()):02X}>", data.decode("utf-8", errors=HEX_ERRORS))


def decode_bytes(pieces: list[bytes]) -> str:
    """The text of consecutive tokens (a window): their bytes joined, then :func:`piece_text`."""
    return piece_text(b"".join(pieces))


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as in a piece -> the byte."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_DECODER = byte_decoder()


# ---- per-token bytes --------------------------------------------------------------------------------


@dataclass
class Scheme:
    """How a tokenizer's pieces become text: kind, plus the WordPiece prefix."""

    kind: str  # "byte-level", "sentencepiece", "wordpiece" or "other"
    prefix: str = "##"


def _decoder_types(node, found: dict) -> None:
    """Every decoder ``type`` in a decoder's JSON (Sequence decoders nest), with its settings."""
    if isinstance(node, dict):
        if "type" in node:
            found.setdefault(node["type"], node)
        for value in node.values():
            _decoder_types(value, found)
    elif isinstance(node, list):
        for value in node:
            _decoder_types(value, found)


def scheme_of(tokenizer) -> Scheme:
    """The tokenizer's scheme, read from a fast tokenizer's decoder; "other" when it has none we know."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        return Scheme("other")
    found: dict = {}
    _decoder_types(json.loads(decoder.__getstate__()), found)
    if "ByteLevel" in found:
        return Scheme("byte-level")
    if "WordPiece" in found:
        return Scheme("wordpiece", found["WordPiece"].get("prefix", "##"))
    replace = found.get("Replace", {})
    if "Metaspace" in found or "ByteFallback" in found or SENTENCEPIECE_SPACE in str(replace.get("pattern")):
        return Scheme("sentencepiece")
    return Scheme("other")


class TokenBytes:
    """``reader(ids) -> list[bytes]``: the bytes each token id adds to the decoded text, cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.scheme = scheme_of(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = {i: token.content for i, token in added.items() if getattr(token, "special", False)}
        self.known: dict[int, bytes] = {}

    def __call__(self, ids) -> list[bytes]:
        ids = [int(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in self.known]
        if missing:
            self.known.update(zip(missing, self._compute(missing)))
        return [self.known[i] for i in ids]

    def _compute(self, ids: list[int]) -> list[bytes]:
        try:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
        except (IndexError, KeyError, ValueError, OverflowError):  # some tokenizers raise for an id they lack
            pieces = [self._piece(i) for i in ids]
        return [self._one(i, piece) for i, piece in zip(ids, pieces)]

    def _piece(self, token_id: int):
        try:
            return self.tokenizer.convert_ids_to_tokens(token_id)
        except (IndexError, KeyError, ValueError, OverflowError):
            return None

    def _one(self, token_id: int, piece) -> bytes:
        kind = self.scheme.kind
        byte = BYTE_PIECE.fullmatch(piece) if kind == "sentencepiece" and isinstance(piece, str) else None
        if byte:  # a byte-fallback token
            return bytes([int(byte.group(1), 16)])
        if token_id in self.special:  # shown by name; a word of its own in WordPiece text
            name = self.special[token_id]
            return (" " + name if self.scheme.kind == "wordpiece" else name).encode("utf-8")
        if isinstance(piece, bytes):  # tiktoken-based tokenizers' pieces are bytes already
            return piece
        if piece is None:  # an id past the tokenizer's vocabulary (padded embedding matrices)
            return f"<{token_id}>".encode("utf-8")
        if kind == "byte-level":
            if all(char in BYTE_DECODER for char in piece):
                return bytes(BYTE_DECODER[char] for char in piece)
            return piece.encode("utf-8")  # an added token outside the byte alphabet: its text
        if kind == "sentencepiece":
            return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")
        if kind == "wordpiece":
            prefix = self.scheme.prefix
            if piece.startswith(prefix) and len(piece) > len(prefix):
                return piece[len(prefix):].encode("utf-8")
            return (piece if piece in WORDPIECE_CLEANUP else " " + piece).encode("utf-8")  # a new word
        return self._decoded(token_id)

    def _decoded(self, token_id: int) -> bytes:
        """Any other tokenizer: decode([id]), after what decode puts between two tokens."""
        one = self.tokenizer.decode([token_id])
        two = self.tokenizer.decode([token_id, token_id])
        separator = ""
        if len(two) >= 2 * len(one) and two.startswith(one) and two.endswith(one):
            separator = two[len(one):len(two) - len(one)]
        return (separator + one).encode("utf-8")


_READERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_reader(tokenizer) -> TokenBytes:
    """The :class:`TokenBytes` of ``tokenizer``, made once per tokenizer object."""
    try:
        reader = _READERS.get(tokenizer)
        if reader is None:
            reader = _READERS[tokenizer] = TokenBytes(tokenizer)
        return reader
    except TypeError:  # not weakly referenceable: no cache
        return TokenBytes(tokenizer)


def token_bytes(tokenizer, ids) -> list[bytes]:
    """The exact bytes each token of ``ids`` contributes to the decoded text (see the module notes)."""
    return token_reader(tokenizer)(ids)


def token_texts(tokenizer, ids) -> list[str]:
    """Each token alone, readable: :func:`piece_text` of its bytes."""
    return [piece_text(data) for data in token_bytes(tokenizer, ids)]


# ---- the vocab table ---------------------------------------------------------------------------------


def vocab_table(tokenizer, ids) -> pa.Table:
    """id, token (readable text of the token alone), bytes (what it adds to decoded text) of ``ids``."""
    ids = sorted({int(i) for i in ids})
    pieces = token_bytes(tokenizer, ids)
    return pa.table({
        "id": pa.array(ids, pa.int32()),
        "token": pa.array([piece_text(data) for data in pieces], pa.string()),
        "bytes": pa.array(pieces, pa.binary()),
    })


def vocab_bytes(vocab: pa.Table | None) -> dict[int, bytes]:
    """id -> bytes from an atlas's vocab table; an older table without ``bytes`` gives its ``token`` text."""
    if vocab is None:
        return {}
    ids = vocab["id"].to_pylist()
    if "bytes" in vocab.column_names:
        return dict(zip(ids, vocab["bytes"].to_pylist()))
    return {i: (token or "").encode("utf-8") for i, token in zip(ids, vocab["token"].to_pylist())}


# ---- whole characters at a window's edges ---------------------------------------------------------------


def character_bounds(piece_at, lo: int, hi: int, length: int, most: int = 3) -> tuple[int, int]:
    """[lo, hi) of a window of ``length`` tokens widened by at most ``most`` tokens each way until it
    starts and ends on whole UTF-8 characters. A byte-level BPE splits an Arabic or CJK character over
    tokens, and an exemplar window cut inside one shows its orphan bytes as ``<0xNN>``.
    ``piece_at(i)``: token i's bytes."""
    for _ in range(most):
        if lo == 0 or not _opens_inside_character(piece_at(lo)):
            break
        lo -= 1
    for _ in range(most):
        if hi >= length or not _ends_inside_character(b"".join(piece_at(i) for i in range(max(lo, hi - 4), hi))):
            break
        hi += 1
    return lo, hi


def _opens_inside_character(data: bytes) -> bool:
    """Whether ``data`` starts with a UTF-8 continuation byte (its character began before it)."""
    return bool(data) and 0x80 <= data[0] <= 0xBF


def _ends_inside_character(data: bytes) -> bool:
    """Whether ``data`` ends with the first bytes of a UTF-8 character that needs more."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return False
        if byte >= 0xC0:  # a lead byte: its character takes 2, 3 or 4 bytes
            return back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4)
    return False


# ---- display spans -----------------------------------------------------------------------------------


@dataclass
class Span:
    """Consecutive tokens shown as one piece of text.

    activation: the max of its tokens' (None when none is known); tokens: their indices in the
    window; pieces and activations: each token's own text and value, for a tooltip.
    """

    text: str
    activation: float | None
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    activations: list[float | None] = field(default_factory=list)


def _unit_length(data: bytes, at: int) -> int:
    """Bytes of the whole UTF-8 character that starts at ``at``; 1 for a byte that starts none."""
    lead = data[at]
    length = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 1
    if length > 1:
        try:
            data[at:at + length].decode("utf-8")
        except UnicodeDecodeError:
            return 1
    return length


def character_starts(data: bytes) -> set[int]:
    """Offsets where a character (or an undecodable byte) starts, and the end."""
    starts, at = set(), 0
    while at < len(data):
        starts.add(at)
        at += _unit_length(data, at)
    starts.add(len(data))
    return starts


def display_spans(pieces: list[bytes], activations=None) -> list[Span]:
    """Tokens grouped into spans of whole characters: a cut between two tokens only where a character ends.

    ``pieces``: each token's bytes; ``activations``: one value (or None) per token, or None.
    """
    values = list(activations) if activations is not None else [None] * len(pieces)
    data = b"".join(pieces)
    starts = character_starts(data)
    spans, group, offset, begin = [], [], 0, 0
    for index, piece in enumerate(pieces):
        group.append(index)
        offset += len(piece)
        if offset in starts:  # a character ends here: close the span
            spans.append(_span(data[begin:offset], group, pieces, values))
            group, begin = [], offset
    if group:
        spans.append(_span(data[begin:offset], group, pieces, values))
    return spans


def _span(data: bytes, group: list[int], pieces: list[bytes], values: list) -> Span:
    own = [values[i] if i < len(values) else None for i in group]
    known = [v for v in own if v is not None]
    return Span(piece_text(data), max(known) if known else None, list(group), [piece_text(pieces[i]) for i in group], own)
