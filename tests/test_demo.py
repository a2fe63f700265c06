"""`neuronatlas demo`, the main job of `make demo`, end to end on the bundled model and corpus."""

from __future__ import annotations

import json

from neuronatlas.cli import main


def test_demo_runs_every_step_and_writes_its_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for step in ("1. profile", "2. find", "3. ablate", "4. steer"):
        assert step in printed
    assert "flip share" in printed and "search on 10 calibration prompts" in printed
    for name in ("corpus.jsonl", "lape.json", "eval.json", "eval.md", "eval.png", "atlas/atlas.json"):
        assert (out / name).is_file(), name
    verdicts = json.loads((out / "eval.json").read_text())
    assert verdicts["labels"] == ["ar", "de", "en", "es", "ru"]
