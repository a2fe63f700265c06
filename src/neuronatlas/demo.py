"""``neuronatlas demo``: the whole pipeline on the bundled tiny model and corpus."""

from __future__ import annotations

from pathlib import Path

from . import bundled
from .cli import print_summary
from .profile import profile


def run_demo(model: str = "tiny-llama", out: str | Path = "atlas-demo", quiet: bool = False) -> None:
    model_path = bundled.model_path(model) if model in bundled.MODELS else model
    print(f"profiling {model} on the bundled corpus ({bundled.CORPUS_TRAIN.name}) into {out}")
    atlas = profile(
        str(model_path), bundled.CORPUS_TRAIN, out, text_field=bundled.TEXT_FIELD,
        label_field=bundled.LABEL_FIELD, device="cpu", overwrite=True, quiet=quiet,
    )
    print_summary(atlas.summary())
    print(f"atlas written to {out}; inspect it with `neuronatlas info {out}`")
