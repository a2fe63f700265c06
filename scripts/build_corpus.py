#!/usr/bin/env python3
"""Build neuronatlas' bundled multilingual corpus from The Debian Administrator's Handbook.

Debian ships the handbook as the package ``debian-handbook`` (licence GPL-2.0+ or
CC-BY-SA-3.0), with HTML translations under ``usr/share/doc/debian-handbook/html/<lang>/``.
This script fetches the .deb (``apt-get download debian-handbook``, or ``--deb PATH``),
extracts it with ``dpkg -x``, reads the prose paragraphs of each language, drops
untranslated or mislabelled paragraphs, balances the languages and writes

    src/neuronatlas/bundled/corpus/train.jsonl     {"text": ..., "lang": ...}
    src/neuronatlas/bundled/corpus/heldout.jsonl   (about 10 %, split by paragraph)

The output is deterministic for a given .deb and ``--seed``.

    python scripts/build_corpus.py                      # download + build
    python scripts/build_corpus.py --deb debian-handbook_11.20220922_all.deb
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
import subprocess
import sys
import tempfile
import unicodedata
import zlib
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "neuronatlas" / "bundled" / "corpus"
HTML_ROOT = Path("usr/share/doc/debian-handbook/html")

# Short code -> handbook directory.
LANG_DIRS = {
    "en": "en-US", "de": "de-DE", "fr": "fr-FR", "es": "es-ES",
    "ru": "ru-RU", "el": "el-GR", "ar": "ar-MA",
}
# Candidates in order of preference; Greek (el) is barely translated in version 11,
# so Arabic is the fallback second non-Latin script.
DEFAULT_LANGS = ("en", "de", "fr", "es", "ru", "el", "ar")
# Non-Latin scripts: the share of letters that must belong to the language's script.
SCRIPTS = {"ru": "CYRILLIC", "el": "GREEK", "ar": "ARABIC"}
MIN_CHARS = 40
MIN_PARAGRAPHS = 1000  # a language needs this many clean paragraphs to be chosen

# Frequent function words per language (disjoint lists), enough for a cheap language check.
STOPWORDS = {
    "en": "the of and to is that for it are with as this be by on not or can which from".split(),
    "de": "der die das und ist nicht zu den von mit sich des auf für eine ein dem werden wird auch".split(),
    "fr": "le les des et est une du pour dans qui pas sur sont par au avec ce il ou être".split(),
    "es": "el los las y es una por para con del se lo como más al su esta puede o".split(),
}


# --------------------------------------------------------------------------- fetching


def fetch_deb(workdir: Path) -> Path:
    """Download the debian-handbook .deb into ``workdir`` with ``apt-get download``."""
    subprocess.run(["apt-get", "download", "debian-handbook"], cwd=workdir, check=True)
    debs = sorted(workdir.glob("debian-handbook_*.deb"))
    if not debs:
        sys.exit("apt-get download produced no debian-handbook_*.deb")
    return debs[-1]


def extract_deb(deb: Path, workdir: Path) -> Path:
    """Extract ``deb`` with ``dpkg -x`` and return the HTML root directory."""
    target = workdir / "extract"
    subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return target / HTML_ROOT


def deb_version(deb: Path) -> str:
    """The package version recorded in the .deb's control file."""
    out = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


# --------------------------------------------------------------------------- HTML


class ParaParser(HTMLParser):
    """Collect the text of prose paragraphs (``<div class="para">`` and ``<p>``).

    Publican renders DocBook paragraphs as ``<div class="para">``; plain ``<p>`` is used
    for titles (class "title", skipped) and a few front-matter paragraphs.  Inline markup
    (``<code class="command">`` etc.) is kept as text, while block content nested in a
    paragraph (``<pre>``, screens, lists, tables, nested divs) is skipped.
    """

    SKIP_BLOCKS = {"pre", "table", "ul", "ol", "dl", "div", "p", "script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[str] = []  # open tags inside the current paragraph
        self._skip = 0  # depth inside a skipped block of the current paragraph
        self._buf: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "hr", "meta", "link", "input"):
            return  # void elements never close
        classes = (dict(attrs).get("class") or "").split()
        if self._buf is None:
            if (tag == "div" and "para" in classes) or (tag == "p" and "title" not in classes):
                self._buf, self._stack, self._skip = [], [tag], 0
            return
        self._stack.append(tag)
        if self._skip or tag in self.SKIP_BLOCKS or "screen" in classes:
            self._skip += 1

    def handle_endtag(self, tag):
        if self._buf is None or tag not in self._stack:
            return
        # Pop to the matching tag (tolerates unclosed inline tags).
        while self._stack:
            open_tag = self._stack.pop()
            if self._skip:
                self._skip -= 1
            if open_tag == tag:
                break
        if not self._stack:
            self.paragraphs.append("".join(self._buf))
            self._buf, self._skip = None, 0

    def handle_data(self, data):
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def normalise_space(text: str) -> str:
    """Unescape leftovers, apply NFC and collapse whitespace."""
    text = unicodedata.normalize("NFC", html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def read_paragraphs(lang_dir: Path) -> list[str]:
    """All prose paragraphs of one language, in file-name order, deduplicated."""
    seen, out = set(), []
    for path in sorted(lang_dir.glob("*.html")):
        parser = ParaParser()
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        for para in parser.paragraphs:
            para = normalise_space(para)
            if len(para) >= MIN_CHARS and para not in seen:
                seen.add(para)
                out.append(para)
    return out


# --------------------------------------------------------------------------- filters


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits)."""
    return re.findall(r"\w+", text.lower())


def shingles(text: str, n: int = 5) -> set[int]:
    """Hashes of the word n-grams of ``text`` (the whole text if it is shorter)."""
    w = words(text)
    grams = [" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))]
    return {zlib.crc32(g.encode()) for g in grams}


def stopword_scores(text: str) -> dict[str, float]:
    """Share of the words of ``text`` that are stopwords of each Latin-script language."""
    w = words(text)
    n = max(1, len(w))
    return {lang: sum(x in sw for x in w) / n for lang, sw in ((k, set(v)) for k, v in STOPWORDS.items())}


def script_share(text: str, script: str) -> float:
    """Share of the letters of ``text`` whose Unicode name starts with ``script``."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(unicodedata.name(c, "").startswith(script) for c in letters) / len(letters)


def looks_like(text: str, lang: str) -> bool:
    """Cheap language check: script share for non-Latin languages, stopwords otherwise."""
    scores = stopword_scores(text)
    if lang in SCRIPTS:
        # Mostly the right script, and not an English sentence around a few words.
        return script_share(text, SCRIPTS[lang]) >= 0.6 and scores["en"] < 0.08
    own = scores[lang]
    return own >= 0.05 and all(own > s for k, s in scores.items() if k != lang)


def is_untranslated(text: str, en_exact: set[str], en_shingles: set[int]) -> bool:
    """True if ``text`` is (nearly) an English paragraph: same letters or mostly shared 5-grams."""
    if key(text) in en_exact:
        return True
    sh = shingles(text)
    return len(sh & en_shingles) / len(sh) > 0.3


def key(text: str) -> str:
    """Normalisation for exact-duplicate detection: lower-case letters and digits only."""
    return "".join(words(text))


def clean_language(paras: list[str], lang: str, en_exact: set[str], en_shingles: set[int]) -> list[str]:
    """Keep the paragraphs that are translated and look like ``lang``."""
    keep = []
    for p in paras:
        if lang != "en" and is_untranslated(p, en_exact, en_shingles):
            continue
        if looks_like(p, lang):
            keep.append(p)
    return keep


# --------------------------------------------------------------------------- output


def balance_and_split(by_lang: dict[str, list[str]], cap: int, heldout: float, seed: int):
    """Sample the same number of paragraphs per language and split each by paragraph."""
    n = min(cap, *(len(v) for v in by_lang.values()))
    n_held = round(n * heldout)
    train, held = [], []
    for lang in sorted(by_lang):
        paras = sorted(by_lang[lang])  # independent of file order
        random.Random(f"{seed}-{lang}").shuffle(paras)
        chosen = paras[:n]
        held += [{"text": t, "lang": lang} for t in chosen[:n_held]]
        train += [{"text": t, "lang": lang} for t in chosen[n_held:]]
    # Interleave languages deterministically.
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(held)
    return train, held, n


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows as JSON Lines (UTF-8, no ASCII escaping)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", type=Path, help="use this debian-handbook .deb instead of downloading it")
    ap.add_argument("--langs", default=",".join(DEFAULT_LANGS), help="comma-separated candidates (%(default)s)")
    ap.add_argument("--n-langs", type=int, default=5, help="keep this many languages (%(default)s)")
    ap.add_argument("--cap", type=int, default=2000, help="max paragraphs per language (%(default)s)")
    ap.add_argument("--heldout", type=float, default=0.1, help="held-out share (%(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap.parse_args(argv)


def choose_languages(counts: dict[str, int], candidates: list[str], n: int) -> list[str]:
    """English, the best-covered non-Latin languages (up to two), then the best-covered rest.

    Only languages with at least ``MIN_PARAGRAPHS`` clean paragraphs are eligible.
    """
    others = [c for c in candidates if c != "en" and counts[c] >= MIN_PARAGRAPHS]
    non_latin = sorted((c for c in others if c in SCRIPTS), key=lambda c: -counts[c])[:2]
    rest = sorted((c for c in others if c not in non_latin), key=lambda c: -counts[c])
    chosen = ["en"] + non_latin
    chosen += rest[: n - len(chosen)]
    return sorted(chosen, key=candidates.index)


def main(argv=None) -> None:
    args = parse_args(argv)
    candidates = args.langs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb.resolve() if args.deb else fetch_deb(tmp)
        print(f"package: {deb.name} (version {deb_version(deb)})")
        root = extract_deb(deb, tmp)
        raw = {lang: read_paragraphs(root / LANG_DIRS[lang]) for lang in candidates}

    en_exact = {key(p) for p in raw["en"]}
    en_shingles = set().union(*(shingles(p) for p in raw["en"]))
    clean = {lang: clean_language(raw[lang], lang, en_exact, en_shingles) for lang in candidates}
    counts = {lang: len(v) for lang, v in clean.items()}
    for lang in candidates:
        print(f"  {lang}: {len(raw[lang]):5d} paragraphs, {counts[lang]:5d} after filtering")

    langs = choose_languages(counts, candidates, args.n_langs)
    train, held, n = balance_and_split({k: clean[k] for k in langs}, args.cap, args.heldout, args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(held, args.out / "heldout.jsonl")
    size = sum((args.out / f).stat().st_size for f in ("train.jsonl", "heldout.jsonl"))
    print(f"languages: {','.join(langs)}; {n} paragraphs each ({len(train)} train, {len(held)} held-out rows)")
    print(f"wrote {args.out}/train.jsonl and heldout.jsonl ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
