"""Paths of the tiny models and the corpus that ship inside the package (see bundled/README.md)."""

from __future__ import annotations

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
