"""Interrupts lose no work: SIGINT, SIGTERM or SIGKILL at any phase of a real `neuronatlas profile`,
then `--resume`, gives the atlas of an uninterrupted run (signal x phase: see CASES).

The phases: early (the lock is taken, the model loading, no batch yet), mid-pass (a checkpoint on
disk), and writing (the pass is over; NEURONATLAS_TEST_WRITING_DELAY holds the run there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from neuronatlas.atlas import load_atlas
from neuronatlas.bundled import CORPUS_TRAIN, first_per_label, model_path
from neuronatlas.files import CHECKPOINT_FILE, LOCK_FILE
from neuronatlas.profile.run import WRITING_DELAY_VARIABLE

OPTIONS = ["--label-field", "lang", "--max-length", "32", "--batch-size", "4", "--top-k", "5", "--device", "cpu",
           "--quiet", "--threads", "1", "--batch-tokens", "0"]  # 4 windows a batch: a run long enough to interrupt
CASES = [  # (signal, phase)
    (signal.SIGINT, "early"),
    (signal.SIGTERM, "mid"),
    (signal.SIGINT, "mid"),
    (signal.SIGTERM, "writing"),
    (signal.SIGKILL, "early"),
    (signal.SIGKILL, "writing"),
]


def _command(corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "neuronatlas", "profile", "--model", str(model_path("tiny-llama")),
            "--corpus", str(corpus), *OPTIONS, "--out", str(out)]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus (300 bundled documents) and the atlas of an uninterrupted run over it."""
    root = tmp_path_factory.mktemp("interrupts")
    corpus = first_per_label(CORPUS_TRAIN, root / "corpus.jsonl", 60)
    done = subprocess.run(_command(corpus, root / "whole"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return corpus, load_atlas(root / "whole")


def _wait_for(condition, process: subprocess.Popen, what: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after {limit} s"
        time.sleep(0.02)


def _finished_pass(checkpoint: Path) -> bool:
    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            return json.loads(handle.metadata()["progress"]).get("finished", False)
    except Exception:  # not there yet, or being replaced this instant
        return False


def _assert_same_atlas(a, b) -> None:
    assert a.tensors().keys() == b.tensors().keys()
    for key, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[key]), key
    assert a.exemplar_table().equals(b.exemplar_table())
    assert a.contexts.equals(b.contexts)
    for key in ("documents", "windows", "tokens", "tokens_per_label"):
        assert a.meta.get(key) == b.meta.get(key), key


@pytest.mark.parametrize("signum,phase", CASES, ids=[f"{signal.Signals(s).name}-{p}" for s, p in CASES])
def test_an_interrupted_profile_resumes_to_the_same_atlas(signum, phase, reference, tmp_path):
    corpus, whole = reference
    out = tmp_path / "atlas"
    command = _command(corpus, out) + (["--checkpoint-every", "0"] if phase == "mid" else [])
    delay = {WRITING_DELAY_VARIABLE: "30"} if phase == "writing" else {}
    process = subprocess.Popen(command, env=_env(**delay), stderr=subprocess.PIPE, text=True)
    checkpoint = out / CHECKPOINT_FILE
    if phase == "early":
        _wait_for((out / LOCK_FILE).exists, process, "lock file")
        time.sleep(0.1)
    elif phase == "mid":
        _wait_for(checkpoint.exists, process, "checkpoint")
    else:
        _wait_for(lambda: _finished_pass(checkpoint), process, "checkpoint of the finished pass")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert not (out / "atlas.json").exists(), "the run finished before the signal"
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + signum, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "interrupted: checkpoint at" in lines[0] and "--resume" in lines[0], err
        assert checkpoint.exists() and not (out / LOCK_FILE).exists()
    resumed = subprocess.run(command + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    if signum == signal.SIGKILL and phase == "early":
        assert "taking over the lock" in resumed.stderr
    elif phase == "writing":
        assert "resuming at the writing of the atlas" in resumed.stderr
    else:
        assert "resuming at document" in resumed.stderr, resumed.stderr
    _assert_same_atlas(load_atlas(out), whole)
    assert not checkpoint.exists() and not (out / LOCK_FILE).exists()


def test_a_second_profile_into_the_same_folder_is_refused(reference, tmp_path):
    corpus, _ = reference
    out = tmp_path / "atlas"
    first = subprocess.Popen(_command(corpus, out), env=_env(**{WRITING_DELAY_VARIABLE: "30"}),
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for((out / LOCK_FILE).exists, first, "lock file")
        second = subprocess.run(_command(corpus, out), env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0], second.stderr
        assert not out.with_name(out.name + ".writing").exists()
    finally:
        first.kill()
        first.communicate()
