"""Build a second real multilingual corpus from the translated messages of Django's and Sphinx's
gettext catalogs (PyPI wheels): text of another domain (software interfaces) than the bundled
corpus, which the project never trained or tuned anything on.

    python scripts/build_gettext_corpus.py [--languages en,de,fr,es,it,pt] [--heldout 8] [--out DIR]

The wheels are downloaded with ``pip download --no-deps`` (nothing is installed); each language's
compiled catalogs (``locale/<lang>/LC_MESSAGES/*.mo``) are read with the standard library's
``gettext``. English is the catalogs' source text (the message ids of ``--source-of``, the most
complete catalog). Messages of fewer than 3 words are left out, and placeholders (``%(name)s``,
``{0}``) and markup removed; consecutive messages are joined into documents of about 500
characters. Each language's documents are shuffled (seed 0): the first ``--heldout`` (8) go to
``heldout.jsonl``, the rest to ``train.jsonl`` (fields ``text``, ``lang``). Default folder:
``$NEURONATLAS_CACHE/corpora/gettext`` or ``~/.cache/neuronatlas/corpora/gettext``; a folder that
holds both files is left as it is unless ``--force``. Prints the documents per language.
"""

from __future__ import annotations

import argparse
import gettext
import io
import json
import random
import re
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_real_models import download_wheel  # noqa: E402

from neuronatlas.real_models import gettext_corpus_dir  # noqa: E402

PACKAGES = ("django==5.2.20", "sphinx==9.0.4")
PLACEHOLDER = re.compile(r"%\([^)]*\)[sdrif]|%[sdrif]|\{[^}]*\}|<[^>]*>")
DOCUMENT_CHARS = 500


def catalog_pairs(wheels: list[zipfile.ZipFile], language: str) -> list[tuple[str, str]]:
    """(source, translation) of every singular message of ``language``'s catalogs, in catalog order (a
    compiled catalog is sorted by message id). ``gettext`` exposes a catalog's messages only as the
    ``_catalog`` dict: plural forms are keyed by (id, n) and left out, as is the header (id "")."""
    pairs = []
    for wheel in wheels:
        names = sorted(name for name in wheel.namelist()
                       if f"/locale/{language}/LC_MESSAGES/" in name and name.endswith(".mo"))
        for name in names:
            catalog = gettext.GNUTranslations(io.BytesIO(wheel.read(name)))._catalog
            pairs += [(source, text) for source, text in catalog.items() if isinstance(source, str) and source and text]
    return pairs


def cleaned(message: str) -> str:
    return re.sub(r"\s+", " ", PLACEHOLDER.sub("", message)).strip()


def documents(messages: list[str]) -> list[str]:
    """Consecutive messages of 3 words or more, as sentences, joined into ~500-character documents."""
    out, current = [], []
    for message in map(cleaned, messages):
        if len(message.split()) < 3:
            continue
        current.append(message if message[-1] in ".!?:" else message + ".")
        if sum(map(len, current)) >= DOCUMENT_CHARS:
            out.append(" ".join(current))
            current = []
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default="en,de,fr,es,it,pt", help="catalog languages; en = the source text")
    parser.add_argument("--source-of", default="fr", help="the catalog whose message ids are the English text")
    parser.add_argument("--heldout", type=int, default=8, help="held-out documents per language (default: 8)")
    parser.add_argument("--out", type=Path, default=gettext_corpus_dir())
    parser.add_argument("--force", action="store_true", help="build again even if the folder holds both files")
    args = parser.parse_args(argv)
    if not args.force and all((args.out / f"{split}.jsonl").exists() for split in ("train", "heldout")):
        print(f"gettext corpus: already built in {args.out}", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="gettext-corpus-") as scratch:
        wheels = [zipfile.ZipFile(download_wheel(package, Path(scratch) / package)) for package in PACKAGES]
        splits = {"train": [], "heldout": []}
        for language in args.languages.split(","):
            pairs = catalog_pairs(wheels, args.source_of if language == "en" else language)
            if not pairs:
                raise SystemExit(f"build_gettext_corpus: no catalog for language {language!r} in {', '.join(PACKAGES)}")
            docs = documents([source if language == "en" else text for source, text in pairs])
            random.Random(0).shuffle(docs)
            splits["heldout"] += [{"text": text, "lang": language} for text in docs[: args.heldout]]
            splits["train"] += [{"text": text, "lang": language} for text in docs[args.heldout :]]
            print(f"{language}: {len(docs)} documents, {min(len(docs), args.heldout)} held out", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                                 encoding="utf-8")
        print(args.out / f"{split}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
