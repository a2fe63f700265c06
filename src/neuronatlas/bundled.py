"""Paths of the tiny models and the corpus that ship inside the package (see bundled/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NeuronAtlasError

ROOT = Path(__file__).parent / "bundled"
MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gpt2-seed1")
CORPUS_TRAIN = ROOT / "corpus" / "train.jsonl"
CORPUS_HELDOUT = ROOT / "corpus" / "heldout.jsonl"
TEXT_FIELD, LABEL_FIELD = "text", "lang"


def model_path(name: str) -> Path:
    """The folder of a bundled model, by name."""
    if name not in MODELS:
        raise NeuronAtlasError(f"unknown bundled model {name!r}; bundled: {', '.join(MODELS)}")
    return ROOT / "models" / name


def first_per_label(source: Path, target: Path, count: int) -> Path:
    """Write the first ``count`` JSONL documents of each label of ``source`` to ``target``."""
    seen: dict[str, int] = {}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with Path(source).open(encoding="utf-8") as lines, Path(target).open("w", encoding="utf-8") as kept:
        for line in lines:
            label = json.loads(line)[LABEL_FIELD]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= count:
                kept.write(line)
    return Path(target)
