"""torch.distributed for the verbs torchrun may start: the launch, the process group, clear errors.

Started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT),
each process reads its :class:`Launch` from the environment and joins a :class:`Group`, whose
collectives turn a lost rank into a one-line error. Only ``profile`` runs on several ranks (see
:mod:`neuronatlas.profile.ranks`); other verbs call :func:`refuse_distributed`.

Backends: gloo for ranks on CPU, nccl for ranks on CUDA devices (rank ``r`` uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .errors import NeuronAtlasError

DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others: at the rendezvous and at each collective
_SEND_BYTES = 1 << 26  # rows of the document sample sent to rank 0 per message: ~64 MiB


class RankStopped(NeuronAtlasError):
    """The launcher stopped this rank, usually because another rank failed."""


# ---- the launch -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """What torchrun tells each process about the job."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    address: str
    port: str


def launch_from_env(environ=None) -> Launch | None:
    """The job this process belongs to, or None when it was not started by a launcher."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    world = _whole_number(environ, "WORLD_SIZE")
    rank = _whole_number(environ, "RANK")
    local_rank = _whole_number(environ, "LOCAL_RANK", default=0)
    local_world = _whole_number(environ, "LOCAL_WORLD_SIZE", default=world)
    if world < 1 or not 0 <= rank < world:
        raise NeuronAtlasError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE); "
                               "start with torchrun")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(key)]
    if missing:
        raise NeuronAtlasError(
            f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "no rendezvous to meet the other ranks at; start the command with torchrun "
            "(--rdzv-endpoint HOST:PORT for several machines)"
        )
    return Launch(rank, world, local_rank, local_world, environ["MASTER_ADDR"], environ["MASTER_PORT"])


def _whole_number(environ, key: str, default: int | None = None) -> int:
    text = environ.get(key)
    if text is None:
        if default is None:
            raise NeuronAtlasError(f"WORLD_SIZE={environ['WORLD_SIZE']} is set but {key} is not; "
                                   "start the command with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise NeuronAtlasError(f"{key}={text!r} is not a whole number; start the command with torchrun") from None


def refuse_distributed(verb: str) -> None:
    """Stop a verb that runs on one process when it was started by torchrun with several ranks."""
    launch = launch_from_env()
    if launch is not None and launch.world > 1:
        raise NeuronAtlasError(
            f"{verb} runs on one process (this is rank {launch.rank} of {launch.world}); "
            f"start it with python -m neuronatlas {verb} ... instead of torchrun"
        )


def rank_device(launch: Launch, device: str) -> str:
    """The device of this rank: one CUDA device per local rank when CUDA is asked for (or auto)."""
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            if launch.local_rank >= torch.cuda.device_count():
                raise NeuronAtlasError(
                    f"local rank {launch.local_rank} has no CUDA device (this machine has {torch.cuda.device_count()}); "
                    "start at most that many processes per node (--nproc_per_node)"
                )
            return f"cuda:{launch.local_rank}"
        if device == "cuda":
            raise NeuronAtlasError("device 'cuda' asked for but CUDA is not available; use --device cpu")
        return "cpu"
    return device


# ---- the process group ------------------------------------------------------------------------


class Group:
    """This rank's view of the job: collectives that turn a lost rank into a clear error."""

    def __init__(self, launch: Launch, device: torch.device):
        self.launch, self.rank, self.world = launch, launch.rank, launch.world
        self.device = device  # where collective tensors live: cuda for nccl, cpu for gloo

    @classmethod
    def join(cls, launch: Launch, device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Group:
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world,
                                    timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as error:  # the store's timeouts and refusals
            raise NeuronAtlasError(
                f"rank {launch.rank} found no rendezvous at {launch.address}:{launch.port} within {timeout:g} s "
                f"({_first_line(error)}); start all {launch.world} ranks with the same torchrun --rdzv-endpoint "
                "and check that the address is reachable"
            ) from error
        return cls(launch, device if device.type == "cuda" else torch.device("cpu"))

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as error:  # gloo/nccl: a peer closed its connection or timed out
            raise NeuronAtlasError(
                f"rank {self.rank} lost the other ranks while {what} ({_first_line(error)}); another rank "
                "probably failed: see its error, then rerun the same command with --resume"
            ) from error

    # -- objects

    def all_gather_object(self, value, what: str = "exchanging metadata") -> list:
        import torch.distributed as dist

        gathered = [None] * self.world
        with self._collective(what):
            dist.all_gather_object(gathered, value)
        return gathered

    def gather_object(self, value, what: str) -> list | None:
        """Every rank's ``value`` in rank order on rank 0; None on the other ranks."""
        import torch.distributed as dist

        gathered = [None] * self.world if self.rank == 0 else None
        with self._collective(what):
            dist.gather_object(value, gathered, dst=0)
        return gathered

    def on_rank0(self, step: Callable[[], object], what: str):
        """Run ``step`` on rank 0 only and give every rank its result, or raise its error on every rank."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = ("ok", step())
            except NeuronAtlasError as error:
                outcome = ("error", str(error))
        import torch.distributed as dist

        shared = [outcome]
        with self._collective(what):
            dist.broadcast_object_list(shared, src=0)
        kind, value = shared[0]
        if kind == "error":
            raise NeuronAtlasError(value)
        return value

    def check_same(self, value: dict, what: str) -> None:
        """Raise on every rank when some rank's ``value`` differs from rank 0's, naming the first key."""
        gathered = self.all_gather_object(value, f"comparing {what}")
        for rank, theirs in enumerate(gathered):
            for key in gathered[0]:
                if theirs.get(key) != gathered[0][key]:
                    raise NeuronAtlasError(
                        f"rank {rank} was started with another {what} than rank 0: {key} is {_brief(theirs.get(key))} "
                        f"there and {_brief(gathered[0][key])} on rank 0; start every rank with the same command"
                    )

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        with self._collective(what):
            dist.barrier()

    # -- tensors

    def reduce_(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce ``tensor`` in place (op: sum, min or max) and return it."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        moved = tensor.to(self.device).contiguous()
        with self._collective("merging the statistics"):
            dist.all_reduce(moved, ops[op])
        tensor.copy_(moved)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (the same shape on all ranks), on ``tensor``'s device, in rank order."""
        import torch.distributed as dist

        moved = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        with self._collective("gathering the exemplars"):
            dist.all_gather(parts, moved)
        return [part.to(tensor.device) for part in parts]

    def send_rows(self, array: np.ndarray, destination: int) -> None:
        """Send a 2-D array to ``destination`` in blocks of rows (it calls :meth:`receive_rows`)."""
        import torch.distributed as dist

        for block in _row_blocks(array):
            with self._collective("sending the document sample"):
                dist.send(torch.from_numpy(np.ascontiguousarray(block)).to(self.device), destination)

    def receive_rows(self, out: np.ndarray, source: int) -> None:
        import torch.distributed as dist

        start = 0
        for block in _row_blocks(out):
            buffer = torch.empty(block.shape, dtype=getattr(torch, str(out.dtype)), device=self.device)
            with self._collective("receiving the document sample"):
                dist.recv(buffer, source)
            out[start : start + len(block)] = buffer.cpu().numpy()
            start += len(block)


def _row_blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, _SEND_BYTES // max(array.itemsize * int(np.prod(array.shape[1:])), 1))
    for start in range(0, len(array), rows):
        yield array[start : start + rows]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


@contextmanager
def stopped_by_launcher(rank: int, out: Path) -> Iterator[None]:
    """Turn torchrun's SIGTERM (sent to every rank when one fails) into a clear error."""

    def stop(signum, frame):
        raise RankStopped(
            f"rank {rank} was stopped by the launcher (another rank failed or the job was cancelled); "
            f"the checkpoints in {out} are kept: rerun the same command with --resume"
        )

    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
