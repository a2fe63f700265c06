"""The profiler against a brute-force recomputation, across batching, padding, merging and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pyarrow.parquet as pq
import pytest
import numpy as np
import torch
from safetensors.torch import load_file

from neuronatlas.atlas import load_atlas
from neuronatlas.atlas_merge import merge_atlases
from neuronatlas.corpus import iter_windows, read_corpus
from neuronatlas.hooks import capture
from neuronatlas.loading import load_model
from neuronatlas.models import locate_neurons
from neuronatlas.profile import ProfileOptions, profile
from neuronatlas.stats import default_hist_edges

from conftest import write_jsonl

MAX_LENGTH = 24


def run_profile(model_dir, corpus, out, **options):
    options = ProfileOptions(max_length=MAX_LENGTH, top_k=5, **options)
    return profile(str(model_dir), corpus, out, label_field="lang", options=options, device="cpu",
                   overwrite=True, quiet=True)


def brute_force(model_dir, corpus_path, threshold=0.0):
    """Per label and layer: tokens, active counts, sums, min, max; per layer: all values with uids."""
    model, tokenizer = load_model(str(model_dir), device="cpu")
    neurons = locate_neurons(model)
    corpus = read_corpus(corpus_path, label_field="lang")
    labels = sorted(corpus.validate()["documents_per_label"])
    per_layer = {layer: {"values": [], "labels": [], "uids": []} for layer in range(neurons.num_layers)}
    gates = {layer: [] for layer in range(neurons.num_layers)}
    for window in iter_windows(corpus, tokenizer, MAX_LENGTH):
        ids = torch.tensor([window.input_ids])
        found = {}
        with torch.no_grad(), capture(neurons, lambda l, z: found.__setitem__(l, z[0].clone()),
                                       lambda l, g: gates[l].append(g[0].clone())):
            model(input_ids=ids)
        for layer, z in found.items():
            per_layer[layer]["values"].append(z)
            per_layer[layer]["labels"] += [labels.index(window.label)] * len(z)
            per_layer[layer]["uids"] += [(window.seq << 24) + pos for pos in range(len(z))]
    out = {}
    for layer, parts in per_layer.items():
        values = torch.cat(parts["values"])  # (N, D)
        label_ids = torch.tensor(parts["labels"])
        out[layer] = {
            "values": values, "labels": label_ids, "uids": torch.tensor(parts["uids"]),
            "gate": torch.cat(gates[layer]),
        }
    return labels, out


@pytest.fixture(scope="module")
def reference(tiny_llama, corpus_path):
    return brute_force(tiny_llama, corpus_path)


@pytest.fixture(scope="module")
def atlas(tiny_llama, corpus_path, tmp_path_factory):
    return run_profile(tiny_llama, corpus_path, tmp_path_factory.mktemp("atlas") / "a", batch_size=4)


def test_statistics_equal_brute_force(atlas, reference):
    labels, layers = reference
    assert atlas.labels == labels
    for layer, ref in layers.items():
        values, label_ids = ref["values"], ref["labels"]
        for k in range(len(labels)):
            mine = values[label_ids == k]
            assert atlas.tokens_per_label[k] == len(mine)
            assert torch.equal(atlas.stat("active", layer)[k], (mine > 0).sum(0))
            torch.testing.assert_close(atlas.stat("sum", layer)[k], mine.double().sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.stat("sumsq", layer)[k], (mine.double() ** 2).sum(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(atlas.stat("min", layer)[k], mine.amin(0))
            torch.testing.assert_close(atlas.stat("max", layer)[k], mine.amax(0))
            gate = ref["gate"][label_ids == k]
            assert torch.equal(atlas.stat("active", layer, "gate")[k], (gate > 0).sum(0))


def test_histogram_counts_every_token_in_its_bin(atlas, reference):
    _, layers = reference
    edges = default_hist_edges()
    for layer, ref in layers.items():
        hist = atlas.stat("hist", layer)  # (D, bins)
        for neuron in range(hist.shape[0]):
            expected = torch.bincount(torch.bucketize(ref["values"][:, neuron].contiguous(), edges, right=True), minlength=hist.shape[1])
            assert torch.equal(hist[neuron], expected)


def test_top_exemplars_are_the_largest_activations(atlas, reference):
    _, layers = reference
    for layer, ref in layers.items():
        for neuron in range(0, atlas.widths[layer], 5):
            column = ref["values"][:, neuron]
            order = sorted(range(len(column)), key=lambda i: (-float(column[i]), int(ref["uids"][i])))[:5]
            got = atlas.exemplars(layer, neuron)
            assert [(e["seq"] << 24) + e["pos"] for e in got] == [int(ref["uids"][i]) for i in order]
            torch.testing.assert_close(torch.tensor([e["activation"] for e in got]), column[order])


def test_bottom_exemplars_are_the_most_negative_activations(atlas, reference):
    _, layers = reference
    for layer, ref in layers.items():
        for neuron in range(0, atlas.widths[layer], 5):
            column = ref["values"][:, neuron]
            order = sorted(range(len(column)), key=lambda i: (float(column[i]), int(ref["uids"][i])))[:10]
            got = atlas.exemplars(layer, neuron, end="bottom")
            assert [(e["seq"] << 24) + e["pos"] for e in got] == [int(ref["uids"][i]) for i in order]
            torch.testing.assert_close(torch.tensor([e["activation"] for e in got]), column[order])
    saved = pq.read_table(atlas.path / "bottom_exemplars.parquet").to_pylist()
    assert saved and all(row["activation"] < 0 for row in saved)  # SiLU goes below zero; only that is saved
    assert set(atlas.contexts["seq"].to_pylist()) >= {row["seq"] for row in saved}


def test_padding_side_batch_size_and_length_buckets_do_not_change_statistics(tiny_llama, corpus_path, atlas, tmp_path):
    # batch_tokens None: the automatic budget (a layer's z within 4 MiB); 0: batch_size windows; 150: a few short ones
    for batch_size, side, buckets, budget in ((1, "right", 8, None), (7, "left", 8, None), (4, "right", 1, 0),
                                              (2, "right", 3, None), (2, "left", 8, 150)):
        other = run_profile(tiny_llama, corpus_path, tmp_path / f"{side}{batch_size}-{buckets}-{budget}",
                            batch_size=batch_size, padding_side=side, bucket_batches=buckets, batch_tokens=budget)
        assert torch.equal(other.tokens_per_label, atlas.tokens_per_label)
        for layer in range(atlas.num_layers):
            for name in ("sum", "sumsq", "min", "max"):
                torch.testing.assert_close(other.stat(name, layer), atlas.stat(name, layer), rtol=1e-4, atol=1e-4)
            # A value within float noise of the threshold may flip; anything more is a bug.
            differ = (other.stat("active", layer) - atlas.stat("active", layer)).abs().sum()
            assert differ <= 2
        # the document sample: the same documents in the same rows, whatever order the batches ran in
        assert other.docpool.docs.tolist() == atlas.docpool.docs.tolist() and len(other.docpool) > 1
        assert other.docpool.tokens.tolist() == atlas.docpool.tokens.tolist()
        np.testing.assert_allclose(other.docpool.matrix("mean"), atlas.docpool.matrix("mean"), rtol=2e-3, atol=1e-3)


def test_contexts_kept_from_the_pass_equal_the_re_tokenised_ones(tiny_llama, corpus_path, atlas, tmp_path, monkeypatch):
    # over the limit the pass keeps nothing and the end re-tokenises the corpus: the same table
    import neuronatlas.profile.contexts as contexts
    from neuronatlas.profile.run import ProfileRun

    passes = []
    all_windows = ProfileRun.all_windows
    monkeypatch.setattr(ProfileRun, "all_windows", lambda run: passes.append(1) or all_windows(run))
    run_profile(tiny_llama, corpus_path, tmp_path / "kept", batch_size=4)
    assert len(passes) == 1  # the pass only: the contexts came from its windows
    monkeypatch.setattr(contexts, "MAX_TOKENS", 30)
    again = run_profile(tiny_llama, corpus_path, tmp_path / "re-tokenised", batch_size=4)
    assert len(passes) == 3  # the pass, then the corpus again for the contexts
    assert again.contexts.num_rows > 1
    assert again.contexts.equals(atlas.contexts)
    assert pq.read_table(again.path / "contexts.parquet").equals(pq.read_table(atlas.path / "contexts.parquet"))
    windows = {w.seq: w for w in iter_windows(read_corpus(corpus_path, label_field="lang"),
                                              load_model(str(tiny_llama), device="cpu")[1], MAX_LENGTH)}
    for row in atlas.contexts.to_pylist():  # and both are the corpus's windows
        window = windows[row["seq"]]
        assert (row["doc"], row["label"], row["start"], tuple(row["token_ids"])) == (
            window.doc, window.label, window.start, window.input_ids)


def test_halves_merge_into_the_whole(tiny_llama, corpus_rows_and_path, tmp_path):
    rows, corpus = corpus_rows_and_path
    # corpus order (bucket_batches=1): the halves run the whole's very batches, so even near-ties rank alike
    atlas = run_profile(tiny_llama, corpus, tmp_path / "whole", batch_size=4, bucket_batches=1)
    halves = []
    for name, part in (("first", rows[:13]), ("second", rows[13:])):
        path = tmp_path / f"{name}.jsonl"
        write_jsonl(path, part)
        halves.append(run_profile(tiny_llama, path, tmp_path / name, batch_size=4, bucket_batches=1))
    merged = merge_atlases(*halves)
    assert merged.labels == atlas.labels
    assert torch.equal(merged.tokens_per_label, atlas.tokens_per_label)
    assert merged.meta["windows"] == atlas.meta["windows"]
    for layer in range(atlas.num_layers):
        for signal_name in ("z", "gate"):
            assert torch.equal(merged.stat("active", layer, signal_name), atlas.stat("active", layer, signal_name))
        assert torch.equal(merged.stat("hist", layer), atlas.stat("hist", layer))
        assert torch.equal(merged.stat("top_uid", layer), atlas.stat("top_uid", layer))
        assert torch.equal(merged.stat("bottom_uid", layer), atlas.stat("bottom_uid", layer))
        torch.testing.assert_close(merged.stat("sum", layer), atlas.stat("sum", layer))
        assert torch.equal(merged.stat("max", layer), atlas.stat("max", layer))
    merged.save(tmp_path / "merged")
    reloaded = load_atlas(tmp_path / "merged")
    assert reloaded.summary()["tokens"] == atlas.summary()["tokens"]
    assert reloaded.contexts.num_rows == atlas.contexts.num_rows


def test_atlas_round_trips_and_exemplars_are_queryable_with_duckdb(atlas, tmp_path):
    atlas.save(tmp_path / "copy")
    loaded = load_atlas(tmp_path / "copy")
    for name in ("active", "top_uid"):
        assert torch.equal(loaded.stat(name, 1), atlas.stat(name, 1))
    for name in ("sum", "sumsq"):  # saved as float32 (the squares about the mean): within its precision
        torch.testing.assert_close(loaded.stat(name, 1), atlas.stat(name, 1), rtol=1e-6, atol=1e-6)
    loaded.save(tmp_path / "again")  # and a loaded atlas saves and loads again unchanged
    assert all(torch.equal(tensor, load_atlas(tmp_path / "again").tensors()[key]) for key, tensor in loaded.tensors().items())
    # the exemplar lists are saved once, in the exemplar tables, and read back from there
    assert not any(".top_" in key or ".bottom_" in key for key in load_file(str(tmp_path / "copy" / "stats.safetensors")))
    # the histograms are in their own compressed table, and come back exact
    assert not any(".hist." in key for key in load_file(str(tmp_path / "copy" / "stats.safetensors")))
    for layer in range(atlas.num_layers):
        assert atlas.stat("hist", layer).sum() > 0 and torch.equal(loaded.stat("hist", layer), atlas.stat("hist", layer))
    for layer in range(atlas.num_layers):
        assert torch.equal(loaded.stat("top_values", layer), atlas.stat("top_values", layer))
        saved = atlas.saved_exemplars("bottom", layer)  # only values below zero are saved
        assert saved.any() and torch.equal(loaded.saved_exemplars("bottom", layer), saved)
        assert torch.equal(loaded.stat("bottom_uid", layer)[saved], atlas.stat("bottom_uid", layer)[saved])
        assert torch.equal(loaded.stat("bottom_values", layer)[saved], atlas.stat("bottom_values", layer)[saved])
    top = duckdb.sql(
        f"select e.activation, e.pos, c.token_ids from '{tmp_path}/copy/exemplars.parquet' e "
        f"join '{tmp_path}/copy/contexts.parquet' c using (seq) where layer = 1 and neuron = 3 order by rank"
    ).fetchall()
    assert len(top) == 5
    assert top[0][0] == atlas.exemplars(1, 3)[0]["activation"]
    assert all(pos < len(ids) for _, pos, ids in top)  # the context holds the exemplar's token


def test_an_atlas_of_format_two_loads(atlas, tmp_path):
    """Format 2 kept the histograms in stats.safetensors and 8-bit window codes without window_bits
    (and, as format 3, sums and sums of squares in float64)."""
    import json

    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from neuronatlas.atlas import raw_moments
    from neuronatlas.exemplar_windows import with_window_values

    atlas.save(tmp_path / "old")
    old = tmp_path / "old"
    state = raw_moments(load_file(str(old / "stats.safetensors")))  # float64 "sumsq" instead of float32 "m2"
    assert state["z.sumsq.1"].dtype == torch.float64 and "z.m2.1" not in state
    state.update({f"z.hist.{layer}": atlas.stat("hist", layer).int() for layer in range(atlas.num_layers)})
    save_file(state, str(old / "stats.safetensors"))
    (old / "histograms.parquet").unlink()
    table = pq.read_table(old / "exemplars.parquet")
    pq.write_table(table.drop_columns(["window_bits"]), old / "exemplars.parquet")  # read as 8 bits
    meta = json.loads((old / "atlas.json").read_text())
    meta["format_version"] = 2
    (old / "atlas.json").write_text(json.dumps(meta))
    loaded = load_atlas(old)
    for layer in range(atlas.num_layers):
        assert torch.equal(loaded.stat("hist", layer), atlas.stat("hist", layer))
        torch.testing.assert_close(loaded.stat("sumsq", layer), atlas.stat("sumsq", layer), rtol=1e-6, atol=1e-6)
    six = with_window_values(table)["window_activations"].to_pylist()
    eight = with_window_values(loaded.exemplar_table())["window_activations"].to_pylist()
    assert len(six) == len(eight) and six != eight  # the same codes read as 8 bits: other values
    loaded.save(tmp_path / "new")  # saved again in format 4, the codes keep their 8-bit meaning
    assert json.loads((tmp_path / "new" / "atlas.json").read_text())["format_version"] == 4
    assert "z.m2.1" in load_file(str(tmp_path / "new" / "stats.safetensors"))
    assert (tmp_path / "new" / "histograms.parquet").exists()
    assert with_window_values(pq.read_table(tmp_path / "new" / "exemplars.parquet"))["window_activations"].to_pylist() == eight


def test_resume_after_sigkill_gives_the_uninterrupted_atlas(tiny_llama, tmp_path):
    from conftest import write_corpus

    corpus = tmp_path / "long.jsonl"
    write_corpus(corpus, documents=300, seed=3)
    command = [sys.executable, "-m", "neuronatlas", "profile", "--model", str(tiny_llama), "--corpus", str(corpus),
               "--label-field", "lang", "--max-length", str(MAX_LENGTH), "--batch-size", "2", "--batch-tokens", "0",
               "--top-k", "5", "--device", "cpu", "--quiet", "--out", str(tmp_path / "killed"), "--checkpoint-every", "0"]
    # --batch-tokens 0: 2 windows a batch, many buffers, so the run is still going when it is killed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env)
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists() and process.poll() is None, "no checkpoint appeared while the run was going"
    time.sleep(0.5)  # let it get part-way
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "atlas.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([a if a != str(tmp_path / "killed") else str(tmp_path / "whole") for a in command],
                           env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    a, b = load_atlas(tmp_path / "killed"), load_atlas(tmp_path / "whole")
    assert a.tensors().keys() == b.tensors().keys()
    for key, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[key]), key
    assert not checkpoint.exists()


def test_info_json_has_the_contract_keys(atlas, tmp_path, capsys):
    from neuronatlas.cli import main

    atlas.save(tmp_path / "info")
    assert main(["info", str(tmp_path / "info"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == int(atlas.tokens_per_label.sum())
    assert set(info["tokens_per_label"]) == {"de", "en", "ru"}
    assert info["layers"] == 2 and info["neurons_per_layer"] == [37, 37]
    assert len(info["dead_fraction_per_layer"]) == 2
    on_disk = {path.name: path.stat().st_size for path in (tmp_path / "info").iterdir()}
    assert info["disk"]["files"] == on_disk and info["disk"]["bytes"] == sum(on_disk.values())
    assert info["disk"]["bytes_per_neuron"] == pytest.approx(sum(on_disk.values()) / 74, abs=0.1)


def test_the_summary_names_the_document_sample_when_it_dominates_the_bytes():
    """The sample grows with --doc-sample (a byte a neuron per document and pool): a large one is the
    atlas's largest part, and the summary says so, with the option that shrinks it."""
    from neuronatlas.summary import document_sample_line

    def summary(sample_bytes: int) -> dict:
        files = {"exemplars.parquet": 3000, "stats.safetensors": 1000, "docpool_mean.npy": sample_bytes,
                 "docpool_max.npy": sample_bytes}
        return {"neurons_per_layer": [2, 2], "doc_sample_documents": sample_bytes // 4,
                "disk": {"bytes": sum(files.values()), "files": files}}

    line = document_sample_line(summary(2048))
    assert "document sample (512 documents, 2 bytes a neuron each) 1.00 KiB a neuron" in line and "--doc-sample" in line
    assert document_sample_line(summary(100)) is None  # a small sample: nothing to say


def test_import_loads_nothing_heavy():
    code = "import sys, neuronatlas; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.stdout.split() == ["False", "False"]


def test_resume_takes_an_option_a_checkpoint_predates_as_its_default():
    """A checkpoint written before an option existed (window_bits) resumes with that option at its
    default, and refuses another value, naming it."""
    from dataclasses import asdict

    from neuronatlas.errors import NeuronAtlasError
    from neuronatlas.profile import ProfileOptions
    from neuronatlas.profile.options import check_same_run

    current = {"model": {"fingerprint": "m"}, "corpus": {"fingerprint": "c"}, "labels": ["de", "en"],
               "options": asdict(ProfileOptions(max_length=64))}
    older = dict(current, options={k: v for k, v in current["options"].items() if k != "window_bits"})
    check_same_run(older, current)
    other = dict(current, options=dict(current["options"], window_bits=8))
    with pytest.raises(NeuronAtlasError, match="window_bits was 6 now 8"):
        check_same_run(older, other)
