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
from neuronatlas.docpool import decode, rank_codes, rank_knots
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.methods.selectivity import auroc, label_scores
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


@pytest.mark.parametrize("pools", [["mean", "max"], ["mean"]])
def test_the_torch_pooling_of_a_gpu_equals_brute_force(tiny_llama, corpus_path, reference, tmp_path, monkeypatch, pools):
    """Without the CPU kernel (as on a GPU) the sample is pooled by torch; with the mean alone the
    max is not computed, and the mean is the same."""
    from neuronatlas import stats_kernel

    monkeypatch.setenv(stats_kernel.DISABLE_VARIABLE, "0")
    made = run_profile(tiny_llama, corpus_path, tmp_path / "torch", doc_pools=pools)
    pooled = made.docpool
    assert pooled.pools == pools
    mean, peak = doc_pools(reference, made.num_layers, sampled_docs(reference, CAP))
    np.testing.assert_allclose(pooled.matrix("mean"), mean, rtol=2e-3, atol=1e-6)
    if "max" in pools:
        np.testing.assert_allclose(pooled.matrix("max"), peak, rtol=2e-3, atol=1e-6)


def test_the_default_sample_holds_the_ranks_of_the_values(tiny_llama, corpus_path, atlas, tmp_path):
    """The default format keeps each document's rank among the sample (a byte) instead of its value:
    with up to 256 documents the exact ranks, ties shared, so AUROC and AP are those of the values."""
    ranked = load_atlas(run_profile(tiny_llama, corpus_path, tmp_path / "ranked", doc_format="ranks").path)
    assert ranked.docpool.ranked and not atlas.docpool.ranked
    for pool in ("mean", "max"):
        assert np.load(tmp_path / "ranked" / f"docpool_{pool}.npy", mmap_mode="r").dtype == np.uint8
        values, codes = atlas.docpool.matrix(pool), ranked.docpool.scores(pool)  # (12, 74) both
        assert np.array_equal(codes, rank_codes(values)) and np.array_equal(atlas.docpool.scores(pool), values)
        decoded = ranked.docpool.matrix(pool)  # values again, from each neuron's 17 knots
        for column in range(values.shape[1]):  # the same order, the same ties
            lower = values[:, column][:, None] < values[:, column][None, :]
            assert np.array_equal(lower, codes[:, column][:, None] < codes[:, column][None, :])
            assert not (decoded[:, column][:, None] > decoded[:, column][None, :])[lower].any()  # never reversed
        np.testing.assert_allclose(decoded, values, rtol=2e-3, atol=1e-6)  # 12 documents: every rank is a knot
    assert (ranked.docpool.scores("mean").max(0) == len(ranked.docpool) - 1).any()  # ranks 0..11, not rescaled
    for metric in ("auroc", "ap"):
        mine = label_scores(ranked, ranked.labels, metric)
        theirs = label_scores(atlas, atlas.labels, metric)
        for label in atlas.labels:
            torch.testing.assert_close(torch.cat(mine[label]), torch.cat(theirs[label]), rtol=0, atol=1e-12)


def test_rank_codes_beyond_256_documents_are_quantiles_within_a_thousandth_of_auroc():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_t(2, (1000, 40)), np.zeros((1000, 1))], axis=1).astype(np.float16)
    values[:500, :20] += 1.0  # the first 500 documents (the label) score higher on half the neurons
    codes = rank_codes(values)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes[:, :40].max() == 255
    assert (codes[:, 40] == 0).all()  # a column of ties: one code
    order = np.argsort(values[:, 0].astype(np.float32), kind="stable")
    assert (np.diff(codes[order, 0].astype(int)) >= 0).all()  # monotone in the value
    positive = torch.arange(1000) < 500
    exact = auroc(torch.from_numpy(values.astype(np.float32)), positive)
    coded = auroc(torch.from_numpy(codes.astype(np.float32)), positive)
    assert exact[:20].min() > 0.55  # the effect is there to be kept
    assert (coded - exact).abs().max() < 1e-3
    decoded = decode(codes, rank_knots(values), len(values))  # (1000, 41) from 17 values a neuron
    ordered = np.sort(values.astype(np.float32), axis=0)
    assert np.array_equal(decoded.min(0), ordered[0]) and np.array_equal(decoded.max(0), ordered[-1])
    middle = np.abs(decoded - values)[(values > ordered[50]) & (values < ordered[-50])]  # off the tails
    assert np.median(middle) < 0.05 * np.median(np.abs(values))


def test_resume_gives_the_uninterrupted_atlas(tiny_llama, corpus_path, tmp_path, monkeypatch):
    """Interrupted several batches after its last checkpoint (rows written past it), then resumed;
    buffers of 4 windows batched by length (one window a batch), so the checkpoints fall between them."""
    bucketed = options(batch_size=1, bucket_batches=4, doc_format="ranks")
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


def test_sums_are_saved_as_float32_with_squares_about_the_mean():
    """A neuron whose mean is large beside its spread: its variance survives the float32 file (M2),
    where a float32 sum of squares would lose it to cancellation."""
    from neuronatlas.atlas import centred_moments, raw_moments

    rng = np.random.default_rng(0)
    z = torch.from_numpy(1000.0 + 0.01 * rng.standard_normal((5000, 3)))  # (tokens, neurons) float64
    state = {"tokens_per_label": torch.tensor([5000, 0]), "z.sum.0": torch.stack([z.sum(0), torch.zeros(3)]),
             "z.sumsq.0": torch.stack([(z * z).sum(0), torch.zeros(3)])}
    saved = centred_moments(dict(state))
    assert set(saved) == {"tokens_per_label", "z.sum.0", "z.m2.0"}
    assert saved["z.sum.0"].dtype == saved["z.m2.0"].dtype == torch.float32
    read = raw_moments(dict(saved))
    variance = read["z.sumsq.0"][0] / 5000 - (read["z.sum.0"][0] / 5000) ** 2
    torch.testing.assert_close(variance, z.var(0, unbiased=False), rtol=1e-4, atol=0)
    assert torch.equal(read["z.sumsq.0"][1], torch.zeros(3))  # a label without tokens stays zero
    naive = state["z.sumsq.0"][0].float().double() / 5000 - (state["z.sum.0"][0].float().double() / 5000) ** 2
    assert ((naive - z.var(0, unbiased=False)).abs() > 0.5 * z.var(0, unbiased=False)).all()  # off by half or more


def test_the_default_sample_is_bounded_and_merge_says_when_it_drops_one(tiny_llama, corpus_rows_and_path, tmp_path,
                                                                        capsys):
    """By default 512 documents are shared by the labels (3 labels: 170 each); two atlases of rank
    codes (each ranked within its own sample) merge without a sample, and merge says why."""
    from neuronatlas.cli import main
    from neuronatlas.profile.options import auto_doc_sample

    assert [auto_doc_sample(k) for k in (1, 2, 3, 5, 16, 100)] == [256, 256, 170, 102, 32, 32]
    rows, _ = corpus_rows_and_path
    parts = []
    for name, part in (("first", rows[:13]), ("second", rows[13:])):
        write_jsonl(tmp_path / f"{name}.jsonl", part)
        parts.append(str(tmp_path / name))
        assert main(["profile", "--model", str(tiny_llama), "--corpus", str(tmp_path / f"{name}.jsonl"), "--label-field",
                     "lang", "--out", parts[-1], "--device", "cpu", "--quiet", "--max-length", "24"]) == 0
    first = load_atlas(parts[0])
    assert first.meta["options"]["doc_sample"] == 170 and first.meta["options"]["doc_pools"] == ["mean"]
    assert first.docpool.ranked and len(first.docpool) == 13
    capsys.readouterr()
    assert main(["merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "no document sample" in out and "--doc-format float16" in out
    merged = load_atlas(tmp_path / "merged")
    assert merged.docpool is None and merged.meta["options"]["doc_sample"] == 0
