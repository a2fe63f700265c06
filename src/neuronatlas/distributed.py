"""Profiling over torch.distributed: one process per device, the atlas of one process.

Started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT),
every rank profiles its own contiguous block of documents and the statistics are merged with
collective operations; rank 0 writes the atlas. The result equals a single process's atlas:

- windows keep their global number ``seq``: a planning pass counts each document's windows
  (every rank tokenises 1/world of the documents; the counts are all-gathered), so a rank's
  first window is numbered after all the windows of the documents before its block;
- blocks are contiguous runs of documents with about the same number of tokens each, so the
  document sample, the contexts and anything else in corpus order is rank 0's, then rank 1's ...;
- sums and counts are all-reduced, minima and maxima likewise, and the top-k exemplars are
  all-gathered and re-ranked by (activation desc, uid asc) -- exact, whatever the order.

Backends: gloo for ranks on CPU, nccl for ranks on CUDA devices (rank ``r`` uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from .errors import NeuronAtlasError

DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others: at the rendezvous and at each collective
_SEND_BYTES = 1 << 26  # rows of the document sample sent to rank 0 per message: ~64 MiB
_SUMMED = ("active", "sum", "sumsq", "hist")


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


# ---- sharding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One rank's block of documents and the batches that hold its windows.

    The rank runs the very batches one process would (windows ``batch_size * i`` to
    ``batch_size * (i + 1) - 1``), so every activation is bit for bit the same: the batches at
    the ends of its block may hold windows of the neighbouring blocks, which run through the
    model but are not counted.
    """

    rank: int
    world: int
    first_doc: int  # the block's documents: [first_doc, stop_doc)
    stop_doc: int
    first_seq: int  # the block's windows: [first_seq, stop_seq), numbered as in the whole corpus
    stop_seq: int
    batches_from: int  # the first window of the block's first batch
    batches_to: int  # the window after its last batch
    start_doc: int  # the document holding window batches_from ...
    start_doc_seq: int  # ... and the number of that document's first window
    windows: int  # windows in the whole corpus
    sampled_before: tuple[int, ...]  # per label: documents with a window before the block
    documents_per_label: dict  # the block's documents per label

    def describe(self) -> dict:
        return {"rank": self.rank, "world": self.world, "documents": [self.first_doc, self.stop_doc],
                "windows": [self.first_seq, self.stop_seq]}

    def owns(self, seq: int) -> bool:
        return self.first_seq <= seq < self.stop_seq

    def windows_of(self, corpus, tokenizer, max_length: int):
        """The windows of the block's batches, numbered as in the whole corpus."""
        from .corpus import iter_windows

        documents = islice(iter(corpus), self.start_doc, None)
        for window in iter_windows(documents, tokenizer, max_length):
            seq = window.seq + self.start_doc_seq
            if seq >= self.batches_to:
                return
            if seq >= self.batches_from:
                yield replace(window, seq=seq)


def plan_shards(group: Group, corpus, tokenizer, max_length: int, labels: list[str], batch_size: int) -> Shard:
    """Count every document's windows and tokens (1/world of them per rank) and cut balanced blocks."""
    from .corpus import iter_windows

    counted = []  # (doc, label index, windows, tokens) of this rank's share
    for doc in corpus:
        if doc.index % group.world == group.rank:
            windows = list(iter_windows([doc], tokenizer, max_length))
            label = labels.index(doc.label) if doc.label is not None else 0
            counted.append((doc.index, label, len(windows), sum(len(w.input_ids) for w in windows)))
    rows = sorted(row for part in group.all_gather_object(counted, "counting the windows") for row in part)
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)  # (documents, 4): doc, label, windows, tokens
    documents = len(table)
    if documents < group.world:
        raise NeuronAtlasError(
            f"{group.world} ranks but the corpus has only {documents} document(s); start at most {documents} "
            "processes (torchrun --nproc_per_node) or profile without torchrun"
        )
    bounds = balanced_bounds(table[:, 3], group.world)
    first, stop = bounds[group.rank], bounds[group.rank + 1]
    seq_end = np.cumsum(table[:, 2])  # (documents,) the window after each document's last
    seq_start = seq_end - table[:, 2]
    first_seq, stop_seq, total = int(seq_start[first]), int(seq_end[stop - 1]), int(seq_end[-1])
    batches_from = first_seq // batch_size * batch_size
    batches_to = min(-(-stop_seq // batch_size) * batch_size, total) if stop_seq > first_seq else batches_from
    start_doc = int(np.searchsorted(seq_end, batches_from, side="right")) if batches_from < total else first
    before = table[:first]
    sampled_before = tuple(int(((before[:, 1] == k) & (before[:, 2] > 0)).sum()) for k in range(len(labels)))
    block_labels = table[first:stop, 1]
    per_label = {label: int((block_labels == k).sum()) for k, label in enumerate(labels)}
    return Shard(group.rank, group.world, int(first), int(stop), first_seq, stop_seq, batches_from, batches_to,
                 start_doc, int(seq_start[start_doc]), total, sampled_before, per_label)


def balanced_bounds(tokens: np.ndarray, world: int) -> list[int]:
    """world + 1 document bounds: contiguous blocks, each with about 1/world of the tokens and at least one document."""
    total = np.cumsum(tokens)  # (documents,)
    targets = total[-1] * np.arange(1, world) / world if len(total) else np.zeros(world - 1)
    cuts = np.searchsorted(total, targets, side="left") + 1  # a block ends after the document crossing its share
    bounds = [0]
    for rank, cut in enumerate(cuts.tolist(), start=1):
        lowest, highest = bounds[-1] + 1, len(tokens) - (world - rank)  # leave a document for every later rank
        bounds.append(min(max(cut, lowest), highest))
    return bounds + [len(tokens)]


# ---- merging ----------------------------------------------------------------------------------


def merge_stats_(group: Group, stats) -> None:
    """All-reduce one SignalStats in place: sums and counts add, min/max reduce, exemplars re-rank."""
    from .stats import merge_topk

    for key, tensor in stats.tensors.items():
        kind = key.split(".")[0]
        if kind in _SUMMED:
            group.reduce_(tensor, "sum")
        elif kind in ("min", "max"):
            group.reduce_(tensor, kind)
    for layer in range(len(stats.widths)) if stats.top_k else ():
        values = group.all_gather(stats.tensors[f"top_values.{layer}"])  # world x (D, k)
        uids = group.all_gather(stats.tensors[f"top_uid.{layer}"])
        merged_values, merged_uid = values[0], uids[0]
        for other_values, other_uid in zip(values[1:], uids[1:]):
            merged_values, merged_uid = merge_topk(merged_values, merged_uid, other_values, other_uid, stats.top_k)
        stats.tensors[f"top_values.{layer}"], stats.tensors[f"top_uid.{layer}"] = merged_values, merged_uid


def gather_docpool(group: Group, pool, folder: Path):
    """Rank 0: every rank's document sample, in rank (= corpus) order; other ranks send theirs, get None."""
    from .docpool import POOLS, DocPool

    header = (pool.docs.tolist(), pool.labels, pool.tokens.tolist())
    headers = group.all_gather_object(header, "gathering the document sample")
    if group.rank != 0:
        for name in POOLS:
            group.send_rows(pool.parts[0][name], 0)  # a rank's own sample is one part
        return None
    parts = list(pool.parts)
    for rank, (docs, labels, tokens) in enumerate(headers[1:], start=1):
        received = {}
        for name in POOLS:
            path = Path(folder) / f"from-rank{rank}" / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            received[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(docs), sum(pool.widths)))
            group.receive_rows(received[name], rank)
            received[name].flush()
        parts.append(received)
    docs = np.concatenate([np.asarray(h[0], np.int64) for h in headers])
    tokens = np.concatenate([np.asarray(h[2], np.int64) for h in headers])
    labels = [label for h in headers for label in h[1]]
    return DocPool(list(pool.widths), docs, labels, tokens, parts, temporary=True)


def gather_tables(group: Group, table, what: str, everywhere: bool = False):
    """Every rank's arrow table (contexts, exemplar windows) concatenated in rank (= corpus) order, on
    rank 0 (None elsewhere) or, ``everywhere``, on every rank; None when the tables are None."""
    import pyarrow as pa

    if everywhere:
        tables = group.all_gather_object(table, f"gathering the {what}")
    else:
        tables = group.gather_object(table, f"gathering the {what}")
    if tables is None or any(part is None for part in tables):
        return None
    return pa.concat_tables(tables)


def batch_share(items: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[first, stop) of ``items`` for ``rank``: whole batches of ``batch_size``, as even as they come."""
    batches = -(-items // batch_size)
    first, stop = batches * rank // world, batches * (rank + 1) // world
    return min(first * batch_size, items), min(stop * batch_size, items)
