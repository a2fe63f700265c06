"""Profiling under torchrun (2 ranks, gloo, CPU) against one process, resume after a lost rank, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli_fails

from neuronatlas.atlas import load_atlas
from neuronatlas.bundled import CORPUS_TRAIN, model_path
from neuronatlas.cli import main
from neuronatlas.corpus import read_corpus
from neuronatlas.distributed import launch_from_env, refuse_distributed
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.profile.shards import balanced_bounds

TINY_LLAMA = model_path("tiny-llama")
OPTIONS = ["--max-length", "48", "--batch-size", "4", "--top-k", "5", "--doc-sample", "3", "--exemplar-radius", "2",
           "--device", "cpu", "--quiet"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
for _key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_key, None)


def corpus_slice(path: Path, documents: int, step: int = 37) -> Path:
    """Every ``step``-th document of the bundled corpus: all five languages, in corpus order."""
    lines = CORPUS_TRAIN.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[::step][:documents]) + "\n", encoding="utf-8")
    return path


def profile_command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["profile", "--model", str(TINY_LLAMA), "--corpus", str(corpus), "--text-field", "text",
            "--label-field", "lang", "--out", str(out), *OPTIONS, *extra]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "neuronatlas", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def info(atlas: Path, capsys) -> dict:
    capsys.readouterr()  # drop what came before (profile prints its summary)
    assert main(["info", str(atlas), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_atlas(a: Path, b: Path, capsys) -> None:
    """Counts and exemplars identical, floats within float64 summation noise, same files."""
    assert info(a, capsys) == info(b, capsys)
    first, second = load_atlas(a).tensors(), load_atlas(b).tensors()
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(second[key], tensor, rtol=1e-9, atol=1e-9, msg=key)
        else:
            assert torch.equal(second[key], tensor), key
    for name in ("exemplars.parquet", "contexts.parquet", "vocab.parquet", "docpool.parquet"):
        assert pq.read_table(b / name).equals(pq.read_table(a / name)), name
    for name in sorted(path.name for path in a.glob("docpool_*.npy")):  # the codes and their knots
        assert np.array_equal(np.load(b / name), np.load(a / name)), name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_slice(tmp_path_factory.mktemp("corpus") / "slice.jsonl", 30)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "atlas"
    assert main(profile_command(corpus, out)) == 0
    return out


def test_two_ranks_give_the_atlas_of_one_process(corpus, single, tmp_path, capsys):
    out = tmp_path / "two"
    done = subprocess.run(torchrun(*profile_command(corpus, out)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_atlas(single, out, capsys)
    atlas = load_atlas(out)
    per_label = read_corpus(corpus, label_field="lang").validate()["documents_per_label"]
    assert atlas.summary()["doc_sample_documents"] == sum(min(3, n) for n in per_label.values())  # cap across blocks
    assert len(atlas.exemplars(0, 0)) == 5


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of a torchrun worker by its RANK, read from /proc (Linux)."""
    pending = [launcher.pid]
    while pending:
        pid = pending.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            pending += [int(child) for child in children]
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher.pid and f"RANK={rank}".encode() in environ:
            return pid
    return None


def test_a_killed_rank_fails_the_job_and_resume_completes_it(tmp_path, capsys):
    corpus = corpus_slice(tmp_path / "long.jsonl", 90, step=13)
    killed = tmp_path / "killed"
    # one window a batch (--batch-tokens 0): rank 1 is still running when it is killed
    command = profile_command(corpus, killed, "--checkpoint-every", "0", "--batch-size", "1", "--batch-tokens", "0")
    launcher = subprocess.Popen(torchrun(*command), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = killed / "checkpoint.rank1-of-2.safetensors"
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = rank_pid(launcher, 1)
    assert checkpoint.exists() and victim is not None and launcher.poll() is None, "rank 1 never checkpointed"
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode != 0
    assert "rank 0 was stopped by the launcher" in stderr or "rank 0 lost the other ranks" in stderr, stderr[-3000:]
    assert not (killed / "atlas.json").exists(), "a failed job left something that looks like an atlas"
    cli_fails(capsys, command + ["--resume"], "ran on 2 process(es)", "torchrun --nproc_per_node 2")
    resumed = subprocess.run(torchrun(*command, "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(killed.glob("checkpoint*"))
    whole = tmp_path / "whole"
    assert main(profile_command(corpus, whole, "--batch-size", "1", "--batch-tokens", "0")) == 0
    capsys.readouterr()  # the profile's summary (--quiet hides progress only)
    assert_same_atlas(whole, killed, capsys)


def test_more_ranks_than_documents_is_refused(tmp_path):
    corpus = corpus_slice(tmp_path / "one.jsonl", 1)
    done = subprocess.run(torchrun(*profile_command(corpus, tmp_path / "out")), env=ENV, capture_output=True, text=True)
    assert done.returncode != 0
    assert "neuronatlas: error: 2 ranks but the corpus has only 1 document(s)" in done.stderr
    assert not (tmp_path / "out" / "atlas.json").exists()


def test_ranks_started_with_different_options_or_models_are_refused(corpus, tmp_path):
    port = free_port()
    variants = {"options": (["--top-k", "5"], ["--top-k", "6"]), "model": ([], ["--model", str(model_path("tiny-gpt2"))])}
    for what, (first, second) in variants.items():
        ranks = []
        for rank, extra in enumerate((first, second)):
            env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            argv = [sys.executable, "-m", "neuronatlas", *profile_command(corpus, tmp_path / what), *extra]
            ranks.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
        for process in ranks:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 2, stderr[-2000:]
            assert "rank 1 was started with another command line than rank 0" in stderr
            assert what in stderr
        port = free_port()


def test_missing_rendezvous_is_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cli_fails(capsys, profile_command(corpus, tmp_path / "a"), "MASTER_ADDR", "torchrun")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nobody listens there
    started = time.monotonic()
    cli_fails(capsys, profile_command(corpus, tmp_path / "b", "--dist-timeout", "2"),
              "rank 1 found no rendezvous at 127.0.0.1:", "within 2 s")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "b" / "atlas.json").exists()


def test_one_process_verbs_refuse_the_launcher(monkeypatch):
    refuse_distributed("evaluate")  # not launched: nothing to say
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch_from_env().world == 2
    with pytest.raises(NeuronAtlasError, match="evaluate runs on one process .*rank 1 of 2"):
        refuse_distributed("evaluate")


def test_blocks_are_contiguous_balanced_and_never_empty():
    tokens = np.array([5, 5, 5, 5, 100, 5, 5, 5])
    for world in (1, 2, 3, 8):
        bounds = balanced_bounds(tokens, world)
        assert bounds[0] == 0 and bounds[-1] == len(tokens) and len(bounds) == world + 1
        assert all(b > a for a, b in zip(bounds, bounds[1:]))
    assert balanced_bounds(np.array([10] * 10), 2) == [0, 5, 10]


def test_sharded_checkpoint_and_device_map_give_the_same_atlas(corpus, single, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded-model"
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA).save_pretrained(sharded, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    out = tmp_path / "atlas"
    argv = profile_command(corpus, out, "--device-map", "auto")
    argv[argv.index("--model") + 1] = str(sharded)
    assert main(argv) == 0
    capsys.readouterr()  # the profile's summary (--quiet hides progress only)
    first, second = info(single, capsys), info(out, capsys)
    other = ("model", "disk")  # another model folder: atlas.json names it, so its size differs too
    assert {k: v for k, v in first.items() if k not in other} == {k: v for k, v in second.items() if k not in other}
    assert load_atlas(out).meta["model"]["fingerprint"] == load_atlas(single).meta["model"]["fingerprint"]
    for key, tensor in load_atlas(single).tensors().items():
        torch.testing.assert_close(load_atlas(out).tensors()[key], tensor, msg=key)


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_quantised_loading_without_bitsandbytes_is_a_clear_error(corpus, tmp_path, capsys):
    cli_fails(capsys, profile_command(corpus, tmp_path / "q", "--load-in", "8bit"), "--load-in 8bit needs bitsandbytes")
