"""`neuronatlas export neuronpedia`: every row valid against the Neuronpedia table schemas, tokens readable."""

from __future__ import annotations

import fnmatch
import gzip
import json

import jsonschema
import pytest

from conftest import cli_fails
from neuronatlas import bundled
from neuronatlas.atlas import load_atlas
from neuronatlas.cli import main
from neuronatlas.export import FILES, TABLES, table_schema
from neuronatlas.neuronset import Neuron, NeuronSet, model_info

TINY_LLAMA = bundled.model_path("tiny-llama")


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    """tiny-llama profiled on two documents of each language (Cyrillic and Arabic among them)."""
    from neuronatlas.profile import ProfileOptions, profile

    root = tmp_path_factory.mktemp("export")
    rows, seen = [], {}
    for line in bundled.CORPUS_TRAIN.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if seen.get(row["lang"], 0) < 2:
            seen[row["lang"]] = seen.get(row["lang"], 0) + 1
            rows.append(row)
    corpus = root / "train.jsonl"
    corpus.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    profile(str(TINY_LLAMA), corpus, root / "atlas", label_field="lang", device="cpu", quiet=True,
            options=ProfileOptions(max_length=48, top_k=4, batch_size=16, doc_sample=0, positions=False))
    return root / "atlas"


def read_rows(path):
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def exported(out):
    """{table: rows} over every file of the export, each file's table found by its name."""
    tables = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(path.parents[1] if path.parent.name in {"features", "activations", "explanations", "explanation_scores"} else path.parent)
        table = next((t for pattern, t in FILES.items() if fnmatch.fnmatch(str(relative), pattern)), None)
        assert table is not None, f"unexpected file {path}"
        tables.setdefault(table, []).extend(read_rows(path))
    return tables


def explanations_for(atlas, neurons):
    scores = {"detection": {"score": 0.75, "n_activating": 4, "n_non_activating": 8, "baseline": 0.5},
              "fuzzing": {"score": None, "n_activating": 0, "n_non_activating": 8, "baseline": None},
              "simulation": {"score": 0.2, "top": 0.1, "random": 0.3, "n_contexts": 12, "baseline": 0.01}}
    records = [{"layer": layer, "index": index, "explanation": f"words number {index}", "score": 0.2, "score_top": 0.1,
                "score_random": 0.3, "clusters": [], "scores": scores} for layer, index in neurons]
    return {"format": "neuronatlas.explanations", "version": 1, "explainer": "tiny", "simulator": "tiny",
            "model": {k: atlas.meta["model"][k] for k in ("name_or_path", "fingerprint")}, "neurons": records}


def test_export_is_valid_against_the_schemas_and_readable(atlas_dir, tmp_path, capsys):
    atlas = load_atlas(atlas_dir)
    neurons = [(0, 3), (0, 5), (2, 1)]
    NeuronSet("hand", model_info(atlas.meta), [Neuron(*n) for n in neurons]).save(tmp_path / "set.json")
    (tmp_path / "expl.json").write_text(json.dumps(explanations_for(atlas, neurons[:2])))
    out = tmp_path / "np"
    assert main(["export", "neuronpedia", str(atlas_dir), "--out", str(out), "--neurons", str(tmp_path / "set.json"),
                 "--explanations", str(tmp_path / "expl.json")]) == 0
    assert "3 neurons" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "tiny-llama").iterdir()) == ["0-neurons", "2-neurons"]
    tables = exported(out)
    for table, rows in tables.items():
        validator = jsonschema.Draft202012Validator(table_schema(table), format_checker=jsonschema.FormatChecker())
        for row in rows:
            validator.validate(row)
    assert set(tables) == set(TABLES)
    assert sorted((n["layer"], n["index"]) for n in tables["Neuron"]) == [("0-neurons", "3"), ("0-neurons", "5"), ("2-neurons", "1")]
    for neuron in tables["Neuron"]:
        assert 0 < neuron["frac_nonzero"] <= 1 and neuron["freq_hist_data_bar_heights"]
        assert len(neuron["freq_hist_data_bar_heights"]) == len(neuron["freq_hist_data_bar_values"])
    for activation in tables["Activation"]:
        assert len(activation["tokens"]) == len(activation["values"]) > 0
        assert activation["maxValue"] == max(activation["values"]) == activation["values"][activation["maxValueTokenIndex"]]
        assert not any("\ufffd" in token for token in activation["tokens"])
    assert [e["description"] for e in tables["Explanation"]] == ["words number 3", "words number 5"]
    assert all(e["scoreV1"] == 0.2 for e in tables["Explanation"])
    kinds = sorted(s["explanationScoreTypeName"] for s in tables["ExplanationScore"])
    assert kinds == ["eleuther_recall"] * 2 + ["neuronatlas_simulation"] * 2  # fuzzing had no score


def test_export_of_an_atlas_without_explanations_holds_every_neuron(atlas_dir, tmp_path):
    atlas = load_atlas(atlas_dir)
    assert main(["export", "neuronpedia", str(atlas_dir), "--out", str(tmp_path / "np"), "--model-id", "tiny",
                 "--source-set", "mlp"]) == 0
    tables = exported(tmp_path / "np")
    assert "Explanation" not in tables
    assert len(tables["Neuron"]) == len({(r["layer"], r["neuron"]) for r in atlas.exemplar_table().to_pylist()})
    assert {row["id"] for row in tables["Model"]} == {"tiny"}
    assert {row["id"] for row in tables["Source"]} == {f"{layer}-mlp" for layer in range(atlas.num_layers)}
    text = ["".join(a["tokens"]) for a in tables["Activation"]]
    assert any(any("\u0400" <= ch <= "\u04ff" for ch in t) for t in text)  # Russian exemplars read as Cyrillic
    assert not any("\ufffd" in t for t in text)


def test_export_errors(atlas_dir, tmp_path, capsys):
    atlas = load_atlas(atlas_dir)
    bad = explanations_for(atlas, [(0, 1)])
    bad["model"]["fingerprint"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(bad))
    cli_fails(capsys, ["export", "neuronpedia", str(atlas_dir), "--out", str(tmp_path / "np"), "--explanations",
                       str(tmp_path / "other.json")], "another model")
    (tmp_path / "file").write_text("x")
    cli_fails(capsys, ["export", "neuronpedia", str(atlas_dir), "--out", str(tmp_path / "file")], "is a file")
    cli_fails(capsys, ["export", "neuronpedia", str(tmp_path), "--out", str(tmp_path / "np")], "is not an atlas")
