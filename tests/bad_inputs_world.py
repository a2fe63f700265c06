"""The broken inputs of tests/test_bad_inputs.py: copies of an atlas with one thing changed or
damaged, corpora that are not what they claim, and files where an option expects something else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _copy_atlas(atlas: Path, target: Path, edit=None) -> Path:
    shutil.copytree(atlas, target)
    if edit is not None:
        meta = json.loads((target / "atlas.json").read_text())
        edit(meta)
        (target / "atlas.json").write_text(json.dumps(meta))
    return target


def broken_atlases(root: Path, atlas: Path) -> dict[str, Path]:
    """Copies of ``atlas`` with one thing changed or broken."""
    made = {"atlas_copy": _copy_atlas(atlas, root / "atlas_copy")}
    made["atlas_threshold"] = _copy_atlas(atlas, root / "atlas_threshold", lambda m: m["options"].update(threshold=0.5))
    made["atlas_top_k"] = _copy_atlas(atlas, root / "atlas_top_k", lambda m: m["options"].update(top_k=7))
    made["atlas_hist"] = _copy_atlas(atlas, root / "atlas_hist",
                                     lambda m: m["options"].update(hist_edges=[e * 2 for e in m["options"]["hist_edges"]]))
    made["atlas_other_model"] = _copy_atlas(atlas, root / "atlas_other_model",
                                            lambda m: m["model"].update(fingerprint="another"))
    made["atlas_v99"] = _copy_atlas(atlas, root / "atlas_v99", lambda m: m.update(format_version=99))
    made["atlas_badjson"] = _copy_atlas(atlas, root / "atlas_badjson")
    (made["atlas_badjson"] / "atlas.json").write_text("{bad")
    made["atlas_truncated_stats"] = _copy_atlas(atlas, root / "atlas_truncated_stats")
    stats = made["atlas_truncated_stats"] / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:100])
    made["atlas_no_stats"] = _copy_atlas(atlas, root / "atlas_no_stats")
    (made["atlas_no_stats"] / "stats.safetensors").unlink()
    made["atlas_truncated_exemplars"] = _copy_atlas(atlas, root / "atlas_truncated_exemplars")
    exemplars = made["atlas_truncated_exemplars"] / "exemplars.parquet"
    exemplars.write_bytes(exemplars.read_bytes()[: exemplars.stat().st_size // 2])
    made["atlas_no_exemplars"] = _copy_atlas(atlas, root / "atlas_no_exemplars")
    (made["atlas_no_exemplars"] / "exemplars.parquet").unlink()
    return made


def broken_files(root: Path) -> dict[str, Path]:
    """Broken corpora and files that are not what an option expects."""
    files = root / "files"
    files.mkdir()
    texts = {
        "empty.jsonl": "\n\n",
        "badjson.jsonl": '{"text": "the cat", "lang": "en"}\n{"text": oops}\n',
        "jsonarray.jsonl": '["the cat"]\n',
        "surrogate.jsonl": '{"text": "the cat", "lang": "en"}\n{"text": "der \\ud800 hund", "lang": "de"}\n',
        "surrogate_label.jsonl": '{"text": "the cat", "lang": "e\\udc80n"}\n',
        "textnumber.jsonl": '{"text": 7}\n',
        "nulllabel.jsonl": '{"text": "the cat", "lang": null}\n',
        "corpus.xml": "<doc>the cat</doc>\n",
        "corpus.csv": "text,lang\nthe cat,en\n",
        "bad.parquet": "PAR1 not really",
        "bad.json": "{oops",
        "exists.json": "{}\n",
    }
    for name, text in texts.items():
        (files / name).write_text(text, encoding="utf-8")
    (files / "latin1.jsonl").write_bytes('{"text": "the cat"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (files / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("not an output\n")
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o555)
    names = {"empty": "empty.jsonl", "badjson": "badjson.jsonl", "jsonarray": "jsonarray.jsonl",
             "surrogate": "surrogate.jsonl", "surrogate_label": "surrogate_label.jsonl", "textnumber": "textnumber.jsonl",
             "nulllabel": "nulllabel.jsonl", "xml": "corpus.xml", "csv": "corpus.csv", "badparquet": "bad.parquet",
             "notjson": "bad.json", "file": "exists.json", "latin1": "latin1.jsonl", "latin1txt": "latin1.txt"}
    paths = {key: files / name for key, name in names.items()}
    return paths | {"folder": root / "full", "readonly": root / "readonly", "missing": root / "missing"}
