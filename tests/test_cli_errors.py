"""Bad input: one line naming the value and the fix, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import cli_fails

from neuronatlas.cli import main
from neuronatlas.corpus import Corpus, read_corpus
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.profile import ProfileOptions, profile


fails = cli_fails


def profile_args(model, corpus, out, *extra):
    return ["profile", "--model", str(model), "--corpus", str(corpus), "--label-field", "lang",
            "--out", str(out), "--device", "cpu", "--quiet", "--max-length", "24", *extra]


@pytest.fixture
def made_atlas(tiny_llama, corpus_path, tmp_path):
    out = tmp_path / "atlas"
    assert main(profile_args(tiny_llama, corpus_path, out)) == 0
    return out


def test_missing_model_path(capsys, corpus_path, tmp_path):
    fails(capsys, profile_args(tmp_path / "no-such-model", corpus_path, tmp_path / "a"), "no-such-model", "not found")


def test_unsupported_family_lists_the_supported_ones(capsys, corpus_path, tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=16, d_ff=24, num_layers=1, num_heads=2, d_kv=8).save_pretrained(tmp_path / "t5")
    fails(capsys, profile_args(tmp_path / "t5", corpus_path, tmp_path / "a"), "'t5'", "llama", "gpt2", "adding-a-family")


def test_missing_and_empty_corpus(capsys, tiny_llama, tmp_path):
    fails(capsys, profile_args(tiny_llama, tmp_path / "nope.jsonl", tmp_path / "a"), "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    fails(capsys, profile_args(tiny_llama, tmp_path / "empty.jsonl", tmp_path / "b"), "empty.jsonl")


def test_jsonl_line_that_is_not_json_names_its_line(capsys, tiny_llama, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat", "lang": "en"}\n{"text": "der hund", "lang": "de"}\n{"text": oops}\n')
    fails(capsys, profile_args(tiny_llama, path, tmp_path / "a"), "line 3")


def test_missing_text_or_label_field(capsys, tiny_llama, corpus_path, tmp_path):
    fails(capsys, profile_args(tiny_llama, corpus_path, tmp_path / "a", "--text-field", "body"), "body")
    args = profile_args(tiny_llama, corpus_path, tmp_path / "b")
    args[args.index("lang")] = "language"
    fails(capsys, args, "language")


def test_undecodable_bytes(capsys, tiny_llama, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\u00e9", "lang": "fr"}\n'.encode("latin-1"))
    fails(capsys, profile_args(tiny_llama, path, tmp_path / "a"), "latin1.jsonl", "UTF-8")


def test_max_length_beyond_the_model_positions(capsys, tiny_llama, corpus_path, tmp_path):
    args = profile_args(tiny_llama, corpus_path, tmp_path / "a")
    args[args.index("24")] = "4096"
    fails(capsys, args, "4096", "64")


def test_existing_atlas_is_refused_unless_overwrite(capsys, tiny_llama, corpus_path, made_atlas):
    fails(capsys, profile_args(tiny_llama, corpus_path, made_atlas), str(made_atlas), "--overwrite")
    assert main(profile_args(tiny_llama, corpus_path, made_atlas, "--overwrite")) == 0


def test_atlas_from_a_newer_format(capsys, made_atlas):
    meta = json.loads((made_atlas / "atlas.json").read_text())
    meta["format_version"] = 99
    (made_atlas / "atlas.json").write_text(json.dumps(meta))
    fails(capsys, ["info", str(made_atlas)], "format 99", "upgrade")


def test_folder_that_is_not_an_atlas(capsys, tmp_path):
    fails(capsys, ["info", str(tmp_path)], "not an atlas")


def test_damaged_atlases(capsys, tmp_path, made_atlas):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "atlas.json").write_text("{bad")
    fails(capsys, ["info", str(broken)], "not a complete atlas")
    (broken / "atlas.json").write_text(json.dumps({"format_version": 1}))
    fails(capsys, ["info", str(broken)], "not a complete atlas", "stats.safetensors")
    (broken / "stats.safetensors").write_bytes(b"")
    fails(capsys, ["info", str(broken)], "not a complete atlas")
    (made_atlas / "stats.safetensors").write_bytes((made_atlas / "stats.safetensors").read_bytes()[:100])
    fails(capsys, ["info", str(made_atlas)], "not a complete atlas")


class StopsAfter(Corpus):
    """A corpus whose profiling pass (its second reading, after validation) is interrupted after
    ``limit`` documents, as by Ctrl-C."""

    def __init__(self, corpus: Corpus, limit: int):
        self.__dict__.update(corpus.__dict__)
        self.limit = limit
        self.readings = 0

    def __iter__(self):
        self.readings += 1
        for document in super().__iter__():
            if self.readings == 2 and document.index >= self.limit:
                raise KeyboardInterrupt
            yield document


def interrupted_profile(model, corpus_path, out):
    corpus = StopsAfter(read_corpus(corpus_path, label_field="lang"), limit=10)
    with pytest.raises(KeyboardInterrupt):
        profile(str(model), corpus, out, options=ProfileOptions(max_length=24, batch_size=2), device="cpu",
                quiet=True, checkpoint_every=0)
    assert (out / "checkpoint.safetensors").exists()


def test_resume_against_another_model_or_corpus(capsys, tiny_llama, tiny_gpt2, corpus_path, tmp_path):
    out = tmp_path / "interrupted"
    interrupted_profile(tiny_llama, corpus_path, out)
    fails(capsys, profile_args(tiny_llama, corpus_path, out), "interrupted", "--resume")
    fails(capsys, profile_args(tiny_gpt2, corpus_path, out, "--resume"), "another model")
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "the cat sat", "lang": "en"}\n')
    fails(capsys, profile_args(tiny_llama, other, out, "--resume"), "another corpus")
    fails(capsys, profile_args(tiny_llama, corpus_path, out, "--resume"), "batch_size")
    assert main(profile_args(tiny_llama, corpus_path, out, "--resume", "--batch-size", "2")) == 0


def test_python_api_raises_the_same_error(tiny_llama, tmp_path):
    with pytest.raises(NeuronAtlasError, match="not found"):
        profile(str(tiny_llama), tmp_path / "missing.jsonl", tmp_path / "a", label_field="lang", quiet=True)


def test_console_script_exits_2_without_traceback_and_debug_shows_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "neuronatlas", "info", str(tmp_path)]
    plain = subprocess.run(command, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "not an atlas" in plain.stderr
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=env)
    assert "Traceback" in debug.stderr


def test_quiet_hides_progress_but_not_the_summary(capsys, tiny_llama, corpus_path, tmp_path):
    assert main(profile_args(tiny_llama, corpus_path, tmp_path / "atlas")) == 0  # profile_args passes --quiet
    captured = capsys.readouterr()
    assert "atlas written to" in captured.out and "tokens in" in captured.out
    assert "it/s" not in captured.err


def test_every_find_method_takes_quiet(capsys, made_atlas, tmp_path):
    """Scripts pass --quiet to every verb: each find method accepts it, shown or not."""
    from neuronatlas.cli.find import methods

    for method in methods():
        capsys.readouterr()
        assert main(["find", method.name, "--help"]) == 0
        assert "--quiet" in capsys.readouterr().out, method.name
    assert main(["find", "dead", "--atlas", str(made_atlas), "--out", str(tmp_path / "dead.json"), "--quiet"]) == 0


def test_atlas_verbs_take_the_atlas_as_argument_or_flag(capsys, made_atlas):
    """info, serve, report and export take ATLAS, or --atlas ATLAS as find, steer and explain do."""
    outputs = []
    for argv in (["info", str(made_atlas), "--json"], ["info", "--atlas", str(made_atlas), "--json"],
                 ["info", str(made_atlas), "--atlas", str(made_atlas), "--json"]):
        capsys.readouterr()
        assert main(argv) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0]["tokens"] > 0
