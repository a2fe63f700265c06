"""The output folder of a profile: refusing to clobber, checkpoints, resuming, cleaning up.

A checkpoint is one safetensors file per process (:func:`neuronatlas.files.checkpoint_name`):
the statistics so far plus, as JSON metadata, the progress and the run's metadata. It is written
to a ``.partial`` file and renamed, so a kill leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..atlas import is_atlas
from ..errors import NeuronAtlasError
from ..files import (ATLAS_FILES, CHECKPOINT_GLOB, DOCPOOL_PARTIAL_DIR, LOCK_FILE, PARTIAL_SUFFIX, SCRATCH_GLOBS,
                     STAGING_SUFFIX, checkpoint_name, save_tensors)


def checkpoint_files(out: Path) -> list[Path]:
    return sorted(out.glob(CHECKPOINT_GLOB)) if out.is_dir() else []


def start_output(out: Path, overwrite: bool, resume: bool, world: int, stale_lock: bool = False,
                 check_only: bool = False) -> bool:
    """Check ``out`` for a job of ``world`` processes, and with ``overwrite`` clear it; True when --resume
    finds the atlas complete. ``check_only``: refuse what would be refused but change nothing (before
    the lock is taken). ``stale_lock``: a dead run's lock was taken over (it may have died before any file)."""
    if resume and is_atlas(out) and not checkpoint_files(out):
        return True
    if check_only:
        if overwrite:  # anything goes but a file
            if out.exists() and not out.is_dir():
                raise NeuronAtlasError(f"output {out} exists and is not a folder; choose another --out")
            return False
        stale_lock = (out / LOCK_FILE).exists()
    _prepare_output(out, overwrite, resume, world, stale_lock, quiet=check_only)
    return False


def _prepare_output(out: Path, overwrite: bool, resume: bool, world: int, stale_lock: bool, quiet: bool) -> None:
    """Refuse to clobber an atlas or an interrupted run unless told to."""
    if out.exists() and not out.is_dir():
        raise NeuronAtlasError(f"output {out} exists and is not a folder; choose another --out")
    checkpoints = checkpoint_files(out)
    if overwrite:
        for name in ATLAS_FILES:
            (out / name).unlink(missing_ok=True)
        for path in checkpoints:
            path.unlink()
        shutil.rmtree(out.with_name(out.name + STAGING_SUFFIX), ignore_errors=True)
        shutil.rmtree(out / DOCPOOL_PARTIAL_DIR, ignore_errors=True)
        return
    if is_atlas(out) and not checkpoints:
        raise NeuronAtlasError(f"{out} already holds an atlas; pass --overwrite to replace it or choose another --out")
    if checkpoints and not resume:
        raise NeuronAtlasError(f"{out} holds an interrupted profile; pass --resume to continue it or --overwrite to restart")
    if checkpoints:
        _check_same_world(checkpoints, world)
        return
    # A run killed before its first checkpoint leaves only scratch files: it starts again from scratch.
    items = [item for item in out.iterdir() if item.name != LOCK_FILE] if out.is_dir() else []
    scratch = [item for item in items if item.name == DOCPOOL_PARTIAL_DIR or item.name.endswith(PARTIAL_SUFFIX)]
    if len(scratch) < len(items):
        raise NeuronAtlasError(f"output folder {out} is not empty and holds no atlas; choose another --out")
    if resume and not scratch and not stale_lock:
        raise NeuronAtlasError(f"--resume: no checkpoint in {out}, nothing to resume; leave out --resume to start a profile")
    if resume and not quiet:
        print(f"neuronatlas: --resume: no checkpoint in {out} (the run was stopped before its first one); "
              "starting from the beginning", file=sys.stderr)


def _check_same_world(checkpoints: list[Path], world: int) -> None:
    """An interrupted profile resumes with as many processes as it ran on: each rank has its block."""
    expected = {checkpoint_name(rank, world) for rank in range(world)}
    strangers = [path.name for path in checkpoints if path.name not in expected]
    if strangers:
        name = strangers[0]
        ran_on = name.split("-of-")[1].split(".")[0] if "-of-" in name else "1"
        how = "python -m neuronatlas profile" if ran_on == "1" else f"torchrun --nproc_per_node {ran_on} (in all)"
        raise NeuronAtlasError(
            f"--resume: the interrupted profile ran on {ran_on} process(es) ({name}), this run on {world}; "
            f"resume it with {how} ... --resume, or pass --overwrite to restart"
        )


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], progress: dict) -> None:
    """Save ``state`` (CPU tensors) with ``progress`` (JSON) atomically at ``path``."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    save_tensors(state, partial, metadata={"progress": json.dumps(progress)})
    partial.replace(path)  # atomic: a kill leaves the old checkpoint or the new one


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(progress, state) of a checkpoint written by :func:`write_checkpoint`."""
    with safe_open(str(path), framework="pt") as handle:
        progress = json.loads(handle.metadata()["progress"])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return progress, state


def remove_scratch(out: Path) -> None:
    """Delete the checkpoints and the document sample's scratch files once the atlas is written."""
    for path in checkpoint_files(out) + [path for glob in SCRATCH_GLOBS for path in out.glob(glob)]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / DOCPOOL_PARTIAL_DIR, ignore_errors=True)
