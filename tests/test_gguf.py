"""GGUF models written here (no download): the bundled tiny-llama and a tiny Qwen2 as GGUF files.

They load through transformers' GGUF support with the folder's tokens and logits (float32 exactly,
Q8_0 closely), every verb that takes ``--model`` accepts the file, and the atlas records it.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from gguf_files import write_gguf

from neuronatlas import bundled
from neuronatlas.cli import main
from neuronatlas.loading import file_fingerprint, load_model, load_tokenizer

pytest.importorskip("gguf")

TINY_LLAMA = bundled.ROOT / "models" / "tiny-llama"
TEXTS = ["Der Kernel verfügt über eine Schnittstelle; the cat — мама ❤", "", "  x\n\ny ", "日本語 مرحبا"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: path}: tiny-llama as F32 and Q8_0 GGUF, a random tiny Qwen2 (tied embeddings) as a folder and as GGUF."""
    import transformers as tf

    root = tmp_path_factory.mktemp("gguf")
    made = {f"llama-{kind}": write_gguf(TINY_LLAMA, root / f"tiny-llama-{kind}.gguf", kind) for kind in ("F32", "Q8_0")}
    tokenizer = tf.AutoTokenizer.from_pretrained(TINY_LLAMA)
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    folder = root / "qwen2"
    tf.Qwen2ForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    made["qwen2"] = folder
    made["qwen2-gguf"] = write_gguf(folder, root / "qwen2.gguf", "F32")
    return made


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 12 bundled training documents of each language, at most 300 characters."""
    kept, seen = [], {}
    for line in bundled.CORPUS_TRAIN.open(encoding="utf-8"):
        row = json.loads(line)
        if len(row["text"]) <= 300 and seen.get(row["lang"], 0) < 12:
            seen[row["lang"]] = seen.get(row["lang"], 0) + 1
            kept.append(line)
    path = tmp_path_factory.mktemp("gguf-corpus") / "docs.jsonl"
    path.write_text("".join(kept), encoding="utf-8")
    return path


def logits(model, tokenizer, text="the cat sat on the mat, der Hund lief"):
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text).input_ids])).logits


@pytest.mark.parametrize("name, folder", [("llama-F32", TINY_LLAMA), ("llama-Q8_0", TINY_LLAMA), ("qwen2-gguf", None)])
def test_gguf_loads_with_the_folders_tokens_and_logits(files, name, folder):
    folder = folder or files["qwen2"]
    dense, dense_tokenizer = load_model(str(folder), device="cpu", quiet=True)
    model, tokenizer = load_model(str(files[name]), device="cpu", quiet=True)
    assert model.config.model_type == dense.config.model_type
    for text in TEXTS:  # no digits: transformers gives a qwen2 GGUF Qwen2's pre-tokenizer (digits one by one),
        assert tokenizer(text).input_ids == dense_tokenizer(text).input_ids  # where this tokenizer.json has GPT-2's
    expected, got = logits(dense, dense_tokenizer), logits(model, dense_tokenizer)
    if name.endswith("Q8_0"):  # 8-bit blocks: close, not equal
        assert 0 < (got - expected).abs().max() < 0.03 * expected.abs().max()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    else:
        torch.testing.assert_close(got, expected)


def test_a_qwen2_gguf_profiles_its_text_tokens_and_the_atlas_records_the_file(files, corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    summaries = {}
    for name in ("qwen2", "qwen2-gguf"):
        out = tmp_path / name
        assert main(["profile", "--model", str(files[name]), "--corpus", str(corpus), "--text-field", "text",
                     "--label-field", "lang", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["info", str(out), "--json"]) == 0
        summaries[name] = json.loads(capsys.readouterr().out)
    gguf = files["qwen2-gguf"]
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # the file's own tokenizer
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    lengths = [len(reference(text, add_special_tokens=False).input_ids) for text in texts]
    windows = [math.ceil(n / 127) for n in lengths]  # 128 tokens a window (the model's positions), <s> first
    assert summaries["qwen2-gguf"]["tokens"] == sum(lengths) + sum(windows)
    assert summaries["qwen2"]["tokens"] > 0 and summaries["qwen2-gguf"]["model"] == str(gguf)
    record = json.loads((tmp_path / "qwen2-gguf" / "atlas.json").read_text())["model"]
    assert record["gguf"] == {"file": str(gguf.resolve()), "bytes": gguf.stat().st_size,
                              "fingerprint": file_fingerprint(gguf)}
    assert "gguf" not in json.loads((tmp_path / "qwen2" / "atlas.json").read_text())["model"]


def test_every_verb_takes_a_gguf_model(files, corpus, tmp_path, capsys):
    """profile, find, evaluate, steer, sparsify, bench, explain, export and serve with ``--model x.gguf``;
    ``--quiet`` hides the dequantisation bar."""
    gguf = str(files["llama-Q8_0"])
    atlas, lape = tmp_path / "atlas", tmp_path / "lape.json"
    common = ["--device", "cpu", "--quiet"]
    runs = [
        ["profile", "--model", gguf, "--corpus", str(corpus), "--label-field", "lang", "--out", str(atlas), *common],
        ["find", "lape", "--atlas", str(atlas), "--no-null", "--top-rate", "0.05", "--out", str(lape)],
        ["find", "vocab", "--atlas", str(atlas), "--model", gguf, "--out", str(tmp_path / "vocab.json")],
        ["evaluate", "--model", gguf, "--sets", str(lape), "--corpus", str(corpus), "--label-field", "lang",
         "--controls", "2", "--max-docs-per-label", "2", "--out", str(tmp_path / "eval.json"), *common],
        ["steer", "--model", gguf, "--atlas", str(atlas), "--sets", str(lape), "--from", "de", "--to", "en",
         "--corpus", str(corpus), "--prompts", "2", "--calibration", "2", "--strength", "3", "--deactivate", "-2.5",
         "--max-new-tokens", "4", "--json", str(tmp_path / "steer.json"), *common],
        ["sparsify", "teal", "--model", gguf, "--corpus", str(corpus), "--sparsity", "0.4", "--scope", "all",
         "--calib-tokens", "512", "--out", str(tmp_path / "plan"), "--device", "cpu"],
        ["bench", "--model", gguf, "--plan", str(tmp_path / "plan"), "--corpus", str(corpus), "--runs", "1",
         "--new-tokens", "2", "--max-windows", "2", "--json", str(tmp_path / "bench.json"), "--device", "cpu"],
        ["explain", "--atlas", str(atlas), "--neurons", str(lape), "--explainer", gguf, "--max-neurons", "1",
         "--max-new-tokens", "4", "--out", str(tmp_path / "explained.json"), *common],
        ["export", "neuronpedia", str(atlas), "--model", gguf, "--neurons", str(lape), "--out", str(tmp_path / "np"),
         "--device", "cpu"],
    ]
    for argv in runs:
        assert main(argv) == 0, argv[:2]
        if "--quiet" in argv:  # no dequantisation bar, the explainer's load included
            assert "de-quantizing" not in capsys.readouterr().err, argv[:2]
        capsys.readouterr()
    assert json.loads((tmp_path / "eval.json").read_text())["params"]["controls"] == 2
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["model"]["fingerprint"] == json.loads((atlas / "atlas.json").read_text())["model"]["fingerprint"]
    assert json.loads((tmp_path / "bench.json").read_text())["speedup"] > 0
    shutil.rmtree(tmp_path / "np")

    # serve: the viewer reloads the model from the atlas (the GGUF file) for live text
    from fastapi.testclient import TestClient

    from neuronatlas.viewer import open_viewer
    from neuronatlas.viewer.app import create_app

    viewer = open_viewer(atlas)
    reply = TestClient(create_app(viewer.data, viewer.model)).post("/api/live", json={"text": TEXTS[0], "layer": 1,
                                                                                     "index": 3})
    assert reply.status_code == 200
    assert reply.json()["token_ids"] == load_tokenizer(gguf)(TEXTS[0]).input_ids
