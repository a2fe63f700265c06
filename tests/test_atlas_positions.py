"""The atlas and its statistics: position statistics, per-document pooling (docpool), resume,
merge, and the profile flags that turn them off; checked against a brute-force recomputation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronatlas.atlas import Atlas, default_position_edges, load_atlas
from neuronatlas.atlas_merge import merge_atlases
from neuronatlas.corpus import read_corpus
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.profile import ProfileRun, profile
from neuronatlas.stats import SignalStats

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_jsonl  # noqa: E402
from test_cli_errors import StopsAfter  # noqa: E402
from detect_fixtures import CAP, atlas, doc_pools, options, reference, run_profile  # noqa: E402,F401  (fixtures, helpers)


# ---- position statistics ------------------------------------------------------------------------


def test_default_position_edges():
    assert default_position_edges(24) == [0, 1, 2, 3, 4, 8, 16]
    assert default_position_edges(512)[-3:] == [64, 128, 256]
    assert default_position_edges(2) == [0, 1]


def check_positions(atlas, reference):
    edges = torch.tensor(atlas.position_edges)
    assert atlas.position_buckets() == ["0", "1", "2", "3", "4-7", "8-15", "16-23"]
    for layer in range(atlas.num_layers):
        values = torch.cat([w["z"][layer] for w in reference]).double()  # (N, D)
        positions = torch.cat([torch.arange(len(w["z"][layer])) for w in reference])
        buckets = torch.bucketize(positions, edges, right=True) - 1
        for b in range(len(edges)):
            mine = values[buckets == b]
            assert int(atlas.position_tokens[b]) == len(mine)
            assert torch.equal(atlas.position_stat("active", layer)[b], (mine > 0).sum(0))
            torch.testing.assert_close(atlas.position_stat("sum", layer)[b], mine.sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.position_stat("sumsq", layer)[b], (mine ** 2).sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.position_stat("max", layer)[b].double(), mine.amax(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.position_stat("min", layer)[b].double(), mine.amin(0), rtol=1e-5, atol=1e-5)


def test_position_statistics_equal_brute_force(atlas, reference):
    check_positions(atlas, reference)
    assert atlas.meta["options"]["position_edges"] == [0, 1, 2, 3, 4, 8, 16]
    assert int(atlas.position_tokens.sum()) == int(atlas.tokens_per_label.sum())


# ---- the document sample ------------------------------------------------------------------------


def sampled_docs(reference, cap):
    """The first ``cap`` documents of each label, in corpus order."""
    taken, docs, seen = {}, [], set()
    for window in reference:
        if window["doc"] in seen:
            continue
        seen.add(window["doc"])
        if taken.get(window["label"], 0) < cap:
            taken[window["label"]] = taken.get(window["label"], 0) + 1
            docs.append(window["doc"])
    return docs


def check_docpool(pool, reference, docs, layers):
    assert pool.docs.tolist() == docs
    labels = {w["doc"]: w["label"] for w in reference}
    assert pool.labels == [labels[d] for d in docs]
    tokens = {d: sum(len(w["z"][0]) for w in reference if w["doc"] == d) for d in docs}
    assert pool.tokens.tolist() == [tokens[d] for d in docs]
    mean, peak = doc_pools(reference, layers, docs)
    np.testing.assert_allclose(pool.matrix("mean"), mean, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(pool.matrix("max"), peak, rtol=2e-3, atol=1e-6)


def test_doc_pooled_mean_and_max_equal_brute_force(atlas, reference):
    docs = sampled_docs(reference, CAP)
    assert len(docs) == 3 * CAP
    # the sample must hold documents of several windows, and windows cut across batches of 4
    windows_of = {d: [w["seq"] for w in reference if w["doc"] == d] for d in docs}
    assert any(len(seqs) > 1 for seqs in windows_of.values())
    assert any(seqs[0] // 4 != seqs[-1] // 4 for seqs in windows_of.values())
    check_docpool(atlas.docpool, reference, docs, atlas.num_layers)
    assert atlas.docpool.matrix("mean", 1).shape == (3 * CAP, atlas.widths[1])
    assert np.load(Path(atlas.docpool.parts[0]["mean"].filename), mmap_mode="r").dtype == np.float16


def test_resume_gives_the_uninterrupted_atlas(tiny_llama, corpus_path, tmp_path, monkeypatch):
    """Interrupted several batches after its last checkpoint (rows written past it), then resumed;
    buffers of 4 windows batched by length (one window a batch), so the checkpoints fall between them."""
    bucketed = options(batch_size=1, bucket_batches=4)
    atlas = profile(str(tiny_llama), corpus_path, tmp_path / "whole", label_field="lang", options=bucketed,
                    device="cpu", quiet=True)
    out = tmp_path / "resumed"
    original = ProfileRun.checkpoint
    calls = []

    def only_early_checkpoints(self, path):
        calls.append(path)
        if len(calls) <= 3:  # later batches run on, writing rows the checkpoint does not count
            original(self, path)

    monkeypatch.setattr(ProfileRun, "checkpoint", only_early_checkpoints)
    corpus = StopsAfter(read_corpus(corpus_path, label_field="lang"), limit=16)
    with pytest.raises(KeyboardInterrupt):
        profile(str(tiny_llama), corpus, out, options=bucketed, device="cpu", quiet=True, checkpoint_every=0)
    assert len(calls) > 3 and (out / "checkpoint.safetensors").exists()
    monkeypatch.setattr(ProfileRun, "checkpoint", original)
    resumed = profile(str(tiny_llama), corpus_path, out, label_field="lang", options=bucketed, device="cpu",
                      quiet=True, resume=True)
    assert not (out / "checkpoint.safetensors").exists() and not (out / "docpool.partial").exists()
    resumed = load_atlas(out)
    for pool in ("mean", "max"):
        assert np.array_equal(resumed.docpool.matrix(pool), atlas.docpool.matrix(pool))
    assert resumed.docpool.docs.tolist() == atlas.docpool.docs.tolist()
    assert resumed.docpool.tokens.tolist() == atlas.docpool.tokens.tolist()
    for key, tensor in atlas.tensors().items():
        assert torch.equal(resumed.tensors()[key], tensor), key


def test_halves_merge_positions_and_concatenate_doc_samples(tiny_llama, corpus_rows_and_path, atlas, reference, tmp_path):
    rows, _ = corpus_rows_and_path
    halves = []
    for name, part in (("first", rows[:13]), ("second", rows[13:])):
        path = tmp_path / f"{name}.jsonl"
        write_jsonl(path, part)
        halves.append(run_profile(tiny_llama, path, tmp_path / name, doc_sample=256))
    merged = merge_atlases(*halves)
    assert torch.equal(merged.position_tokens, atlas.position_tokens)
    for layer in range(atlas.num_layers):
        assert torch.equal(merged.position_stat("active", layer), atlas.position_stat("active", layer))
        for name in ("sum", "sumsq", "min", "max"):
            torch.testing.assert_close(merged.position_stat(name, layer), atlas.position_stat(name, layer))
    merged.save(tmp_path / "merged")
    reloaded = load_atlas(tmp_path / "merged")
    check_positions(reloaded, reference)
    check_docpool(reloaded.docpool, reference, list(range(len(rows))), atlas.num_layers)  # every document
    assert reloaded.meta["options"]["position_edges"] == atlas.meta["options"]["position_edges"]


def test_merge_keeps_positions_of_compatible_max_lengths_and_drops_others():
    def fake(max_length, edges):
        meta = {"options": {"positions": edges is not None, "position_edges": edges, "max_length": max_length,
                            "threshold": 0.0}, "model": {"widths": [2]}}
        part = Atlas(meta, {}, torch.zeros(1, dtype=torch.int64))
        if edges is not None:
            part.positions = SignalStats([2], len(edges))
            part.positions.update(0, torch.ones(len(edges), 2), torch.arange(len(edges)), torch.arange(len(edges)))
            part.position_tokens = torch.ones(len(edges), dtype=torch.int64)
        return part

    from neuronatlas.atlas_merge import merge_positions

    merged = fake(64, [0])
    merge_positions(fake(24, default_position_edges(24)), fake(64, default_position_edges(64)), merged)
    assert merged.meta["options"]["position_edges"] == default_position_edges(64)
    assert merged.position_tokens.tolist() == [2, 2, 2, 2, 2, 2, 2, 1]
    assert merged.position_stat("sum", 0)[-1].tolist() == [1, 1]
    merged = fake(64, [0])
    merge_positions(fake(24, [0, 5]), fake(64, default_position_edges(64)), merged)
    assert merged.positions is None and merged.meta["options"]["positions"] is False
    merged = fake(64, [0])
    merge_positions(fake(24, None), fake(64, default_position_edges(64)), merged)
    assert merged.positions is None


def test_no_positions_and_no_doc_sample(tiny_llama, corpus_path, tmp_path):
    bare = run_profile(tiny_llama, corpus_path, tmp_path / "bare", positions=False, doc_sample=0)
    assert bare.positions is None and bare.docpool is None
    assert not any(key.startswith("position") for key in bare.tensors())
    loaded = load_atlas(tmp_path / "bare")
    assert loaded.positions is None and loaded.docpool is None
    assert not (tmp_path / "bare" / "docpool_mean.npy").exists()
    from neuronatlas.methods.positional import find_positional
    from neuronatlas.methods.selectivity import find_selective

    with pytest.raises(NeuronAtlasError, match="--no-positions"):
        find_positional(loaded)
    with pytest.raises(NeuronAtlasError, match="--doc-sample"):
        find_selective(loaded, metric="ap")
    assert len(find_selective(loaded, metric="prob_diff", top_k=2)) == 6  # needs no sample


def test_profile_cli_flags_and_bad_options(tiny_llama, corpus_path, tmp_path, capsys):
    from neuronatlas.cli import main

    argv = ["profile", "--model", str(tiny_llama), "--corpus", str(corpus_path), "--label-field", "lang",
            "--device", "cpu", "--quiet", "--max-length", "24", "--top-k", "2"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--doc-sample", "1", "--no-positions"]) == 0
    made = load_atlas(tmp_path / "a")
    assert made.positions is None and made.docpool.labels == ["en", "de", "ru"]
    assert made.meta["options"]["doc_sample"] == 1 and made.meta["options"]["positions"] is False
    assert main(argv + ["--out", str(tmp_path / "b"), "--doc-sample", "-1"]) == 2
    assert "--doc-sample" in capsys.readouterr().err  # the flag and its range, one line
    with pytest.raises(NeuronAtlasError, match="position edges"):
        profile(str(tiny_llama), corpus_path, tmp_path / "c", options=options(position_edges=[1, 4]), device="cpu",
                quiet=True)
