"""The output folder of a profile: refusing to clobber, checkpoints, resuming, cleaning up.

A checkpoint is one safetensors file per process (:func:`neuronatlas.files.checkpoint_name`):
the statistics so far plus, as JSON metadata, the progress and the run's metadata. It is written
to a ``.partial`` file and renamed, so a kill leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atlas import is_atlas
from ..errors import NeuronAtlasError
from ..files import ATLAS_FILES, CHECKPOINT_GLOB, DOCPOOL_PARTIAL_DIR, PARTIAL_SUFFIX, STAGING_SUFFIX, checkpoint_name


def checkpoint_files(out: Path) -> list[Path]:
    return sorted(out.glob(CHECKPOINT_GLOB)) if out.is_dir() else []


def start_output(out: Path, overwrite: bool, resume: bool, world: int) -> bool:
    """Check ``out`` for a job of ``world`` processes; True when --resume finds the atlas complete."""
    if resume and is_atlas(out) and not checkpoint_files(out):
        return True
    _prepare_output(out, overwrite, resume, world)
    return False


def _prepare_output(out: Path, overwrite: bool, resume: bool, world: int) -> None:
    """Refuse to clobber an atlas or an interrupted run unless told to."""
    if not out.exists():
        return
    if not out.is_dir():
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
    # A run killed before its first checkpoint leaves only scratch files: it starts again from scratch.
    scratch = [item for item in out.iterdir() if item.name == DOCPOOL_PARTIAL_DIR or item.name.endswith(".safetensors" + PARTIAL_SUFFIX)]
    if not checkpoints and len(scratch) < len(list(out.iterdir())):
        raise NeuronAtlasError(f"output folder {out} is not empty and holds no atlas; choose another --out")


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
    save_file(state, str(partial), metadata={"progress": json.dumps(progress)})
    partial.replace(path)  # atomic: a kill leaves the old checkpoint or the new one


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(progress, state) of a checkpoint written by :func:`write_checkpoint`."""
    with safe_open(str(path), framework="pt") as handle:
        progress = json.loads(handle.metadata()["progress"])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return progress, state


def remove_scratch(out: Path) -> None:
    """Delete the checkpoints and the document sample's scratch files once the atlas is written."""
    for path in checkpoint_files(out):
        path.unlink(missing_ok=True)
    shutil.rmtree(out / DOCPOOL_PARTIAL_DIR, ignore_errors=True)
